"""Models shipped with the agent, so ``ember demo`` trains without torch anywhere.

``digits/`` holds the digits demo's model (``coordinator/demo/model.py``'s ``Net``, an MLP
64-128-10 seeded with 0) as exported by :mod:`coordinator.export`: train-step, eval and
inference graphs and the initial weights. ``python -m coordinator.export
--regenerate-demo-assets`` rewrites them; a test checks them against a fresh export.
"""

from __future__ import annotations

from pathlib import Path

from agent.learning.backend import ExportedModel

ASSETS = Path(__file__).resolve().parent
DEMO_MODEL_DIR = ASSETS / "digits"


def load_demo_model() -> ExportedModel:
    """The digits demo's model, read from the files shipped in the package."""
    return ExportedModel.read(DEMO_MODEL_DIR)

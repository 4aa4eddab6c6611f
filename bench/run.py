"""Ember's benchmarks: ``python bench/run.py all`` or one part by name (``codec``, ...).

Each part prints a table and writes ``bench/results/<name>.json``. Every figure that claims a
speed is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = {
    "codec": "bench.codec",
    "agent_footprint": "bench.agent_footprint",
    "train_step": "bench.train_step",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("parts", nargs="+", choices=[*PARTS, "all"])
    args = parser.parse_args()
    names = list(PARTS) if "all" in args.parts else args.parts
    for name in names:
        importlib.import_module(PARTS[name]).main()


if __name__ == "__main__":
    main()

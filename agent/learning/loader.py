"""From a verified role bundle to a training backend.

Every bundle carries the job's exported model (:class:`~agent.learning.backend.ExportedModel`
artifacts: train-step, eval graphs, initial weights). ``backend: onnxruntime`` trains with those
graphs and nothing else. ``backend: torch`` also needs the model's Python source, which a bundle
carries in ``code`` only when signed by a trusted coordinator and only where the agent's config
allows code (checked by :func:`agent.protocol.bundle.verify_bundle` before anything here runs).
"""

from __future__ import annotations

import types
from typing import Any

from agent.learning.backend import ExportedModel, TrainingBackend
from agent.protocol.bundle import RoleBundle


class ModelLoadError(RuntimeError):
    """The bundle's model cannot be made into a backend; the message says why."""


def exported_model(bundle: RoleBundle) -> ExportedModel:
    """The bundle's model artifacts, checked."""
    try:
        return ExportedModel.from_artifacts(bundle.artifacts)
    except ValueError as exc:
        raise ModelLoadError(f"job {bundle.job}: {exc}") from None


def make_backend(
    bundle: RoleBundle, model: ExportedModel, *, backend: str | None = None, threads: int = 1
) -> TrainingBackend:
    """The backend the bundle asks for, or ``backend`` (CPU-bound set-up: call it off the
    event loop)."""
    if (backend or bundle.backend) == "onnxruntime":
        from agent.learning.onnx_backend import OnnxBackend

        return OnnxBackend(model, intra_op_threads=threads)
    from agent.learning.torch_backend import TorchBackend, torch_available

    if not torch_available():
        raise ModelLoadError(f"job {bundle.job}: backend torch, but torch is not installed here")
    return TorchBackend(torch_module(bundle), model.spec, threads=threads)


def torch_module(bundle: RoleBundle) -> Any:
    """Instantiate the model class named by ``config.model.torch`` (``file.py:Class``) from the
    bundle's signed source."""
    reference = str(bundle.config.get("model", {}).get("torch", ""))
    filename, _, class_name = reference.rpartition(":")
    source_name = filename.rsplit("/", 1)[-1]
    source = bundle.code.get(source_name)
    if not class_name or source is None:
        raise ModelLoadError(
            f"job {bundle.job}: backend torch needs model.torch 'file.py:Class' and that file "
            f"in the bundle's code (got {reference!r}, files {sorted(bundle.code)})"
        )
    module = types.ModuleType(f"ember_job_{bundle.job.replace('-', '_')}")
    module.__file__ = f"<bundle {bundle.job}/{source_name}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102  signed, allowed
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelLoadError(f"job {bundle.job}: {source_name} defines no {class_name}")
    return cls()

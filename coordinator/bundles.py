"""Role bundles from a job spec, signed with the coordinator's Ed25519 key.

A bundle carries everything one agent needs to run one role of one job (Flame's role
abstraction): the model artifacts the role uses, the job's validated spec as its configuration,
the topic prefix and, for trainers, the dataset binding. Bundles are content-addressed (SHA-256
of their deterministic msgpack) and signed (Ed25519, RFC 8032) by :func:`sign`; agents verify
them with the public key they were given (``ember keys init`` prints it).

Model artifacts come from the spec's ``model`` section, on the operator's machine:

* ``onnx``: the exported files are read (initial weights as a tensor-codec file or a ``.npz``);
* ``torch``: the class is imported from its file and exported once by
  :func:`coordinator.export.export_model` (train-step, eval and inference graphs and the initial
  weights); see :func:`export_torch`.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.bundle import RoleBundle, SignedBundle, public_key_to_text, sign_bundle
from agent.protocol.codec import decode_tensors, encode_tensors
from agent.protocol.topics import DEFAULT_PREFIX
from coordinator.spec import JobSpec, ModelSpec, OnnxFiles, SpecError

TRAIN_STEP = "train_step.onnx"
EVAL = "eval.onnx"
INFERENCE = "inference.onnx"
INITIAL = "initial.tensors"
"""Artifact names, as :class:`agent.learning.backend.ExportedModel` names them."""

REQUIRED_ARTIFACTS = (TRAIN_STEP, EVAL, INITIAL)
ROLE_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "trainer": (TRAIN_STEP, EVAL, INITIAL),
    "aggregator": (TRAIN_STEP, EVAL, INFERENCE, INITIAL),
    "middle_aggregator": (TRAIN_STEP, EVAL, INITIAL),
    "shard_assembler": (TRAIN_STEP, EVAL, INFERENCE, INITIAL),
    "aggregator_shard": (TRAIN_STEP, EVAL, INITIAL),
}
"""Which artifacts each role receives: trainers, middle aggregators and aggregator shards (which
read the model's spec from the train-step graph) need no inference graph."""
CODE_ROLES = frozenset({"trainer"})
"""Roles that run the model's Python source on a torch backend. Aggregators only evaluate, with
the ONNX eval graph, so their bundles stay code-free and run on agents that refuse code."""

KEY_FILE = "coordinator.key"


# -- keys ----------------------------------------------------------------------------------------


class KeyFileError(RuntimeError):
    """The coordinator key cannot be read or written."""


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEY_FILE


def load_key(state_dir: Path) -> Ed25519PrivateKey:
    """The coordinator's private key from ``<state_dir>/coordinator.key`` (PEM, PKCS#8)."""
    path = key_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"no coordinator key at {path}: run 'ember keys init --state-dir {state_dir}'"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def init_key(state_dir: Path, *, force: bool = False) -> tuple[Ed25519PrivateKey, bool]:
    """Create the key (mode 0600) unless it exists; returns it and whether it was created."""
    path = key_path(state_dir)
    if path.exists() and not force:
        return load_key(state_dir), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key, True


def public_text(key: Ed25519PrivateKey) -> str:
    """``ed25519:<base64>``: what agents put in ``[trust] coordinator_keys``."""
    return public_key_to_text(key.public_key())


# -- model artifacts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArtifacts:
    """A job's model as named blobs, plus Python sources for torch-backend bundles."""

    artifacts: dict[str, bytes]
    code: dict[str, str] = field(default_factory=dict)


def resolve(path: str, base_dir: Path | None) -> Path:
    """A spec path: relative to the job file's directory, then to the current directory."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    if base_dir is not None and (base_dir / candidate).exists():
        return base_dir / candidate
    return candidate


def _read(path: str, where: str, base_dir: Path | None) -> bytes:
    resolved = resolve(path, base_dir)
    try:
        data = resolved.read_bytes()
    except FileNotFoundError:
        raise SpecError(where, f"file not found: {path}") from None
    except OSError as exc:
        raise SpecError(where, f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise SpecError(where, f"{path} is empty")
    return data


def initial_weights(data: bytes, where: str) -> bytes:
    """Initial weights in the tensor codec, from codec bytes or a ``.npz`` archive."""
    if data[:4] == b"PK\x03\x04":  # a zip: numpy's .npz
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                tensors = {name: np.ascontiguousarray(npz[name]) for name in npz.files}
        except ValueError as exc:
            raise SpecError(where, f"not a readable .npz: {exc}") from None
        if not tensors:
            raise SpecError(where, "the .npz holds no arrays")
        return encode_tensors(tensors)
    try:
        decode_tensors(data)
    except ValueError as exc:
        raise SpecError(where, f"not tensor-codec weights or a .npz: {exc}") from None
    return data


def read_onnx(files: OnnxFiles, base_dir: Path | None) -> ModelArtifacts:
    """Read an ONNX-exported model's files."""
    artifacts = {
        TRAIN_STEP: _read(files.train_step, "model.onnx.train_step", base_dir),
        EVAL: _read(files.eval, "model.onnx.eval", base_dir),
        INITIAL: initial_weights(
            _read(files.initial, "model.onnx.initial", base_dir), "model.onnx.initial"
        ),
    }
    if files.inference:
        artifacts[INFERENCE] = _read(files.inference, "model.onnx.inference", base_dir)
    return ModelArtifacts(artifacts)


def import_torch_class(model: ModelSpec, base_dir: Path | None) -> tuple[type[Any], str]:
    """Import ``file.py:Class`` (the operator's own code, on the operator's machine)."""
    path = resolve(model.torch_file, base_dir)
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("model.torch", f"file not found: {model.torch_file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("model.torch", f"cannot read {model.torch_file}: {exc}") from None
    name = f"_ember_job_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError("model.torch", f"cannot import {model.torch_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise SpecError("model.torch", f"importing {model.torch_file} failed: {exc}") from None
    except Exception as exc:
        raise SpecError(
            "model.torch", f"importing {model.torch_file} raised {type(exc).__name__}: {exc}"
        ) from None
    cls = getattr(module, model.torch_class, None)
    if not isinstance(cls, type):
        raise SpecError("model.torch", f"{model.torch_file} has no class {model.torch_class}")
    return cls, source


def export_torch(
    model: ModelSpec, base_dir: Path | None, *, input_shape: Sequence[int] | None = None
) -> ModelArtifacts:
    """Instantiate the spec's torch class and export it with
    :func:`coordinator.export.export_model` (needs torch: the ``torch`` extra).

    ``input_shape`` comes from the spec's ``model.input_shape``, else from the caller (the
    datasets' feature shape), else from a class attribute ``input_shape``.
    """
    cls, source = import_torch_class(model, base_dir)
    shape = model.input_shape or (tuple(input_shape) if input_shape else None)
    shape = shape or getattr(cls, "input_shape", None)
    if not shape:
        raise SpecError(
            "model.input_shape",
            "required to export a torch model: one example's shape without the batch axis, "
            "e.g. [64]",
        )
    try:
        export = importlib.import_module("coordinator.export")
    except ImportError as exc:
        raise SpecError(
            "model.torch",
            f"exporting a torch model needs torch and onnx (pip install 'ember-fl[torch]'): {exc}",
        ) from None
    try:
        module = cls()
    except Exception as exc:
        raise SpecError(
            "model.torch", f"{model.torch_class}() raised {type(exc).__name__}: {exc}"
        ) from None
    try:
        exported = export.export_model(module, tuple(shape), loss=model.loss)
    except ValueError as exc:
        raise SpecError("model.torch", f"cannot export {model.torch_class}: {exc}") from None
    artifacts: dict[str, bytes] = dict(exported.to_artifacts())
    return ModelArtifacts(artifacts, {Path(model.torch_file).name: source})


def model_artifacts(
    spec: JobSpec, base_dir: Path | None, *, input_shape: Sequence[int] | None = None
) -> ModelArtifacts:
    """The job's model artifacts (and, for the torch backend, the model's source)."""
    if spec.model.onnx is not None:
        return read_onnx(spec.model.onnx, base_dir)
    exported = export_torch(spec.model, base_dir, input_shape=input_shape)
    if spec.backend == "onnxruntime":
        return ModelArtifacts(exported.artifacts)
    return exported


def check_artifacts(artifacts: Mapping[str, bytes]) -> None:
    """Refuse a submission without the artifacts every bundle needs."""
    missing = [name for name in REQUIRED_ARTIFACTS if not artifacts.get(name)]
    if missing:
        raise SpecError("model", f"artifacts missing: {', '.join(missing)}")
    initial_weights(artifacts[INITIAL], "model.initial")


# -- bundles -------------------------------------------------------------------------------------


def build_bundle(
    *,
    job: str,
    role: str,
    spec: Mapping[str, Any],
    artifacts: Mapping[str, bytes],
    code: Mapping[str, str] | None = None,
    dataset: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    created: float,
    backend: str | None = None,
    shard: int | None = None,
) -> RoleBundle:
    """One role's bundle. Deterministic: the same inputs give the same content and digest.
    ``backend`` is the one this role's agent trains with (the spec's unless ``auto``
    chose one for it); an ``auto`` bundle without a choice trains with onnxruntime.
    ``shard``: an aggregator shard's slice of the parameters, in its config."""
    wanted = ROLE_ARTIFACTS.get(role, tuple(artifacts))
    backend = backend or str(spec.get("backend", "onnxruntime"))
    if backend == "auto":
        backend = "onnxruntime"
    return RoleBundle(
        job=job,
        role=role,
        backend=backend,
        prefix=prefix,
        config=dict(spec) if shard is None else {**spec, "shard": shard},
        dataset={"name": dataset} if dataset else {},
        artifacts={name: artifacts[name] for name in wanted if name in artifacts},
        code=dict(code or {}) if backend == "torch" and role in CODE_ROLES else {},
        created=created,
    )


def sign(bundle: RoleBundle, key: Ed25519PrivateKey) -> SignedBundle:
    """Sign a bundle with the coordinator key (Ed25519 over the content bytes)."""
    return sign_bundle(bundle, key)

"""A job's trained model as one inference ONNX graph: the job's ``inference.onnx`` with the
kept weights baked in.

Ember's exporter (:mod:`coordinator.export`) writes the inference graph with the parameters as
initializers named exactly like the parameters (``fc1.weight``), and records the parameters in
the graph's ``ember.params`` metadata (:class:`agent.learning.backend.ModelSpec`).
:func:`with_weights` replaces those initializers with trained values, after checking that every
name, shape and dtype matches; :func:`smoke_test` runs the result once with onnxruntime.

Used by ``ember jobs export`` and ``ember demo``; needs the ``onnx`` package (the
``coordinator`` extra), which agents never install.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

PARAMS_KEY = "ember.params"
"""The inference graph's metadata entry listing the model's parameters."""


class ModelExportError(ValueError):
    """The weights do not fit the inference graph (or the graph is unusable); says why."""


def with_weights(
    inference: bytes,
    weights: Mapping[str, Array],
    *,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """``inference`` (a serialized ONNX model) with ``weights`` replacing the initializers of
    the same names; ``metadata`` is added to (or replaces entries of) its ``metadata_props``.

    Every weight must name an initializer of the same shape and dtype, and where the graph lists
    its parameters (``ember.params``) the weights must be exactly those. Raises
    :class:`ModelExportError` naming the first mismatches otherwise.
    """
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load_from_string(inference)
    except Exception as exc:  # protobuf's DecodeError, or onnx's own
        raise ModelExportError(f"the inference graph is not a readable ONNX model: {exc}") from None
    initializers = {init.name: index for index, init in enumerate(model.graph.initializer)}
    if not initializers:
        raise ModelExportError("the inference graph has no initializers to put weights in")
    props = {p.key: p.value for p in model.metadata_props}
    params = _declared_params(props.get(PARAMS_KEY))
    problems: list[str] = []
    unknown = sorted(set(weights) - set(initializers))
    if unknown:
        problems.append(f"not initializers of the graph: {_names(unknown)}")
    if params is not None:
        missing = sorted(set(params) - set(weights))
        if missing:
            problems.append(f"parameters of the graph without weights: {_names(missing)}")
    replacements: list[tuple[int, str, Array]] = []
    for name, value in weights.items():
        index = initializers.get(name)
        if index is None:
            continue
        init = model.graph.initializer[index]
        array = np.asarray(value)
        shape = tuple(int(d) for d in init.dims)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        except KeyError:
            problems.append(f"{name}: the graph's initializer has ONNX type {init.data_type}")
            continue
        if array.shape != shape or array.dtype != dtype:
            problems.append(
                f"{name}: the graph has {dtype}{list(shape)}, the weights {array.dtype}"
                f"{list(array.shape)}"
            )
            continue
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{name}: non-finite values")
            continue
        replacements.append((index, name, array))
    if problems:
        raise ModelExportError("weights do not fit the inference graph: " + "; ".join(problems))
    for index, name, new in replacements:
        tensor = numpy_helper.from_array(np.ascontiguousarray(new), name)
        model.graph.initializer[index].CopyFrom(tensor)
    if metadata:
        keep = [p for p in model.metadata_props if p.key not in metadata]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)
        for key, text in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, text
    return bytes(model.SerializeToString())


@dataclass(frozen=True)
class SmokeResult:
    """What one run of a model on a zero batch gave."""

    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


def smoke_test(model: bytes, *, batch: int = 1) -> SmokeResult:
    """Load ``model`` in onnxruntime and run it once on a batch of zeros (symbolic dimensions
    become ``batch``); raises :class:`ModelExportError` if it cannot load, run, or gives
    non-finite outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own, untyped, exception classes
        raise ModelExportError(f"onnxruntime cannot load the model: {exc}") from None
    feeds: dict[str, Array] = {}
    for node in session.get_inputs():
        shape = tuple(d if isinstance(d, int) and d >= 0 else batch for d in node.shape)
        feeds[node.name] = np.zeros(shape, _ORT_TYPES.get(node.type, np.float32))
    try:
        results = session.run(None, feeds)
    except Exception as exc:
        raise ModelExportError(f"onnxruntime cannot run the model on zeros: {exc}") from None
    outputs: dict[str, tuple[int, ...]] = {}
    for node, value in zip(session.get_outputs(), results, strict=True):
        array = np.asarray(value)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ModelExportError(f"output {node.name} is not finite on a batch of zeros")
        outputs[node.name] = tuple(array.shape)
    return SmokeResult({k: tuple(v.shape) for k, v in feeds.items()}, outputs)


_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _declared_params(text: str | None) -> list[str] | None:
    if text is None:
        return None
    try:
        return [str(p["name"]) for p in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        raise ModelExportError(
            f"the inference graph's {PARAMS_KEY} metadata is malformed"
        ) from None


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

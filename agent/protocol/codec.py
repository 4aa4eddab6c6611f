"""Tensor codec: named numpy arrays as msgpack maps ``{name, dtype, shape, data}``.

``data`` holds the array's bytes in C order, little-endian, whatever the host's byte order, and
starts 16-byte aligned in the payload (a ``pad`` bin before it takes up the slack). On
decode the array is a read-only ``numpy.frombuffer`` view of the received payload: no copy, so a
44 MB model costs 44 MB once. Every field is checked against
:class:`~agent.protocol.limits.ProtocolLimits` before the view is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.protocol.errors import ProtocolError, preview
from agent.protocol.limits import DEFAULT_LIMITS, ProtocolLimits
from agent.protocol.msgpack_view import ALIGN_NEXT, Buffer, pack, pack_segments, unpack

if TYPE_CHECKING:
    import numpy.typing as npt

    Array = npt.NDArray[Any]
else:
    Array = Any  # numpy is imported by the functions that use it: an idle agent never maps it
TensorMap = dict[str, Array]

DTYPES: frozenset[str] = frozenset(
    {
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    }
)
"""Element types a tensor may have on the wire (numpy names)."""

_FIELDS = frozenset({"name", "dtype", "shape", "data"})


def tensor_to_wire(name: str, array: npt.ArrayLike) -> dict[str, Any]:
    """One tensor as the map that goes on the wire; ``data`` is a view, not a copy, when the
    array is already C-contiguous and little-endian."""
    import numpy as np

    arr = np.asarray(array)
    if arr.dtype.name not in DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot go on the wire")
    # astype, not ascontiguousarray: the latter turns a 0-d array into shape (1,).
    arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
    return {
        "name": name,
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "pad": ALIGN_NEXT,
        "data": arr.reshape(-1).view(np.uint8).data,
    }


def tensors_to_wire(tensors: Mapping[str, npt.ArrayLike]) -> list[dict[str, Any]]:
    """A name → array mapping as the wire's list of tensor maps, in the mapping's order."""
    return [tensor_to_wire(name, arr) for name, arr in tensors.items()]


def tensors_from_wire(
    value: Any,
    *,
    limits: ProtocolLimits = DEFAULT_LIMITS,
    require_finite: bool = True,
    where: str = "tensors",
) -> TensorMap:
    """Check a decoded list of tensor maps and wrap each ``data`` as a read-only array view.

    Raises :class:`ProtocolError` naming the tensor and what is wrong with it.
    """
    import numpy as np

    if not isinstance(value, list):
        raise ProtocolError(f"{where}: expected a list of tensors, got {_kind(value)}")
    if len(value) > limits.max_tensors:
        raise ProtocolError(f"{where}: {len(value)} tensors, more than {limits.max_tensors}")
    out: TensorMap = {}
    for index, item in enumerate(value):
        array, name = _tensor_from_wire(item, limits, f"{where}[{index}]")
        if name in out:
            raise ProtocolError(f"{where}[{index}]: duplicate tensor name {name!r}")
        if require_finite and not all_finite(array):
            bad = array.size - int(np.count_nonzero(np.isfinite(array)))
            raise ProtocolError(f"{where}: tensor {name!r} has {bad} non-finite values")
        out[name] = array
    return out


def all_finite(array: Array) -> bool:
    """True when no element is NaN or ±inf.

    For float32/float64 the dot product with itself decides in one BLAS pass without a
    temporary: it is finite exactly when every element is, unless the squares overflow, and
    only then is the exact (slower) elementwise test needed.
    """
    import numpy as np

    if array.dtype.kind != "f":
        return True
    if array.dtype.itemsize >= 4 and array.ndim:
        flat = array.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.dot(flat, flat))):
                return True
    return bool(np.isfinite(array).all())


def _tensor_from_wire(item: Any, limits: ProtocolLimits, where: str) -> tuple[Array, str]:
    import numpy as np

    if not isinstance(item, dict):
        raise ProtocolError(f"{where}: expected a tensor map, got {_kind(item)}")
    missing = _FIELDS - item.keys()
    if missing:
        raise ProtocolError(f"{where}: tensor map lacks {', '.join(sorted(missing))}")
    name = item["name"]
    if not isinstance(name, str) or not name or len(name) > limits.max_name_length:
        raise ProtocolError(
            f"{where}.name: expected a non-empty string of at most {limits.max_name_length} "
            f"characters, got {preview(name)}"
        )
    where = f"{where} ({name!r})"
    dtype_name = item["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"{where}.dtype: {preview(dtype_name)} is not one of {sorted(DTYPES)}")
    shape = item["shape"]
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise ProtocolError(
            f"{where}.shape: expected a list of at most {limits.max_ndim} sizes, "
            f"got {preview(shape)}"
        )
    if not all(type(dim) is int and dim >= 0 for dim in shape):
        raise ProtocolError(f"{where}.shape: sizes must be integers ≥ 0, got {shape}")
    elements = math.prod(shape)
    if elements > limits.max_tensor_elements:
        raise ProtocolError(
            f"{where}.shape: {elements} elements, more than {limits.max_tensor_elements}"
        )
    data = item["data"]
    if not isinstance(data, memoryview):
        raise ProtocolError(f"{where}.data: expected bin, got {_kind(data)}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    if data.nbytes != elements * dtype.itemsize:
        raise ProtocolError(
            f"{where}.data: {data.nbytes} bytes, but shape {shape} of {dtype_name} needs "
            f"{elements * dtype.itemsize}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array, name


def encode_tensors(tensors: Mapping[str, npt.ArrayLike]) -> bytes:
    """A bare tensor list as msgpack (for checkpoints, benchmarks and tests)."""
    return pack(tensors_to_wire(tensors))


def encode_tensor_segments(tensors: Mapping[str, npt.ArrayLike]) -> list[Buffer]:
    """:func:`encode_tensors` as the pieces it joins: the data of C-contiguous little-endian
    arrays over 64 KiB is a view of the array, valid while the array stays unchanged."""
    return pack_segments(tensors_to_wire(tensors))


def decode_tensors(
    payload: Buffer, *, limits: ProtocolLimits = DEFAULT_LIMITS, require_finite: bool = True
) -> TensorMap:
    """Inverse of :func:`encode_tensors`; arrays are views of ``payload``."""
    return tensors_from_wire(unpack(payload, limits), limits=limits, require_finite=require_finite)


def _kind(value: Any) -> str:
    return "nil" if value is None else type(value).__name__

"""Tensors survive the wire bit for bit, decode as views, and bad ones are refused by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.protocol.codec import (
    DTYPES,
    decode_tensors,
    encode_tensors,
    tensors_from_wire,
    tensors_to_wire,
)
from agent.protocol.errors import ProtocolError
from agent.protocol.limits import ProtocolLimits
from agent.protocol.msgpack_view import pack, unpack

arrays = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda dtype: hnp.arrays(
        dtype=np.dtype(dtype),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
tensor_maps = st.dictionaries(st.text(min_size=1, max_size=12), arrays, max_size=5)


@given(tensor_maps)
def test_round_trip_is_bit_exact(tensors: dict[str, np.ndarray]) -> None:
    decoded = decode_tensors(encode_tensors(tensors), require_finite=False)
    assert list(decoded) == list(tensors)
    for name, original in tensors.items():
        got = decoded[name]
        assert got.dtype == original.dtype.newbyteorder("<")
        assert got.shape == original.shape
        assert got.tobytes() == np.ascontiguousarray(original).astype(got.dtype).tobytes()
        assert not got.flags.writeable


@given(hnp.arrays(np.dtype(">f4"), hnp.array_shapes(max_dims=3)))
def test_big_endian_and_strided_input_goes_out_little_endian(array: np.ndarray) -> None:
    strided = np.asarray(array)[..., ::-1]
    decoded = decode_tensors(encode_tensors({"x": strided}), require_finite=False)["x"]
    assert decoded.dtype.str == "<f4"
    np.testing.assert_array_equal(decoded, strided)


def test_decoded_tensor_is_a_view_of_the_payload() -> None:
    weights = np.arange(100_000, dtype=np.float32)
    payload = bytearray(encode_tensors({"w": weights}))
    decoded = decode_tensors(payload)["w"]
    assert np.shares_memory(decoded, np.frombuffer(payload, dtype=np.uint8))


def wire(**overrides: Any) -> bytes:
    tensor = tensors_to_wire({"w": np.zeros((2, 3), np.float32)})[0]
    del tensor["pad"]  # alignment padding is optional for a reader
    tensor.update(overrides)
    return pack([tensor])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (wire(dtype="object"), r"\('w'\)\.dtype: 'object' is not one of"),
        # Regression (hostile-input fuzzing): an unhashable dtype raised TypeError, which no
        # handler expects, instead of a ProtocolError.
        (wire(dtype=["float32"]), r"\('w'\)\.dtype: \['float32'\] is not one of"),
        (wire(dtype={"kind": "f"}), r"\('w'\)\.dtype: \{'kind': 'f'\} is not one of"),
        (wire(shape=[2, 4]), r"24 bytes, but shape \[2, 4\] of float32 needs 32"),
        (wire(shape=[2, -3]), "sizes must be integers ≥ 0"),
        (wire(shape="2x3"), "expected a list of at most 8 sizes"),
        (wire(data="zeros"), "expected bin, got str"),
        (wire(name=""), "expected a non-empty string"),
        (pack([{"name": "w"}]), "tensor map lacks data, dtype, shape"),
        (pack({"w": 1}), "expected a list of tensors, got dict"),
        (pack([tensors_to_wire({"w": np.ones(2)})[0]] * 2), "duplicate tensor name 'w'"),
    ],
)
def test_malformed_tensors_are_rejected_with_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_tensors(payload)


def test_non_finite_values_are_counted_and_rejected() -> None:
    bad = np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    with pytest.raises(ProtocolError, match="tensor 'w' has 3 non-finite values"):
        decode_tensors(encode_tensors({"w": bad}))
    assert np.isnan(decode_tensors(encode_tensors({"w": bad}), require_finite=False)["w"][1])


def test_limits_on_count_elements_and_rank() -> None:
    limits = ProtocolLimits(max_tensors=2, max_tensor_elements=10, max_ndim=2)
    three = {name: np.zeros(1) for name in "abc"}
    with pytest.raises(ProtocolError, match="3 tensors, more than 2"):
        decode_tensors(encode_tensors(three), limits=limits)
    with pytest.raises(ProtocolError, match="11 elements, more than 10"):
        decode_tensors(encode_tensors({"w": np.zeros(11)}), limits=limits)
    with pytest.raises(ProtocolError, match="at most 2 sizes"):
        decode_tensors(encode_tensors({"w": np.zeros((1, 1, 1))}), limits=limits)


def test_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="complex128"):
        encode_tensors({"z": np.zeros(2, dtype=np.complex128)})


@given(tensor_maps, st.integers(0, 40))
def test_tensor_data_is_aligned_in_the_payload(tensors: dict[str, np.ndarray], shift: int) -> None:
    """Whatever precedes them, tensor bytes start 16-byte aligned, so views are aligned too."""
    payload = pack({"prefix": "x" * shift, "tensors": tensors_to_wire(tensors)})
    buffer = np.empty(len(payload) + 16, np.uint8)  # numpy allocations are 16-byte aligned
    buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
    decoded = tensors_from_wire(
        unpack(buffer.data.cast("B")[: len(payload)])["tensors"], require_finite=False
    )
    for array in decoded.values():
        assert array.ctypes.data % 16 == 0
        assert array.flags.aligned


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_finite_check_is_exact_even_when_squares_overflow(dtype: str) -> None:
    from agent.protocol.codec import all_finite

    big = np.full(10, np.finfo(dtype).max / 2, dtype=dtype)  # finite, but Σx² overflows
    assert all_finite(big)
    for poison in (np.nan, np.inf, -np.inf):
        bad = big.copy()
        bad[3] = poison
        assert not all_finite(bad)
        assert not all_finite(bad[3:4].reshape(()))  # 0-d
    assert all_finite(np.arange(5, dtype=np.int64))

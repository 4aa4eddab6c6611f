"""The zero-copy msgpack reader agrees with msgpack-python and refuses bad input precisely."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import ProtocolLimits
from agent.protocol.msgpack_view import materialize, pack, unpack

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=30,
)


@given(values)
def test_round_trip_matches_msgpack_python(value: Any) -> None:
    packed = pack(value)
    assert packed == msgpack.packb(value, use_bin_type=True)
    assert materialize(unpack(packed)) == msgpack.unpackb(packed, raw=False, strict_map_key=False)


@given(values)
def test_every_truncation_is_a_protocol_error(value: Any) -> None:
    packed = pack(value)
    for cut in range(len(packed)):
        with pytest.raises(ProtocolError):
            unpack(packed[:cut])


@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_value_or_a_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        unpack(data)


def test_large_binary_is_a_view_of_the_input_not_a_copy() -> None:
    blob = bytes(range(256)) * 1024  # 256 KiB: spliced, not inlined
    payload = bytearray(pack({"data": blob}))
    view = unpack(payload)["data"]
    assert isinstance(view, memoryview)
    assert view.obj is payload
    assert view.tobytes() == blob
    payload[-1] ^= 0xFF  # the view sees changes to the payload: it shares its memory
    assert view[-1] == blob[-1] ^ 0xFF


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1", "0xc1"),
        (b"\xd4\x01\x00", "extension type"),
        (msgpack.packb(1) + b"\x00", "trailing"),
        (b"\x82\xa1a\x01\xa1a\x02", "duplicate map key 'a'"),
        (b"\x81\x01\x02", "map key at byte 1 is int"),
        (b"\xa2\xff\xfe", "not UTF-8"),
        (b"\xdd\xff\xff\xff\xff", "array of 4294967295 items"),
        (b"\xc6\xff\xff\xff\xf0", "bin of 4294967280 bytes at byte 0 is above the limit"),
        (b"\xc6\x00\x00\x00\x09abc", "truncated bin at byte 5: needs 9 bytes, 3 left"),
    ],
)
def test_rejections_name_the_problem(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        unpack(payload)


def test_limits_bound_depth_collections_and_strings() -> None:
    limits = ProtocolLimits(max_depth=3, max_collection_length=4, max_string_length=8)
    with pytest.raises(ProtocolError, match="nesting deeper than 3"):
        unpack(pack([[[[[1]]]]]), limits)
    with pytest.raises(ProtocolError, match="above the limit of 4"):
        unpack(pack([1, 2, 3, 4, 5]), limits)
    with pytest.raises(ProtocolError, match="longer than 8"):
        unpack(pack("x" * 9), limits)
    assert unpack(pack([[1, 2, 3, 4]]), limits) == [[1, 2, 3, 4]]


def test_align_next_needs_a_binary_value_after_it() -> None:
    from agent.protocol.msgpack_view import ALIGN_NEXT

    with pytest.raises(TypeError, match="ALIGN_NEXT"):
        pack({"pad": ALIGN_NEXT, "data": 3})
    with pytest.raises(TypeError, match="ALIGN_NEXT"):
        pack({"pad": ALIGN_NEXT})

"""msgpack with binary values kept as views: the encoder and decoder for Ember's wire format.

Why not plain ``msgpack.packb``/``unpackb``: msgpack-python copies every ``bin`` value into a new
``bytes`` on decode, and grows its buffer by doubling on encode. A model of 11 M parameters is a
44 MB ``bin``; copying it doubles the peak memory of an agent on a 1 GB device and halves decode
speed. So:

* :func:`pack` walks maps and lists itself, hands every small leaf to msgpack's C packer, and emits
  large binary values as a ``bin32`` header followed by the caller's buffer; the pieces are joined
  once, at ``memcpy`` speed.
* :func:`unpack` is a small reader for the msgpack subset Ember emits (nil, bool, int, float, str,
  bin, array, map with string keys; no ext types). It returns ``bin`` values as ``memoryview``
  slices of the input, so ``numpy.frombuffer`` can wrap tensor data without a copy. It enforces
  the :class:`~agent.protocol.limits.ProtocolLimits` before allocating anything and raises
  :class:`~agent.protocol.errors.ProtocolError` with the byte offset of whatever is wrong.

The output of :func:`pack` is ordinary msgpack: any msgpack library reads it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import DEFAULT_LIMITS, ProtocolLimits

Buffer = bytes | bytearray | memoryview

_INLINE_BIN = 64 * 1024
"""Binary values up to this size are copied by msgpack's packer; larger ones are spliced in."""

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")

_INTS: dict[int, struct.Struct] = {
    0xCC: _U8,
    0xCD: _U16,
    0xCE: _U32,
    0xCF: _U64,
    0xD0: _I8,
    0xD1: _I16,
    0xD2: _I32,
    0xD3: _I64,
}
_LENGTHS: dict[int, tuple[str, struct.Struct]] = {
    0xC4: ("bin", _U8),
    0xC5: ("bin", _U16),
    0xC6: ("bin", _U32),
    0xD9: ("str", _U8),
    0xDA: ("str", _U16),
    0xDB: ("str", _U32),
    0xDC: ("array", _U16),
    0xDD: ("array", _U32),
    0xDE: ("map", _U16),
    0xDF: ("map", _U32),
}


ALIGN_NEXT: Any = object()
"""Map value that ``pack`` turns into a padding ``bin`` sized so that the bytes of the *next*
value's ``bin`` start at a multiple of :data:`ALIGNMENT` from the start of the payload. Received
buffers are at least 16-byte aligned, so numpy views of tensor data come out aligned (unaligned
float32 arrays are about half as fast to read)."""
ALIGNMENT = 16


def pack(obj: Any) -> bytes:
    """Encode ``obj`` (maps, lists, scalars, str, bytes-like) as msgpack.

    Buffers larger than 64 KiB are not copied until the final join.
    """
    return b"".join(pack_segments(obj))


def pack_segments(obj: Any) -> list[Buffer]:
    """:func:`pack`'s output before the join: small pieces packed, and every buffer larger than
    64 KiB as a view of the caller's memory (to write with ``pwritev`` without a copy; the
    views are only valid while that memory stays unchanged)."""
    writer = _Writer()
    writer.value(obj)
    return writer.segments


class _Writer:
    __slots__ = ("offset", "packer", "segments")

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)
        self.segments: list[Buffer] = []
        self.offset = 0

    def emit(self, segment: Buffer) -> None:
        self.segments.append(segment)
        self.offset += _nbytes(segment)

    def value(self, obj: Any) -> None:
        if isinstance(obj, Mapping):
            self.emit(self.packer.pack_map_header(len(obj)))
            items = list(obj.items())
            for index, (key, value) in enumerate(items):
                if not isinstance(key, str):
                    raise TypeError(f"map keys must be str, got {type(key).__name__}")
                self.emit(self.packer.pack(key))
                if value is ALIGN_NEXT:
                    self.padding(items[index + 1] if index + 1 < len(items) else None)
                else:
                    self.value(value)
        elif isinstance(obj, (list, tuple)):
            self.emit(self.packer.pack_array_header(len(obj)))
            for item in obj:
                self.value(item)
        elif isinstance(obj, (bytes, bytearray, memoryview)) and _nbytes(obj) > _INLINE_BIN:
            view = memoryview(obj).cast("B")
            self.emit(b"\xc6" + _U32.pack(view.nbytes))
            self.emit(view)
        else:
            self.emit(self.packer.pack(obj))

    def padding(self, following: tuple[str, Any] | None) -> None:
        if following is None or not isinstance(following[1], (bytes, bytearray, memoryview)):
            raise TypeError("ALIGN_NEXT must be followed by a binary value")
        key, data = following
        size = _nbytes(data)
        data_header = 2 if size < 1 << 8 else 3 if size < 1 << 16 else 5
        start = self.offset + 2 + len(self.packer.pack(key)) + data_header
        self.emit(self.packer.pack(b"\0" * (-start % ALIGNMENT)))


def _nbytes(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def unpack(payload: Buffer, limits: ProtocolLimits = DEFAULT_LIMITS) -> Any:
    """Decode one msgpack object that must span all of ``payload``; ``bin`` → ``memoryview``."""
    reader = _Reader(memoryview(payload).cast("B"), limits)
    value = reader.read(depth=0)
    if reader.pos != len(reader.buf):
        raise ProtocolError(
            f"msgpack: {len(reader.buf) - reader.pos} trailing bytes after the object "
            f"ending at byte {reader.pos}"
        )
    return value


class _Reader:
    """Cursor over a msgpack buffer; one method per family of type bytes."""

    __slots__ = ("buf", "limits", "pos")

    def __init__(self, buf: memoryview, limits: ProtocolLimits) -> None:
        self.buf = buf
        self.pos = 0
        self.limits = limits

    def _take(self, n: int, what: str) -> memoryview:
        start = self.pos
        end = start + n
        if end > len(self.buf):
            raise ProtocolError(
                f"msgpack: truncated {what} at byte {start}: needs {n} bytes, "
                f"{len(self.buf) - start} left"
            )
        self.pos = end
        return self.buf[start:end]

    def _unpack(self, fmt: struct.Struct, what: str) -> Any:
        return fmt.unpack(self._take(fmt.size, what))[0]

    def read(self, depth: int) -> Any:
        if depth > self.limits.max_depth:
            raise ProtocolError(f"msgpack: nesting deeper than {self.limits.max_depth} levels")
        at = self.pos
        if at >= len(self.buf):
            raise ProtocolError(f"msgpack: truncated type byte at byte {at}: needs 1 bytes, 0 left")
        code = self.buf[at]  # the type byte: indexing, not struct, on this hot path
        self.pos = at + 1
        if 0xA0 <= code <= 0xBF:  # fixstr first: map keys are the commonest item
            return self._str(code & 0x1F, at)
        if code <= 0x7F:
            return code
        if code >= 0xE0:
            return code - 0x100
        if 0x80 <= code <= 0x8F:
            return self._map(code & 0x0F, depth, at)
        if 0x90 <= code <= 0x9F:
            return self._array(code & 0x0F, depth, at)
        if code == 0xC0:
            return None
        if code == 0xC2:
            return False
        if code == 0xC3:
            return True
        if code in _INTS:
            return self._unpack(_INTS[code], "integer")
        if code == 0xCA:
            return self._unpack(_F32, "float32")
        if code == 0xCB:
            return self._unpack(_F64, "float64")
        if code in _LENGTHS:
            kind, fmt = _LENGTHS[code]
            length = self._unpack(fmt, f"{kind} length")
            if kind == "bin":
                return self._bin(length, at)
            if kind == "str":
                return self._str(length, at)
            if kind == "array":
                return self._array(length, depth, at)
            return self._map(length, depth, at)
        if code == 0xC1:
            raise ProtocolError(f"msgpack: byte {at} is 0xc1, which msgpack never uses")
        raise ProtocolError(f"msgpack: extension type 0x{code:02x} at byte {at} is not accepted")

    def _bin(self, length: int, at: int) -> memoryview:
        if length > self.limits.max_message_bytes:
            raise ProtocolError(f"msgpack: bin of {length} bytes at byte {at} is above the limit")
        return self._take(length, "bin")

    def _str(self, length: int, at: int) -> str:
        if length > self.limits.max_string_length:
            raise ProtocolError(
                f"msgpack: string of {length} bytes at byte {at} is longer than "
                f"{self.limits.max_string_length}"
            )
        raw = self._take(length, "str")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                f"msgpack: string at byte {at} is not UTF-8: {exc.reason}"
            ) from None

    def _count(self, length: int, kind: str, at: int) -> None:
        if length > self.limits.max_collection_length:
            raise ProtocolError(
                f"msgpack: {kind} of {length} items at byte {at} is above the limit of "
                f"{self.limits.max_collection_length}"
            )
        # Every item takes at least one byte: refuse counts the rest of the buffer cannot hold
        # before allocating anything for them.
        if length > len(self.buf) - self.pos:
            raise ProtocolError(
                f"msgpack: truncated {kind} at byte {at}: claims {length} items, "
                f"{len(self.buf) - self.pos} bytes left"
            )

    def _array(self, length: int, depth: int, at: int) -> list[Any]:
        self._count(length, "array", at)
        return [self.read(depth + 1) for _ in range(length)]

    def _map(self, length: int, depth: int, at: int) -> dict[str, Any]:
        self._count(length, "map", at)
        out: dict[str, Any] = {}
        for _ in range(length):
            key_at = self.pos
            key = self.read(depth + 1)
            if not isinstance(key, str):
                raise ProtocolError(
                    f"msgpack: map key at byte {key_at} is {type(key).__name__}, not str"
                )
            if key in out:
                raise ProtocolError(f"msgpack: duplicate map key {key!r} at byte {key_at}")
            out[key] = self.read(depth + 1)
        return out


def materialize(value: Any) -> Any:
    """``value`` with every binary view copied into ``bytes``, for values kept long after the
    payload they came from (free-form maps), so they do not pin the whole received buffer."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, list):
        return [materialize(v) for v in value]
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    return value

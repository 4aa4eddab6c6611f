"""Chunking of large payloads, and their bounded reassembly.

Brokers cap packet sizes (mosquitto 2.1: 2 MB by default, EMQX and NATS: 1 MB), so every payload
above the chunk size travels as chunk frames. A frame is a fixed 76-byte little-endian header
followed by the chunk's bytes::

    offset size field
         0    4 magic        b"\\xc1EC1": 0xC1 is the one byte msgpack never uses and no JSON
                              text starts with, so a frame is never mistaken for a message
         4   16 message_id   random, the same in every chunk of one message
        20    4 index        0 .. count-1
        24    4 count        ceil(total_size / chunk_size)
        28    8 total_size   bytes of the whole message
        36    4 chunk_size   every chunk but the last carries exactly this many bytes
        40    4 crc32        CRC-32 of the rest of the frame (header fields and data), so
                              any corrupted byte of a frame is caught on its own
        44   32 digest       SHA-256 of the whole message
        76    … data

:class:`Reassembler` takes frames in any order, ignores duplicates (also after completion, for
QoS 1 redeliveries), rejects corrupt or inconsistent frames with a :class:`ChunkError`, keeps the
memory reserved for incomplete messages under a bound and expires messages that stop making
progress. When the bound is reached, messages are admitted in arrival order: the chunks of a
*new* message that does not fit are refused (:class:`ReassemblyFull`) rather than evicting
partial messages that are further along, which under overload (many large messages in flight
at once) would let none of them ever complete; the sender's spool resends the refused message
later. So that one source (topic) cannot hold the whole bound, a source keeps at most half of
it, evicting its own least recently active messages first. A header's declared
size is only a claim: large messages are reassembled in anonymous memory maps, which the
kernel backs with memory only as chunks arrive, so a forged first chunk claiming hundreds of
megabytes costs nothing resident.
"""

from __future__ import annotations

import hashlib
import mmap
import secrets
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.protocol.errors import ChunkError, PayloadTooLarge, ReassemblyFull
from agent.protocol.limits import MiB
from agent.protocol.msgpack_view import Buffer

MAGIC = b"\xc1EC1"
HEADER = struct.Struct("<4s16sIIQII32s")
HEADER_SIZE = HEADER.size
DEFAULT_CHUNK_SIZE = 512 * 1024


def is_chunk(payload: Buffer) -> bool:
    """True when ``payload`` is a chunk frame rather than a whole message."""
    return bytes(memoryview(payload)[:4]) == MAGIC


def chunk_count(total_size: int, chunk_size: int) -> int:
    """How many frames a payload of ``total_size`` bytes becomes."""
    return max(1, -(-total_size // chunk_size))


def split(
    payload: Buffer, chunk_size: int = DEFAULT_CHUNK_SIZE, *, message_id: bytes | None = None
) -> list[bytes]:
    """Cut ``payload`` into chunk frames of at most ``chunk_size`` data bytes each."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    view = memoryview(payload).cast("B")
    total = view.nbytes
    mid = message_id if message_id is not None else secrets.token_bytes(16)
    if len(mid) != 16:
        raise ValueError("message_id must be 16 bytes")
    digest = hashlib.sha256(view).digest()
    count = chunk_count(total, chunk_size)
    return [
        build_frame(
            mid,
            index,
            count,
            total,
            chunk_size,
            digest,
            view[index * chunk_size : (index + 1) * chunk_size],
        )
        for index in range(count)
    ]


def build_frame(
    message_id: bytes,
    index: int,
    count: int,
    total_size: int,
    chunk_size: int,
    digest: bytes,
    data: Buffer,
) -> bytes:
    """One frame with its CRC computed; :func:`split` is the normal way to make frames."""
    head = HEADER.pack(MAGIC, message_id, index, count, total_size, chunk_size, 0, digest)
    crc = _frame_crc(memoryview(head), data)
    return b"".join((head[:_CRC_AT], _CRC.pack(crc), head[_CRC_AT + 4 :], data))


_CRC = struct.Struct("<I")
_CRC_AT = 40


def _frame_crc(head: memoryview, data: Buffer) -> int:
    return zlib.crc32(data, zlib.crc32(head[_CRC_AT + 4 : HEADER_SIZE], zlib.crc32(head[:_CRC_AT])))


@dataclass(frozen=True)
class ChunkHeader:
    """The parsed header of one chunk frame."""

    message_id: bytes
    index: int
    count: int
    total_size: int
    chunk_size: int
    crc32: int
    digest: bytes

    def geometry(self) -> tuple[int, int, int, bytes]:
        """What every chunk of one message must agree on."""
        return (self.count, self.total_size, self.chunk_size, self.digest)


def parse_frame(frame: Buffer) -> tuple[ChunkHeader, memoryview]:
    """Split a frame into its header and data, checking everything a lone frame can show."""
    view = memoryview(frame).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise ChunkError(
            f"chunk frame of {view.nbytes} bytes is shorter than its {HEADER_SIZE}-byte header"
        )
    magic, mid, index, count, total, size, crc, digest = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ChunkError(f"not a chunk frame (magic {magic!r})")
    header = ChunkHeader(mid, index, count, total, size, crc, digest)
    data = view[HEADER_SIZE:]
    if _frame_crc(view, data) != crc:
        raise ChunkError(f"chunk {mid.hex()[:8]}#{index}: CRC-32 mismatch (corrupt frame)")
    if size < 1 or count != chunk_count(total, size):
        raise ChunkError(
            f"chunk {mid.hex()[:8]}: count {count} does not fit {total} bytes in chunks of {size}"
        )
    if index >= count:
        raise ChunkError(f"chunk {mid.hex()[:8]}: index {index} is not below count {count}")
    expected = min(size, total - index * size)
    if data.nbytes != expected:
        raise ChunkError(
            f"chunk {mid.hex()[:8]}#{index}: {data.nbytes} data bytes, expected {expected} "
            "(truncated or padded)"
        )
    return header, data


@dataclass
class ReassemblyStats:
    """Counters a dashboard or a log line can show."""

    completed: int = 0
    duplicates: int = 0
    rejected: int = 0
    expired: int = 0
    evicted: int = 0
    refused: int = 0
    """Messages refused for lack of room (their later chunks are refused too, uncounted here)."""


MAP_ABOVE = 1024 * 1024
"""Messages above this many bytes are reassembled in an anonymous memory map."""


def _reserve(total: int) -> bytearray | mmap.mmap:
    """A zeroed buffer of ``total`` bytes whose pages cost memory only once written."""
    if total <= MAP_ABOVE:
        return bytearray(total)
    try:
        return mmap.mmap(-1, total)
    except (OSError, ValueError) as exc:
        raise ChunkError(f"cannot reserve {total} bytes for a chunked message: {exc}") from None


@dataclass
class _Partial:
    geometry: tuple[int, int, int, bytes]
    buffer: bytearray | mmap.mmap
    received: bytearray
    """One flag per chunk: a byte each, not a set of ints (a forged count is cheap to hold)."""
    missing: int
    last_seen: float
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    """SHA-256 of the chunks ``0 .. hashed-1``: fed as in-order chunks arrive, while their data
    is still in cache, so completion needs no second pass over the whole message."""
    hashed: int = 0


def _hash_in_order(partial: _Partial, data: memoryview, chunk_size: int) -> None:
    """Hash the chunk that was next in order (from its frame), then every chunk after it that
    had arrived out of order (from the message buffer)."""
    partial.hasher.update(data)
    partial.hashed += 1
    count = len(partial.received)
    if partial.hashed < count and partial.received[partial.hashed]:
        with memoryview(partial.buffer) as whole:
            while partial.hashed < count and partial.received[partial.hashed]:
                start = partial.hashed * chunk_size
                partial.hasher.update(whole[start : start + chunk_size])
                partial.hashed += 1


@dataclass
class Reassembler:
    """Rebuilds chunked messages, with bounded memory and a timeout for stalled ones.

    ``add`` returns the whole message (a ``bytearray``, or a ``memoryview`` of a memory map for
    large ones, that the caller now owns) when its last chunk arrives, ``None`` while chunks
    are missing or for a duplicate, and raises :class:`ChunkError` for a frame that cannot
    belong to a good message. Messages are keyed by ``(source, message_id)`` where the source
    is usually the topic.
    """

    max_message_bytes: int = 512 * MiB
    """A message claiming more than this is rejected at its first chunk."""
    max_pending_bytes: int = 1024 * MiB
    """Bytes reserved for incomplete messages never exceed this; a new message that does not
    fit is refused until earlier ones complete or expire."""
    max_pending_messages: int = 256
    """Incomplete messages at most; a new message beyond this is refused."""
    max_pending_per_source: int = 8
    """Incomplete messages of one source (topic) at most; its own least recently active is
    evicted first, so one noisy topic cannot push out the messages of the others."""
    max_chunks: int = 1 << 16
    """Chunks of one message at most (512 MiB in chunks of 8 KiB; senders use 256 KiB–1 MiB)."""
    timeout: float = 60.0
    """Seconds without a new chunk after which an incomplete message is dropped."""
    remember_completed: int = 4096
    """How many completed message ids are remembered to ignore late duplicates ..."""
    remember_seconds: float = 600.0
    """... and for how long (a QoS 1 redelivery can follow a reconnect)."""
    clock: Callable[[], float] = time.monotonic
    stats: ReassemblyStats = field(default_factory=ReassemblyStats)
    on_drop: Callable[[str, str, int], None] | None = None
    """Called as ``on_drop(source, reason, bytes)`` when an incomplete message is given up."""

    _partial: OrderedDict[tuple[str, bytes], _Partial] = field(default_factory=OrderedDict)
    _completed: OrderedDict[tuple[str, bytes], float] = field(default_factory=OrderedDict)
    _refused: OrderedDict[tuple[str, bytes], float] = field(default_factory=OrderedDict)
    """Messages refused for lack of room, by the time of their last chunk: their later chunks
    are refused too (a message admitted half-way could never complete)."""
    _pending_bytes: int = 0

    @property
    def max_pending_bytes_per_source(self) -> int:
        """Bytes one source's incomplete messages may hold: half the bound, so that a forged
        first chunk of a huge declared size never blocks the other sources' traffic."""
        return self.max_pending_bytes // 2

    @property
    def pending_bytes(self) -> int:
        """Bytes currently reserved for incomplete messages."""
        return self._pending_bytes

    @property
    def pending_messages(self) -> int:
        return len(self._partial)

    def add(self, source: str, frame: Buffer) -> bytearray | memoryview | None:
        try:
            return self._add(source, frame)
        except ChunkError:
            self.stats.rejected += 1
            raise

    def _add(self, source: str, frame: Buffer) -> bytearray | memoryview | None:
        now = self.clock()
        self.expire(now)
        header, data = parse_frame(frame)
        key = (source, header.message_id)
        if key in self._completed:
            self.stats.duplicates += 1
            return None
        if key in self._refused:
            self._refused[key] = now
            self._refused.move_to_end(key)
            raise ReassemblyFull(
                f"message {header.message_id.hex()[:8]}: refused earlier for lack of room",
                first=False,
            )
        partial = self._partial.get(key)
        if partial is None:
            partial = self._start(key, header, now)
        elif partial.geometry != header.geometry():
            raise ChunkError(
                f"chunk {header.message_id.hex()[:8]}#{header.index}: count, size or digest "
                "differs from earlier chunks of the same message"
            )
        if partial.received[header.index]:
            self.stats.duplicates += 1
            return None
        offset = header.index * header.chunk_size
        partial.buffer[offset : offset + data.nbytes] = data
        partial.received[header.index] = 1
        partial.missing -= 1
        partial.last_seen = now
        self._partial.move_to_end(key)
        if header.index == partial.hashed:
            _hash_in_order(partial, data, header.chunk_size)
        if partial.missing:
            return None
        self._forget(key)
        if partial.hasher.digest() != header.digest:
            raise ChunkError(
                f"message {header.message_id.hex()[:8]}: SHA-256 of the reassembled "
                f"{header.total_size} bytes does not match"
            )
        self._remember(key, now)
        self.stats.completed += 1
        buffer = partial.buffer
        return buffer if isinstance(buffer, bytearray) else memoryview(buffer)

    def _start(self, key: tuple[str, bytes], header: ChunkHeader, now: float) -> _Partial:
        total = header.total_size
        if total > self.max_message_bytes:
            raise PayloadTooLarge(
                f"chunked message {header.message_id.hex()[:8]} of {total} bytes is above the "
                f"limit of {self.max_message_bytes}"
            )
        if header.count > self.max_chunks:
            raise ChunkError(
                f"chunked message {header.message_id.hex()[:8]} claims {header.count} chunks, "
                f"more than {self.max_chunks} (chunks of {header.chunk_size} bytes are too small)"
            )
        share = self.max_pending_bytes_per_source
        if total > share:
            raise ChunkError(
                f"chunked message {header.message_id.hex()[:8]} of {total} bytes cannot fit the "
                f"reassembly bound of {share} per source"
            )
        own = [k for k in self._partial if k[0] == key[0]]
        own_bytes = sum(len(self._partial[k].buffer) for k in own)
        while own and (len(own) >= self.max_pending_per_source or own_bytes + total > share):
            own_bytes -= self._drop(own.pop(0), "evicted: its source holds too many messages")
            self.stats.evicted += 1
        if self._pending_bytes + total > self.max_pending_bytes or (
            len(self._partial) >= self.max_pending_messages
        ):
            self.stats.refused += 1
            self._refused[key] = now
            while len(self._refused) > self.remember_completed:
                self._refused.popitem(last=False)
            raise ReassemblyFull(
                f"message {header.message_id.hex()[:8]} of {total} bytes refused: "
                f"{self._pending_bytes} of {self.max_pending_bytes} bytes held by "
                f"{len(self._partial)} incomplete messages (its sender will resend it)",
                first=True,
            )
        partial = _Partial(
            header.geometry(), _reserve(total), bytearray(header.count), header.count, now
        )
        self._partial[key] = partial
        self._pending_bytes += total
        return partial

    def expire(self, now: float | None = None) -> int:
        """Drop incomplete messages idle for longer than the timeout; return how many."""
        now = self.clock() if now is None else now
        expired = 0
        while self._partial:
            key, oldest = next(iter(self._partial.items()))
            if now - oldest.last_seen <= self.timeout:
                break
            self._drop(key, f"no chunk for {self.timeout:g} s")
            expired += 1
        self.stats.expired += expired
        while self._refused and next(iter(self._refused.values())) < now - self.timeout:
            self._refused.popitem(last=False)
        while (
            self._completed and next(iter(self._completed.values())) < now - self.remember_seconds
        ):
            self._completed.popitem(last=False)
        return expired

    def _drop(self, key: tuple[str, bytes], reason: str) -> int:
        """Give up an incomplete message; return the bytes it held."""
        partial = self._forget(key)
        if self.on_drop is not None:
            self.on_drop(key[0], f"message {key[1].hex()[:8]}: {reason}", len(partial.buffer))
        return len(partial.buffer)

    def _forget(self, key: tuple[str, bytes]) -> _Partial:
        partial = self._partial.pop(key)
        self._pending_bytes -= len(partial.buffer)
        return partial

    def _remember(self, key: tuple[str, bytes], now: float) -> None:
        self._completed[key] = now
        while len(self._completed) > self.remember_completed:
            self._completed.popitem(last=False)

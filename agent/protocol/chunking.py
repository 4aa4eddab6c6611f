"""Chunking of large payloads, and their bounded reassembly.

Brokers cap packet sizes (mosquitto 2.1: 2 MB by default, EMQX and NATS: 1 MB), so every payload
above the chunk size travels as chunk frames. A frame is a fixed 76-byte little-endian header
followed by the chunk's bytes::

    offset size field
         0    4 magic        b"\\xc1EC3": 0xC1 is the one byte msgpack never uses and no JSON
                              text starts with, so a frame is never mistaken for a message;
                              the last byte is the frame format (3)
         4   16 message_id   random, the same in every chunk of one message
        20    4 index        0 .. count-1
        24    4 count        ceil(total_size / chunk_size)
        28    8 total_size   bytes of the whole message
        36    4 chunk_size   every chunk but the last carries exactly this many bytes
        40    4 check        the chunk's data check continued over the other header fields
                              (:func:`frame_check`), so any corrupted byte of a frame is caught
                              on its own
        44   32 digest       SHA-256 of the message's chunk data checks: the check of each
                              chunk's data, little-endian u32, in index order
        76    … data

Every byte is checked once on each side: the receiver's check of a chunk's data both checks the
frame and feeds the message digest, which covers 4 bytes per chunk. A chunk swapped for other
bytes, or taken from another message with the same id, changes its check and so the digest.

The check is the low 32 bits of XXH3-64 (:func:`frame_check`), chained through its seed. XXH3
runs at 31 GB/s here where CRC-32 (zlib-ng, carry-less multiply) runs at 11-14 GB/s, and the
check is a pass over every byte on both sides: with 1M-parameter updates it was 0.32 ms of the
sender's and as much of the aggregator's time per 4 MB update, a tenth of all the CPU an update
costs on one machine (format 2 used CRC-32). Corruption is what the check is for; a deliberate
forgery by whoever can write the topic is what the broker's ACLs and TLS are for (format 1
hashed the whole message with SHA-256 besides: a fifth of the aggregator's time).

:class:`Reassembler` takes frames in any order, ignores duplicates (also after completion, for
QoS 1 redeliveries), rejects corrupt or inconsistent frames with a :class:`ChunkError`, keeps the
memory reserved for incomplete messages under a bound and expires messages that stop making
progress. When the bound is reached, messages are admitted in arrival order: the chunks of a
*new* message that does not fit are refused (:class:`ReassemblyFull`) rather than evicting
partial messages that are further along, which under overload (many large messages in flight
at once) would let none of them ever complete; the sender's spool resends the refused message
later. So that one source (topic) cannot hold the whole bound, a source keeps at most half of
it, evicting its own least recently active messages first. A header's declared
size is only a claim: past a small budget of ordinary memory (:attr:`Reassembler.eager_bytes`)
messages are reassembled in anonymous memory maps, which the kernel backs with memory only as
chunks arrive, so a forged first chunk claiming hundreds of megabytes costs nothing resident.
"""

from __future__ import annotations

import hashlib
import mmap
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from xxhash import xxh3_64_intdigest

from agent.protocol.errors import ChunkError, PayloadTooLarge, ReassemblyFull
from agent.protocol.limits import MiB
from agent.protocol.msgpack_view import Buffer

MAGIC = b"\xc1EC3"
FAMILY = MAGIC[:3]
"""What every format of frame starts with: :func:`is_chunk` knows a frame of another format
and :func:`parse_frame` refuses it by name, instead of taking it for a message."""
HEADER = struct.Struct("<4s16sIIQII32s")
HEADER_SIZE = HEADER.size
DEFAULT_CHUNK_SIZE = 960 * 1024
"""Data bytes per frame where the broker cannot say what it accepts (MQTT 3.1.1): a frame (with
its header, topic and MQTT framing) stays under 1,000,000 bytes, the smallest default packet
limit among the brokers Ember runs on (EMQX and NATS: 1 MB; mosquitto 2.1: 2 MB), and is as
large as that allows: every frame costs each Python side and the broker a fixed amount besides
its bytes (bench/aggregate measured 1M updates at about 1.2 times the rate in 960 KiB frames as
in 512 KiB ones)."""
MQTT5_CHUNK_SIZE = 4 * 1024 * 1024
"""Data bytes per frame at most over MQTT 5, where the broker's CONNACK states its Maximum Packet
Size, or by leaving it out states that it has none (MQTT 5.0, 3.2.2.3.6): the frame is as large
as the broker allows up to this. A 1M-parameter float32 update (4,000,540 bytes) is one frame
instead of five: bench/aggregate measured its ingest 1.13 to 1.18 times as high with 64
trainers. Larger frames would save little more per byte, and each holds up what follows it on
the broker's connection to the receiver (a receipt, a command) for as long as it takes to
deliver: about 4 ms here at 1 GB/s."""


def is_chunk(payload: Buffer) -> bool:
    """True when ``payload`` is a chunk frame rather than a whole message."""
    return bytes(memoryview(payload)[:3]) == FAMILY


def chunk_count(total_size: int, chunk_size: int) -> int:
    """How many frames a payload of ``total_size`` bytes becomes."""
    return max(1, -(-total_size // chunk_size))


def split(
    payload: Buffer, chunk_size: int = DEFAULT_CHUNK_SIZE, *, message_id: bytes | None = None
) -> list[bytes]:
    """Cut ``payload`` into chunk frames of at most ``chunk_size`` data bytes each."""
    return [
        b"".join((head, data))
        for head, data in split_headers(payload, chunk_size, message_id=message_id)
    ]


def split_headers(
    payload: Buffer, chunk_size: int = DEFAULT_CHUNK_SIZE, *, message_id: bytes | None = None
) -> list[tuple[bytes, memoryview]]:
    """:func:`split`'s frames as (header, view of the data) pairs, for a sender that writes
    the two side by side (``sendmsg``) instead of copying the data into one frame."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    view = memoryview(payload).cast("B")
    total = view.nbytes
    mid = message_id if message_id is not None else secrets.token_bytes(16)
    if len(mid) != 16:
        raise ValueError("message_id must be 16 bytes")
    count = chunk_count(total, chunk_size)
    pieces = [view[index * chunk_size : (index + 1) * chunk_size] for index in range(count)]
    checks = [frame_check(piece) for piece in pieces]
    digest = check_digest(checks)
    return [
        (frame_header(mid, index, count, total, chunk_size, digest, check), piece)
        for index, (piece, check) in enumerate(zip(pieces, checks, strict=True))
    ]


def frame_check(data: Buffer, seed: int = 0) -> int:
    """The 32-bit check of a frame's bytes: the low half of their XXH3-64 with ``seed``
    (the check of the bytes before, when a check goes on over more of them)."""
    return xxh3_64_intdigest(data, seed) & 0xFFFFFFFF


def check_digest(checks: list[int]) -> bytes:
    """The message digest of a frame header: SHA-256 of the chunks' data checks in order."""
    return hashlib.sha256(struct.pack(f"<{len(checks)}I", *checks)).digest()


def build_frame(
    message_id: bytes,
    index: int,
    count: int,
    total_size: int,
    chunk_size: int,
    digest: bytes,
    data: Buffer,
    *,
    data_check: int | None = None,
) -> bytes:
    """One frame with its check computed (from ``data_check``, the :func:`frame_check` of
    ``data``, when the caller has it); :func:`split` is the normal way to make frames."""
    check = frame_check(data) if data_check is None else data_check
    head = frame_header(message_id, index, count, total_size, chunk_size, digest, check)
    return b"".join((head, data))


def frame_header(
    message_id: bytes,
    index: int,
    count: int,
    total_size: int,
    chunk_size: int,
    digest: bytes,
    data_check: int,
) -> bytes:
    """A frame's header, its check computed from ``data_check`` (the check of its data)."""
    head = bytearray(
        HEADER.pack(MAGIC, message_id, index, count, total_size, chunk_size, 0, digest)
    )
    _CHECK.pack_into(head, _CHECK_AT, _frame_check(memoryview(head), data_check))
    return bytes(head)


_CHECK = struct.Struct("<I")
_CHECK_AT = 40


def _frame_check(head: memoryview, data_check: int) -> int:
    """The frame's check: over the data (``data_check``), then the header without its check."""
    return frame_check(head[_CHECK_AT + 4 : HEADER_SIZE], frame_check(head[:_CHECK_AT], data_check))


@dataclass(frozen=True)
class ChunkHeader:
    """The parsed header of one chunk frame."""

    message_id: bytes
    index: int
    count: int
    total_size: int
    chunk_size: int
    check: int
    digest: bytes
    data_check: int
    """The check of the chunk's data (computed on parsing; it feeds the message digest)."""

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
    return parse_parts(view[:HEADER_SIZE], view[HEADER_SIZE:])


def parse_parts(head: memoryview, data: memoryview) -> tuple[ChunkHeader, memoryview]:
    """:func:`parse_frame` for a frame whose header (``HEADER_SIZE`` bytes) and data lie in
    different buffers (the data received in place: :meth:`Reassembler.place`)."""
    magic, mid, index, count, total, size, check, digest = HEADER.unpack_from(head)
    if magic != MAGIC:
        if magic[:3] == FAMILY:
            raise ChunkError(
                f"chunk frame of format {chr(magic[3])!r} (this receiver reads format "
                f"{chr(MAGIC[3])!r}): sender and receiver run different Ember releases"
            )
        raise ChunkError(f"not a chunk frame (magic {magic!r})")
    data_check = frame_check(data)
    header = ChunkHeader(mid, index, count, total, size, check, digest, data_check)
    if _frame_check(head, data_check) != check:
        raise ChunkError(f"chunk {mid.hex()[:8]}#{index}: check mismatch (corrupt frame)")
    problem = _geometry_problem(mid, index, count, total, size, data.nbytes)
    if problem is not None:
        raise ChunkError(problem)
    return header, data


def _geometry_problem(
    mid: bytes, index: int, count: int, total: int, size: int, nbytes: int
) -> str | None:
    """Why a frame's count, index, chunk size and ``nbytes`` of data cannot fit together, or
    ``None`` (checked on every frame, and before its data is received in place)."""
    if size < 1 or count != chunk_count(total, size):
        return (
            f"chunk {mid.hex()[:8]}: count {count} does not fit {total} bytes in chunks of {size}"
        )
    if index >= count:
        return f"chunk {mid.hex()[:8]}: index {index} is not below count {count}"
    expected = min(size, total - index * size)
    if nbytes != expected:
        return (
            f"chunk {mid.hex()[:8]}#{index}: {nbytes} data bytes, expected {expected} "
            "(truncated or padded)"
        )
    return None


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
    placed: int = 0
    """Chunks whose data was received straight into their message (:meth:`Reassembler.place`)."""


def _reserve(total: int, eager: bool) -> memoryview:
    """A buffer of ``total`` bytes that the chunks will fill: ordinary memory when ``eager``
    (uninitialised, from pages the allocator usually already has: zeroing a ``bytearray``
    first cost a pass over every byte), else an anonymous memory map whose pages cost memory
    only once written (and a page fault each: a third of the copy's speed)."""
    if eager:
        import numpy as np  # only once a chunked message arrives: an idle agent never maps it

        return np.empty(total, np.uint8).data
    try:
        return memoryview(mmap.mmap(-1, total))
    except (OSError, ValueError) as exc:
        raise ChunkError(f"cannot reserve {total} bytes for a chunked message: {exc}") from None


@dataclass
class _Partial:
    geometry: tuple[int, int, int, bytes]
    buffer: memoryview
    eager: bool
    """``buffer`` is ordinary memory (counted against ``eager_bytes``), not a memory map."""
    received: bytearray
    """One flag per chunk (``MISSING``, ``PLACING``, ``RECEIVED``): a byte each, not a set of
    ints (a forged count is cheap to hold)."""
    missing: int
    last_seen: float
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    """SHA-256 of the data checks of chunks ``0 .. hashed-1``, fed as chunks arrive in order."""
    hashed: int = 0
    early: dict[int, int] = field(default_factory=dict)
    """Data checks of chunks that arrived ahead of ``hashed``, until their turn (bounded by the
    chunks actually received, never by a declared count)."""


def _hash_in_order(partial: _Partial, index: int, data_check: int) -> None:
    """Feed chunk ``index``'s data check to the message digest, in index order: now if it is
    next, with every chunk after it that came early; else later."""
    if index != partial.hashed:
        partial.early[index] = data_check
        return
    partial.hasher.update(_CHECK.pack(data_check))
    partial.hashed += 1
    while partial.hashed in partial.early:
        partial.hasher.update(_CHECK.pack(partial.early.pop(partial.hashed)))
        partial.hashed += 1


MISSING, PLACING, RECEIVED = 0, 1, 2
"""A chunk's state in its message: not here, being received in place (:meth:`Reassembler.
place`), here and checked."""


@dataclass
class Reassembler:
    """Rebuilds chunked messages, with bounded memory and a timeout for stalled ones.

    ``add`` returns the whole message (a ``memoryview`` of ordinary memory, or of a memory map
    for large ones, that the caller now owns) when its last chunk arrives, ``None`` while chunks
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
    eager_bytes: int = 128 * MiB
    """Incomplete messages are held in ordinary memory while together they fit in this many
    bytes; beyond it in anonymous memory maps. So a forged first chunk claiming a huge size
    costs at most this much resident memory, and honest traffic (a few updates of a few MB in
    flight) is copied into pages that need no fault. A role expecting more at once raises it
    with the room it makes (:meth:`agent.transport.Transport.make_room`)."""
    max_chunks: int = 1 << 16
    """Chunks of one message at most (512 MiB in chunks of 8 KiB; senders use 256 KiB–1 MiB)."""
    timeout: float = 60.0
    """Seconds without a new chunk after which an incomplete message is dropped."""
    remember_completed: int = 4096
    """How many completed message ids are remembered to ignore late duplicates ..."""
    remember_seconds: float = 600.0
    """... and for how long (a QoS 1 redelivery can follow a reconnect)."""
    place_max_bytes: int = 32 * MiB
    """Messages up to this size have their chunks' data received in place (:meth:`place`);
    larger ones are copied. A buffer that large is a fresh memory map (glibc serves no more than
    32 MiB from its heap, ``agent.memory``), and the kernel faulting its pages in while it
    receives into them cost more than copying into them: bench/aggregate's 11M updates (44 MB)
    went at about 530 MB/s placed and 690 copied, the 1M ones (4 MB, heap pages already
    touched) some 10 % faster placed."""
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
    _eager_pending: int = 0

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

    def add(self, source: str, frame: Buffer) -> memoryview | None:
        try:
            header, data = parse_frame(frame)
        except ChunkError:
            self.stats.rejected += 1
            raise
        return self._add(source, header, data)

    def place(self, source: str, head: memoryview, nbytes: int) -> memoryview | None:
        """Where the ``nbytes`` data bytes of the frame with header ``head`` may be received:
        their place in the buffer of the message they belong to, so a receiver reads them
        there (``recv_into``) instead of into a packet and then copying them. ``None`` when
        the frame must come whole through :meth:`add` instead, which says why if it is bad:
        a doubtful header, a chunk already here or on its way, a message already done or
        refused, a new message that does not fit without evicting or refusing.

        The receiver then hands the header and the filled place to :meth:`add_placed`, which
        checks the chunk as :meth:`add` does. What is placed is trusted no more than a copy:
        until ``add_placed`` accepts it, the chunk counts as missing. A chunk sent again while
        its first copy is still being received in place may be written twice; both copies
        come from the one publisher the topic's ACL allows, which could send a bad update
        anyway, and the message digest covers the chunks' checks as they were accepted."""
        if head.nbytes != HEADER_SIZE:
            return None
        magic, mid, index, count, total, size, check, digest = HEADER.unpack_from(head)
        problem = _geometry_problem(mid, index, count, total, size, nbytes)
        if magic != MAGIC or problem is not None:
            return None
        key = (source, mid)
        if key in self._completed or key in self._refused:
            return None
        if total > self.place_max_bytes:
            return None
        partial = self._partial.get(key)
        if partial is None:
            if not self._fits(key, total, count):
                return None
            header = ChunkHeader(mid, index, count, total, size, check, digest, 0)
            partial = self._start(key, header, self.clock())
        elif partial.geometry != (count, total, size, digest):
            return None
        if not partial.eager:
            return None
        if partial.received[index] != MISSING:
            return None
        partial.received[index] = PLACING
        self.stats.placed += 1
        return partial.buffer[index * size : index * size + nbytes]

    def add_placed(self, source: str, head: memoryview, data: memoryview) -> memoryview | None:
        """:meth:`add` for a frame whose data :meth:`place` had received in place: checked the
        same way, not copied (unless its message was dropped and began again meanwhile)."""
        # Missing again until checked, as a copied chunk is: accepted below, or taken when
        # it is sent again if it fails its checks.
        self._unplace(source, head)
        try:
            if head.nbytes != HEADER_SIZE:
                raise ChunkError(f"chunk header of {head.nbytes} bytes, not {HEADER_SIZE}")
            header, data = parse_parts(head, data)
        except ChunkError:
            self.stats.rejected += 1
            raise
        return self._add(source, header, data)

    def _unplace(self, source: str, head: memoryview) -> None:
        """The chunk ``head`` names counts as missing again if it was being placed."""
        if head.nbytes != HEADER_SIZE:
            return
        _magic, mid, index, *_rest = HEADER.unpack_from(head)
        partial = self._partial.get((source, mid))
        if (
            partial is not None
            and index < len(partial.received)
            and partial.received[index] == PLACING
        ):
            partial.received[index] = MISSING

    def _fits(self, key: tuple[str, bytes], total: int, count: int) -> bool:
        """Whether a new message of ``total`` bytes in ``count`` chunks can start now without
        refusing it or evicting another (:meth:`_start` would not raise or evict)."""
        share = self.max_pending_bytes_per_source
        if total > self.max_message_bytes or count > self.max_chunks or total > share:
            return False
        if self._pending_bytes + total > self.max_pending_bytes:
            return False
        if len(self._partial) >= self.max_pending_messages:
            return False
        own = [p for k, p in self._partial.items() if k[0] == key[0]]
        return (
            len(own) < self.max_pending_per_source
            and sum(len(p.buffer) for p in own) + total <= share
        )

    def _add(self, source: str, header: ChunkHeader, data: memoryview) -> memoryview | None:
        try:
            return self._accept(source, header, data)
        except ChunkError:
            self.stats.rejected += 1
            raise

    def _accept(self, source: str, header: ChunkHeader, data: memoryview) -> memoryview | None:
        now = self.clock()
        self.expire(now)
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
        if partial.received[header.index] == RECEIVED:
            self.stats.duplicates += 1
            return None
        if data.obj is not partial.buffer.obj:  # not received in place (add_placed)
            offset = header.index * header.chunk_size
            partial.buffer[offset : offset + data.nbytes] = data
        partial.received[header.index] = RECEIVED
        partial.missing -= 1
        partial.last_seen = now
        self._partial.move_to_end(key)
        _hash_in_order(partial, header.index, header.data_check)
        if partial.missing:
            return None
        self._forget(key)
        if partial.hasher.digest() != header.digest:
            raise ChunkError(
                f"message {header.message_id.hex()[:8]}: the digest of the reassembled "
                f"{header.total_size} bytes' chunk checks does not match"
            )
        self._remember(key, now)
        self.stats.completed += 1
        return partial.buffer

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
        eager = self._eager_pending + total <= self.eager_bytes
        partial = _Partial(
            header.geometry(),
            _reserve(total, eager),
            eager,
            bytearray(header.count),
            header.count,
            now,
        )
        self._partial[key] = partial
        self._pending_bytes += total
        if eager:
            self._eager_pending += total
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
        if partial.eager:
            self._eager_pending -= len(partial.buffer)
        return partial

    def _remember(self, key: tuple[str, bytes], now: float) -> None:
        self._completed[key] = now
        while len(self._completed) > self.remember_completed:
            self._completed.popitem(last=False)

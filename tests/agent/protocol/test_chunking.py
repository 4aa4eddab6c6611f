"""Property tests of chunking and reassembly: every failure mode the wire can produce."""

from __future__ import annotations

import hashlib
import mmap
import struct

import numpy as np
import pytest
import xxhash
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.protocol.chunking import (
    HEADER_SIZE,
    MAGIC,
    Reassembler,
    build_frame,
    check_digest,
    chunk_count,
    is_chunk,
    parse_frame,
    split,
)
from agent.protocol.errors import ChunkError, PayloadTooLarge, ReassemblyFull
from agent.protocol.messages import Ping


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


payloads = st.binary(min_size=0, max_size=4000)
chunk_sizes = st.integers(min_value=1, max_value=700)


def feed(reassembler: Reassembler, frames: list[bytes], source: str = "t") -> list[memoryview]:
    done = []
    for frame in frames:
        whole = reassembler.add(source, frame)
        if whole is not None:
            done.append(whole)
    return done


@given(payloads, chunk_sizes, st.randoms(use_true_random=False))
def test_any_order_round_trip(payload: bytes, chunk_size: int, rnd: object) -> None:
    frames = split(payload, chunk_size)
    assert len(frames) == chunk_count(len(payload), chunk_size)
    assert all(is_chunk(f) for f in frames)
    rnd.shuffle(frames)  # type: ignore[attr-defined]
    r = Reassembler()
    done = feed(r, frames)
    assert done == [bytearray(payload)]
    assert r.pending_bytes == 0
    assert r.pending_messages == 0
    assert r.stats.completed == 1


@given(
    payloads,
    chunk_sizes,
    st.lists(st.integers(min_value=0), min_size=1, max_size=20),
    st.randoms(use_true_random=False),
)
def test_duplicates_are_ignored_before_and_after_completion(
    payload: bytes, chunk_size: int, picks: list[int], rnd: object
) -> None:
    frames = split(payload, chunk_size)
    duplicated = frames + [frames[i % len(frames)] for i in picks]
    rnd.shuffle(duplicated)  # type: ignore[attr-defined]
    r = Reassembler()
    done = feed(r, duplicated)
    assert done == [bytearray(payload)]
    assert r.stats.duplicates == len(picks)
    # A QoS 1 redelivery of the whole message after completion is still ignored.
    assert feed(r, frames) == []
    assert r.pending_messages == 0


@given(st.binary(min_size=2, max_size=3000), chunk_sizes, st.data())
def test_missing_chunk_never_completes_and_expires(
    payload: bytes, chunk_size: int, data: st.DataObject
) -> None:
    frames = split(payload, chunk_size)
    assume(len(frames) >= 2)
    missing = data.draw(st.integers(0, len(frames) - 1))
    clock = FakeClock()
    dropped: list[str] = []
    r = Reassembler(timeout=30, clock=clock, on_drop=lambda src, why, size: dropped.append(why))
    assert feed(r, frames[:missing] + frames[missing + 1 :]) == []
    assert r.pending_messages == 1
    assert r.pending_bytes == len(payload)
    clock.now += 29
    assert r.expire() == 0
    clock.now += 2
    assert r.expire() == 1
    assert r.pending_bytes == 0
    assert r.stats.expired == 1
    assert dropped
    assert "no chunk for 30 s" in dropped[0]
    # The late chunk alone now starts a fresh (incomplete) message instead of completing one.
    assert feed(r, [frames[missing]]) == []


@given(st.binary(min_size=1, max_size=2000), chunk_sizes, st.data())
def test_truncated_frames_are_rejected(
    payload: bytes, chunk_size: int, data: st.DataObject
) -> None:
    frames = split(payload, chunk_size)
    frame = data.draw(st.sampled_from(frames))
    cut = data.draw(st.integers(0, len(frame) - 1))
    r = Reassembler()
    with pytest.raises(ChunkError):
        r.add("t", frame[:cut])
    assert r.stats.rejected == 1
    assert r.pending_messages == 0


@given(st.binary(min_size=1, max_size=2000), chunk_sizes, st.data())
def test_corrupted_data_is_rejected_by_its_checksum(
    payload: bytes, chunk_size: int, data: st.DataObject
) -> None:
    frames = split(payload, chunk_size)
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    position = data.draw(st.integers(HEADER_SIZE, len(frame) - 1))
    frame[position] ^= data.draw(st.integers(1, 255))
    r = Reassembler()
    with pytest.raises(ChunkError, match="check mismatch"):
        r.add("t", bytes(frame))
    assert r.pending_messages == 0
    # The good copy of the same chunk is still accepted, and the message completes.
    assert feed(r, frames) == [bytearray(payload)]


@given(st.binary(min_size=1, max_size=2000), chunk_sizes, st.data())
def test_corrupted_headers_are_rejected(
    payload: bytes, chunk_size: int, data: st.DataObject
) -> None:
    frames = split(payload, chunk_size)
    frame = bytearray(data.draw(st.sampled_from(frames)))
    # Flip one byte anywhere in the header: magic, id, index, count, sizes, check or digest.
    position = data.draw(st.integers(0, HEADER_SIZE - 1))
    frame[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ChunkError):
        Reassembler().add("t", bytes(frame))


def test_a_wrong_digest_fails_the_whole_message() -> None:
    """Frames that are each well formed but whose digest does not match their sum."""
    payload = bytes(range(256)) * 10
    view = memoryview(payload)
    frames = [
        build_frame(b"\x04" * 16, i, 3, 2560, 1000, b"\xee" * 32, view[i * 1000 : (i + 1) * 1000])
        for i in range(3)
    ]
    r = Reassembler()
    with pytest.raises(
        ChunkError, match="digest of the reassembled 2560 bytes' chunk checks does not match"
    ):
        feed(r, frames)
    assert r.pending_bytes == 0


@given(
    st.binary(min_size=2, max_size=3000),
    st.integers(1, 300),
    st.integers(min_value=0),
    st.randoms(use_true_random=False),
)
def test_one_substituted_chunk_in_any_order_fails_the_digest(
    payload: bytes, chunk_size: int, which: int, rnd: object
) -> None:
    """The digest is fed as chunks arrive (in order, early ones when their turn comes): a chunk
    whose data was swapped for other bytes, its frame check redone to match, is caught whatever
    the arrival order."""
    frames = split(payload, chunk_size)
    header, data = parse_frame(frames[which % len(frames)])
    forged = bytes(b ^ 0xFF for b in data)
    frames[header.index] = build_frame(
        header.message_id,
        header.index,
        header.count,
        header.total_size,
        chunk_size,
        header.digest,
        forged,
    )
    rnd.shuffle(frames)  # type: ignore[attr-defined]
    r = Reassembler()
    with pytest.raises(ChunkError, match="chunk checks does not match"):
        feed(r, frames)
    assert r.pending_bytes == 0


@given(st.binary(min_size=10, max_size=2000), st.integers(1, 200))
def test_chunks_of_two_messages_sharing_an_id_are_inconsistent(
    payload: bytes, chunk_size: int
) -> None:
    mid = b"\x01" * 16
    first = split(payload, chunk_size, message_id=mid)
    assume(len(first) >= 2)
    other = split(payload[::-1] + b"x", chunk_size, message_id=mid)
    r = Reassembler()
    assert r.add("t", first[0]) is None
    with pytest.raises(ChunkError, match="differs from earlier chunks"):
        r.add("t", other[1])


def test_same_id_on_different_sources_does_not_mix() -> None:
    mid = b"\x02" * 16
    a, b = split(b"a" * 100, 30, message_id=mid), split(b"b" * 100, 30, message_id=mid)
    r = Reassembler()
    got = feed(r, [x for pair in zip(a, b, strict=True) for x in pair][::2], source="ta")
    got += feed(r, b[1::2] + b[::2], source="tb")
    got += feed(r, a[1::2], source="ta")
    assert sorted(map(bytes, got)) == [b"a" * 100, b"b" * 100]


@given(
    st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=12),
    st.integers(50, 200),
    st.randoms(use_true_random=False),
)
def test_interleaved_messages_all_complete(
    messages: list[bytes], chunk_size: int, rnd: object
) -> None:
    frames = [f for m in messages for f in split(m, chunk_size)]
    rnd.shuffle(frames)  # type: ignore[attr-defined]
    r = Reassembler()
    assert sorted(map(bytes, feed(r, frames))) == sorted(messages)


def test_oversize_message_is_refused_at_its_first_chunk() -> None:
    frames = split(b"x" * 5000, 1000)
    r = Reassembler(max_message_bytes=4999)
    with pytest.raises(PayloadTooLarge, match="of 5000 bytes is above the limit of 4999"):
        r.add("t", frames[3])
    assert r.pending_bytes == 0


def test_forged_huge_size_is_refused_without_allocating() -> None:
    forged = build_frame(b"\x03" * 16, 0, 2**31, 2**40, 512, b"\0" * 32, b"x" * 512)
    with pytest.raises(PayloadTooLarge, match="1099511627776 bytes"):
        Reassembler().add("t", forged)
    inconsistent = build_frame(b"\x03" * 16, 0, 7, 2**20, 512, b"\0" * 32, b"x" * 512)
    with pytest.raises(ChunkError, match="count 7 does not fit 1048576 bytes"):
        Reassembler().add("t", inconsistent)


@given(
    st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 3)), min_size=1, max_size=30),
    st.integers(2000, 9000),
)
def test_memory_for_incomplete_messages_stays_bounded(
    sizes: list[tuple[int, int]], bound: int
) -> None:
    """Many incomplete messages never hold more than the bound: what does not fit is refused,
    and a message above a source's share (half the bound) is rejected outright."""
    r = Reassembler(max_pending_bytes=bound, max_pending_messages=5)
    for n, (size, _) in enumerate(sizes):
        frames = split(bytes([n % 256]) * size, 500)
        held = r.pending_messages
        if size > bound // 2:
            with pytest.raises(ChunkError, match="cannot fit the reassembly bound"):
                r.add(f"s{n}", frames[0])
        elif len(frames) > 1:
            if r.pending_bytes + size > bound or held >= 5:
                with pytest.raises(ReassemblyFull, match="refused"):
                    r.add(f"s{n}", frames[0])
                assert r.pending_messages == held  # nothing further along was evicted
            else:
                assert r.add(f"s{n}", frames[0]) is None  # first chunk only: stays incomplete
        assert r.pending_bytes <= bound
        assert r.pending_messages <= 5
    assert r.stats.evicted == 0


def test_a_new_message_is_refused_rather_than_evicting_partial_ones() -> None:
    """Regression (bench: 32 trainers x 44 MB updates into a 1 GiB bound): evicting the oldest
    partial message for each new one let none complete while senders kept resending."""
    r = Reassembler(max_pending_bytes=3000)
    a, b, c = (split(bytes([i]) * 1500, 500) for i in range(3))
    r.add("a", a[0])
    r.add("b", b[0])
    with pytest.raises(ReassemblyFull, match="refused: 3000 of 3000 bytes") as refused:
        r.add("c", c[0])
    assert refused.value.first
    assert feed(r, a[1:], source="a") == [bytearray(b"\x00" * 1500)]
    # c's later chunks stay refused (admitted half-way it could never complete) ...
    with pytest.raises(ReassemblyFull) as later:
        r.add("c", c[1])
    assert not later.value.first
    assert feed(r, b[1:], source="b") == [bytearray(b"\x01" * 1500)]
    # ... and its sender's resend (a new message id) is admitted now that there is room.
    assert feed(r, split(bytes([2]) * 1500, 500), source="c") == [bytearray(b"\x02" * 1500)]
    assert (r.stats.evicted, r.stats.refused, r.stats.completed) == (0, 1, 3)


@given(st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_many_senders_of_messages_above_their_share_all_complete(senders: int, seed: int) -> None:
    """N senders each send messages larger than 2 x bound / N, chunks interleaved in random
    order; a refused sender resends (a new message id) a few rounds later, as the trainer's
    spool does. Every sender's message completes within a bounded number of rounds."""
    import random

    rnd = random.Random(seed)
    bound, chunk = 12_000, 500
    size = 2 * bound // senders + 1 + rnd.randrange(bound // senders)
    size = min(size, bound // 2)
    r = Reassembler(max_pending_bytes=bound)
    pending = {f"s{n}": split(bytes([n]) * size, chunk) for n in range(senders)}
    position = dict.fromkeys(pending, 0)
    wait_until = dict.fromkeys(pending, 0)
    done: set[str] = set()
    for step in range(200 * senders):
        if len(done) == senders:
            break
        ready = [s for s in pending if s not in done and wait_until[s] <= step]
        if not ready:
            continue
        source = rnd.choice(ready)
        try:
            whole = r.add(source, pending[source][position[source]])
        except ReassemblyFull:
            pending[source] = split(bytes([int(source[1:])]) * size, chunk)  # resent later
            position[source] = 0
            wait_until[source] = step + senders
            continue
        position[source] += 1
        if whole is not None:
            assert whole == bytes([int(source[1:])]) * size
            done.add(source)
    assert done == set(pending), f"{len(done)} of {senders} completed"
    assert r.stats.evicted == 0
    assert r.pending_bytes == 0


def test_parse_frame_reports_header_fields() -> None:
    frames = split(b"hello world", 4, message_id=b"\x07" * 16)
    header, data = parse_frame(frames[2])
    assert (header.index, header.count, header.total_size, header.chunk_size) == (2, 3, 11, 4)
    assert bytes(data) == b"rld"
    assert header.message_id == b"\x07" * 16


def test_frames_are_never_mistaken_for_messages() -> None:
    frame = split(b"x" * 10, 4)[0]
    assert frame[:1] == b"\xc1"  # never a msgpack type byte, never JSON
    assert not is_chunk(Ping().to_msgpack())
    assert not is_chunk(b'{"v":1}')
    assert struct.unpack_from("<4s", frame)[0] == MAGIC


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        split(b"x", 0)
    with pytest.raises(ValueError, match="16 bytes"):
        split(b"x", 1, message_id=b"short")


def test_a_duplicate_before_completion_is_counted_and_changes_nothing() -> None:
    frames = split(b"abcdefghij", 4)
    r = Reassembler()
    assert r.add("t", frames[0]) is None
    assert r.add("t", frames[0]) is None
    assert r.stats.duplicates == 1
    assert r.pending_messages == 1
    assert feed(r, frames[1:]) == [bytearray(b"abcdefghij")]


def test_forged_frames_with_a_valid_check_are_still_checked() -> None:
    """A frame can carry a correct check and still lie about where it belongs."""
    mid, digest = b"\x05" * 16, b"\0" * 32
    with pytest.raises(ChunkError, match="index 3 is not below count 3"):
        Reassembler().add("t", build_frame(mid, 3, 3, 10, 4, digest, b"ab"))
    with pytest.raises(ChunkError, match=r"7 data bytes, expected 4 \(truncated or padded\)"):
        Reassembler().add("t", build_frame(mid, 0, 3, 10, 4, digest, b"abcdefg"))
    with pytest.raises(ChunkError, match=r"1 data bytes, expected 2"):
        Reassembler().add("t", build_frame(mid, 2, 3, 10, 4, digest, b"a"))


def test_the_number_of_incomplete_messages_is_bounded_too() -> None:
    r = Reassembler(max_pending_messages=5)
    for n in range(10):
        frame = split(bytes(600), 500)[0]
        if n < 5:
            r.add(f"s{n}", frame)
        else:
            with pytest.raises(ReassemblyFull, match="held by 5 incomplete messages"):
                r.add(f"s{n}", frame)
    assert r.pending_messages == 5
    assert (r.stats.evicted, r.stats.refused) == (0, 5)


def test_a_huge_forged_first_chunk_holds_at_most_its_sources_share() -> None:
    """A forged first chunk claiming a huge size can hold only half the bound (until it
    expires); honest messages of the other sources still fit in the rest."""
    clock = FakeClock()
    r = Reassembler(max_pending_bytes=10_000, timeout=60, clock=clock)
    with pytest.raises(ChunkError, match="reassembly bound of 5000 per source"):
        r.add("hostile", build_frame(b"\x01" * 16, 0, 20, 10_000, 500, b"\0" * 32, bytes(500)))
    for n in range(3):  # each forged message evicts the same source's previous one
        r.add("hostile", build_frame(bytes([n]) * 16, 0, 10, 5000, 500, b"\0" * 32, bytes(500)))
    assert r.pending_bytes == 5000
    assert r.stats.evicted == 2
    honest = split(bytes(range(256)) * 16, 500)
    assert feed(r, honest, source="honest") == [bytearray(bytes(range(256)) * 16)]
    clock.now += 61  # and the forged one expires
    assert feed(r, split(bytes(4000), 500), source="other") == [bytearray(4000)]
    assert r.pending_messages == 0


def test_a_frame_without_the_magic_is_named_as_such() -> None:
    frame = bytearray(split(b"x" * 10, 4)[0])
    frame[1:4] = b"XYZ"
    with pytest.raises(ChunkError, match="not a chunk frame"):
        parse_frame(bytes(frame))


def test_a_forged_huge_first_chunk_costs_no_resident_memory() -> None:
    """Regression (hostile-input fuzzing): the first chunk of a message claiming 400 MiB used to
    allocate and zero 400 MiB at once; now only what arrives is backed by memory."""
    import psutil

    process = psutil.Process()
    total, size = 400 * 1024 * 1024, 512 * 1024
    count = chunk_count(total, size)
    forged = [
        build_frame(bytes([n]) * 16, 0, count, total, size, b"\0" * 32, bytes(size))
        for n in range(2)
    ]
    before = process.memory_info().rss
    r = Reassembler(max_message_bytes=512 * 1024 * 1024)
    for n, frame in enumerate(forged):
        r.add(f"hostile-{n}", frame)
    grown = process.memory_info().rss - before
    assert r.pending_messages == 2
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_a_noisy_source_evicts_its_own_incomplete_messages_first() -> None:
    r = Reassembler(max_pending_per_source=3)
    honest = split(bytes(1500), 500)
    r.add("honest", honest[0])
    for n in range(10):
        r.add("noisy", split(bytes([n]) * 1500, 500)[0])
    assert r.pending_messages == 4
    assert r.stats.evicted == 7
    assert feed(r, honest[1:], source="honest") == [bytearray(1500)]


def test_messages_past_the_eager_budget_reassemble_from_a_memory_map() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB
    [eager] = feed(Reassembler(), split(payload, 300_000))
    assert isinstance(eager.obj, np.ndarray)
    assert eager == payload
    [mapped] = feed(Reassembler(eager_bytes=1024 * 1024), split(payload, 300_000))
    assert isinstance(mapped.obj, mmap.mmap)
    assert mapped == payload


def test_the_eager_budget_counts_incomplete_messages_only() -> None:
    r = Reassembler(eager_bytes=5000)
    first, second = split(bytes(3000), 1000), split(bytes(3000), 1000)
    r.add("a", first[0])
    assert r._eager_pending == 3000
    feed(r, second[:1], source="b")  # does not fit beside the first: mapped
    assert r._eager_pending == 3000
    assert isinstance(feed(r, first[1:], source="a")[0].obj, np.ndarray)
    assert r._eager_pending == 0
    assert isinstance(feed(r, second[1:], source="b")[0].obj, mmap.mmap)


def test_a_forged_chunk_count_is_bounded() -> None:
    """Regression (hostile-input fuzzing): a 76-byte frame claiming 256 MiB in 1-byte chunks made
    the reassembler build a set of 268 million chunk indices."""
    total = 256 * 1024 * 1024
    forged = build_frame(b"\x09" * 16, 0, total, total, 1, b"\0" * 32, b"x")
    with pytest.raises(ChunkError, match="claims 268435456 chunks, more than 65536"):
        Reassembler().add("t", forged)


def test_a_frame_of_another_format_is_refused_by_name() -> None:
    """A sender on an older release (format 2: CRC-32 checks; format 1: its CRC covered the
    header first) is told apart from garbage, not taken for a whole message."""
    for older in "21":
        frame = bytearray(split(b"x" * 100, 40)[0])
        frame[3] = ord(older)
        assert is_chunk(bytes(frame))
        with pytest.raises(
            ChunkError,
            match=rf"chunk frame of format '{older}' \(this receiver reads format '3'\)",
        ):
            Reassembler().add("t", bytes(frame))


def test_each_frame_carries_its_datas_check_and_the_digest_of_all() -> None:
    payload = bytes(range(256)) * 3
    frames = split(payload, 100)
    headers = [parse_frame(f)[0] for f in frames]
    # The low 32 bits of XXH3-64 (format 3), computed here by xxhash itself.
    checks = [
        xxhash.xxh3_64_intdigest(payload[i * 100 : (i + 1) * 100]) & 0xFFFFFFFF
        for i in range(len(frames))
    ]
    assert [h.data_check for h in headers] == checks
    assert {h.digest for h in headers} == {check_digest(checks)}
    assert check_digest(checks) == hashlib.sha256(struct.pack("<8I", *checks)).digest()
    # The frame's own check goes on over its header, the check field left out.
    frame = frames[1]
    assert (
        struct.unpack_from("<I", frame, 40)[0]
        == xxhash.xxh3_64_intdigest(
            frame[44:76], xxhash.xxh3_64_intdigest(frame[:40], checks[1]) & 0xFFFFFFFF
        )
        & 0xFFFFFFFF
    )

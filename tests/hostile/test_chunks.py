"""Chunk frames under hostile input: the transport's own receive path (what paho hands it), a
real connection to a real mosquitto.

Forged headers (valid check, lying geometry), corrupt frames, huge declared sizes and chunk counts,
frames whose whole message does not match its digest: each is refused with a logged reason,
costs no memory worth the name, and the honest chunked message after them arrives whole.
"""

from __future__ import annotations

import psutil
from hypothesis import strategies as st

from agent.protocol import Topics
from agent.protocol.chunking import HEADER_SIZE, MAGIC, build_frame, chunk_count, split
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess
from tests.coordinator.conftest import broker_config
from tests.hostile.hostile import feed

EXAMPLES = 1500
MiB = 1 << 20


def forged_frames() -> st.SearchStrategy[bytes]:
    """Frames a reassembler must refuse at once: every one is inconsistent on its own or claims
    more than it may, or is a whole (one-chunk) message whose digest does not match."""
    ids = st.binary(min_size=16, max_size=16)
    digests = st.binary(min_size=32, max_size=32)
    data = st.binary(max_size=64)
    sizes = st.integers(1, 1 << 20)

    def geometry_lie(mid: bytes, size: int, total: int, count: int, payload: bytes) -> bytes:
        return build_frame(mid, 0, count, total, size, b"\0" * 32, payload)

    lies = st.builds(
        geometry_lie, ids, sizes, st.integers(0, 1 << 30), st.integers(0, 2**32 - 1), data
    ).filter(lambda frame: _inconsistent(frame))
    index_past_count = st.builds(
        lambda mid, count, extra: build_frame(
            mid, count + extra, count, count, 1, b"\0" * 32, b"x"
        ),
        ids,
        st.integers(1, 1000),
        st.integers(0, 1000),
    )
    huge = st.builds(
        lambda mid, total: build_frame(
            mid, 0, chunk_count(total, 512 * 1024), total, 512 * 1024, b"\0" * 32, b"x" * 16
        ),
        ids,
        st.integers(64 * MiB + 1, 2**40),
    )
    many = st.builds(
        lambda mid, total: build_frame(mid, 0, total, total, 1, b"\0" * 32, b"x"),
        ids,
        st.integers(1 << 17, 1 << 30),
    )
    wrong_digest = st.builds(
        lambda mid, payload, digest: build_frame(
            mid, 0, 1, len(payload), max(1, len(payload)), digest, payload
        ),
        ids,
        st.binary(min_size=1, max_size=200),
        digests,
    )
    corrupt = st.tuples(st.binary(min_size=1, max_size=300), st.integers(0, 10_000)).map(
        lambda a: _flip(split(a[0], 64)[0], a[1])
    )
    short = st.binary(max_size=HEADER_SIZE - 5).map(lambda rest: MAGIC + rest)
    return st.one_of(lies, index_past_count, huge, many, wrong_digest, corrupt, short)


def _inconsistent(frame: bytes) -> bool:
    from agent.protocol.chunking import parse_frame
    from agent.protocol.errors import ChunkError

    try:
        parse_frame(frame)
    except ChunkError:
        return True
    return False


def _flip(frame: bytes, bit: int) -> bytes:
    out = bytearray(frame)
    position = 4 + bit // 8 % (len(out) - 4)  # anywhere after the magic
    out[position] ^= 1 << (bit % 8)
    return bytes(out)


async def test_forged_chunks_are_refused_and_cost_nothing(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    topic = topics.job_model("j")
    config = broker_config(mosquitto.url, max_message_bytes=64 * MiB, reassembly_bytes=128 * MiB)
    async with Transport(config, name="victim") as transport:
        await transport.wait_connected(5)
        models = await transport.subscribe(topic)
        rss = psutil.Process().memory_info().rss

        async def route(frame: bytes) -> None:
            transport._route(topic, frame, False, 1)

        tally = await feed(route, forged_frames(), EXAMPLES, {"chunk_rejected": "reason"})
        assert tally.sent >= EXAMPLES
        assert transport.stats.chunks_rejected == tally.sent
        grown = psutil.Process().memory_info().rss - rss
        assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        for text in (
            "check mismatch",
            "is not below count",
            "above the limit of 67108864",
            "chunks, more than 65536",
            "does not match",
            "shorter than its 76-byte header",
        ):
            assert tally.mention(text), text
        assert len(models) == 0  # nothing reassembled
        # An honest chunked message on the same topic still arrives whole.
        payload = bytes(range(256)) * 5000
        for frame in split(payload, 300_000):
            transport._route(topic, frame, False, 1)
        assert bytes((await models.get(timeout=5)).payload) == payload

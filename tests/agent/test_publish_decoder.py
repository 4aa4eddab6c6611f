"""The transport's PUBLISH decoder and packet reader against paho's own: the same packet, the
same fields, for every MQTT version, QoS and property set, and the same refusal of a malformed
packet; the same messages read from a byte stream however the socket hands it over."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator
from typing import Any

import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.chunking import HEADER_SIZE, Reassembler, is_chunk, split
from agent.protocol.errors import ChunkError
from agent.transport import (
    _IN_EMBER_CLIENT,
    PAHO_DECODE_PUBLISH,
    PLACE_HEAD,
    EmberPahoClient,
    PlacedFrame,
    _decode_publish_for,
    adopt,
    decode_publish,
)

V311, V5 = MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5


def packet(topic: bytes, qos: int, payload: bytes, properties: Properties | None) -> bytes:
    """A PUBLISH packet after its fixed header, as a broker sends it."""
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", 4242)
    if properties is not None:
        body += properties.pack()
    return body + payload


def fields(decoded: Any) -> tuple[Any, ...]:
    props = None if decoded.properties is None else decoded.properties.json()
    return (
        decoded.dup,
        decoded.qos,
        decoded.retain,
        decoded.topic,
        decoded.mid,
        props,
        bytes(decoded.payload),
    )


def outcome(decoder: Any, header: int, data: bytes, protocol: int) -> tuple[Any, ...] | str:
    try:
        return fields(decoder(header, bytearray(data), protocol))
    except MalformedPacket:
        return "malformed"


async def test_only_embers_clients_get_views() -> None:
    """Another paho client in the same process keeps paho's own decoder (bytes payloads)."""
    client = adopt(aiomqtt.Client("127.0.0.1", 1))
    assert isinstance(client._client, EmberPahoClient)
    assert paho_packet.decode_publish is _decode_publish_for
    data = packet(b"t/x", 1, b"payload", None)
    assert isinstance(_decode_publish_for(0x32, bytearray(data), V311).payload, bytes)
    token = _IN_EMBER_CLIENT.set(True)  # as EmberPahoClient._handle_publish does
    try:
        assert isinstance(_decode_publish_for(0x32, bytearray(data), V311).payload, memoryview)
    finally:
        _IN_EMBER_CLIENT.reset(token)
    plain = aiomqtt.Client("127.0.0.1", 1)
    assert type(plain._client) is not EmberPahoClient


@given(
    topic=st.binary(max_size=40),
    qos=st.integers(0, 2),
    flags=st.integers(0, 0x09),
    payload=st.binary(max_size=2000),
    v5=st.booleans(),
    expiry=st.none() | st.integers(0, 2**32 - 1),
    user=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
    cut=st.none() | st.integers(0, 60),
)
def test_the_same_fields_as_paho_and_the_same_refusals(
    topic: bytes,
    qos: int,
    flags: int,
    payload: bytes,
    v5: bool,
    expiry: int | None,
    user: list[tuple[str, str]],
    cut: int | None,
) -> None:
    properties = None
    if v5:
        properties = Properties(PacketTypes.PUBLISH)
        if expiry is not None:
            properties.MessageExpiryInterval = expiry
        if user:
            properties.UserProperty = user
    data = packet(topic, qos, payload, properties)
    if cut is not None:
        data = data[:cut]  # truncated: both refuse it, or both read the same shorter payload
    header = 0x30 | (qos << 1) | (flags & 0x09)
    protocol = V5 if v5 else V311
    assert outcome(decode_publish, header, data, protocol) == outcome(
        PAHO_DECODE_PUBLISH, header, data, protocol
    )


def test_the_payload_is_a_view_of_the_packet_not_a_copy() -> None:
    data = bytearray(packet(b"t/x", 1, bytes(range(256)) * 4, Properties(PacketTypes.PUBLISH)))
    decoded = decode_publish(0x32, data, V5)
    assert isinstance(decoded.payload, memoryview)
    assert decoded.payload.obj is data
    assert bytes(decoded.payload) == bytes(range(256)) * 4


@pytest.mark.parametrize("protocol", [V311, V5])
def test_an_empty_packet_is_malformed(protocol: int) -> None:
    with pytest.raises(MalformedPacket):
        decode_publish(0x30, bytearray(), protocol)


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def cut_into(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut after each of ``cuts`` bytes (what is left is the last piece)."""
    pieces, at = [], 0
    for cut in cuts:
        if at >= len(stream):
            break
        pieces.append(stream[at : at + cut])
        at += cut
    return [*pieces, stream[at:]]


@contextlib.contextmanager
def wired(client: PahoClient, wrap: Any = None) -> Iterator[tuple[Any, socket.socket]]:
    """``client`` reading from one end of a socket pair (non-blocking, as paho's is, and
    ``wrap(socket)`` if given), and the other end to write to."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    attached = ours if wrap is None else wrap(ours)
    client._sock = attached
    try:
        yield attached, theirs
    finally:
        client._sock = None
        ours.close()
        theirs.close()


def read_stream(
    client: PahoClient, pieces: list[bytes], on_message: Any = None
) -> list[tuple[str, bytes]]:
    """What ``client`` hands its on_message when a socket delivers ``pieces`` one by one."""
    got: list[tuple[str, bytes]] = []

    def collect(_client: Any, _userdata: Any, message: MQTTMessage) -> None:
        got.append((message.topic, bytes(message.payload)))

    client.on_message = on_message or collect
    with wired(client) as (ours, theirs):
        theirs.setblocking(False)

        def drain() -> None:
            # Read until the socket is dry: paho stops after 100 reads with data left.
            while select.select([ours], [], [], 0)[0]:
                rc = client._packet_read()
                assert rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN)

        for piece in pieces:
            left = memoryview(piece)
            while left:
                with contextlib.suppress(BlockingIOError):  # full until the reader reads
                    left = left[theirs.send(left) :]
                drain()
    return got


@given(
    messages=st.lists(
        st.tuples(st.sampled_from(["t/a", "jobs/j/updates/x"]), st.integers(0, 70_000)),
        min_size=1,
        max_size=6,
    ),
    cuts=st.lists(st.integers(1, 40_000), max_size=30),
)
def test_the_packet_reader_reads_what_paho_reads_however_the_bytes_arrive(
    messages: list[tuple[str, int]], cuts: list[int]
) -> None:
    """PUBLISH packets (1- to 3-byte remaining lengths) written to a socket in arbitrary pieces:
    Ember's reader (one buffer per body, ``recv_into``) gives the same messages as paho's."""
    stream = b""
    for index, (topic, size) in enumerate(messages):
        body = packet(topic.encode(), 0, bytes([index % 256]) * size, None)
        stream += b"\x30" + remaining_length(len(body)) + body
    pieces = cut_into(stream, cuts)
    expected = [(topic, bytes([i % 256]) * size) for i, (topic, size) in enumerate(messages)]
    paho = PahoClient(CallbackAPIVersion.VERSION2, protocol=V311)
    ember = EmberPahoClient(CallbackAPIVersion.VERSION2, protocol=V311)
    assert read_stream(paho, pieces) == expected
    assert read_stream(ember, pieces) == expected


class CountingSocket:
    """A socket whose reads are counted (the reader's system calls)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return self.sock.recv(size)

    def recv_into(self, buffer: memoryview) -> int:
        self.reads += 1
        return self.sock.recv_into(buffer)


def test_a_burst_of_small_packets_is_one_read_from_the_socket() -> None:
    """Fifty small PUBLISH packets that came together (receipts, say) are all handed over by
    one ``loop_read`` (as the event loop calls it when the socket is readable) and one read
    of the socket, where paho reads each fixed header byte by byte and each body apart."""
    stream = b""
    for index in range(50):
        body = packet(b"t/receipts", 0, b"receipt %d" % index, None)
        stream += b"\x30" + remaining_length(len(body)) + body
    got: list[bytes] = []
    ember = EmberPahoClient(CallbackAPIVersion.VERSION2, protocol=V311)
    ember.on_message = lambda _c, _u, message: got.append(bytes(message.payload))
    with wired(ember, CountingSocket) as (counting, theirs):
        theirs.sendall(stream)
        assert ember.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert got == [b"receipt %d" % i for i in range(50)]
        assert counting.reads == 1
        theirs.sendall(stream[:7])  # a fixed header and part of a body: kept for the next read
        assert ember.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        theirs.sendall(stream[7 : len(stream) // 50])
        assert ember.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert got[50:] == [b"receipt 0"]


def acknowledged(client: PahoClient, tail: bytes) -> list[tuple[int, Any, Any, int]]:
    """What ``client`` hands its on_publish when the broker acknowledges a QoS 1 message with
    a PUBACK of its packet id and ``tail`` (MQTT 5: reason code, properties)."""
    got: list[tuple[int, Any, Any, int]] = []
    client.on_publish = lambda _c, _u, mid, reason, props: got.append(
        (mid, reason.value, props.json(), len(client._out_messages))
    )
    with wired(client) as (_, theirs):
        mid = client.publish("t/a", b"update", qos=1).mid
        body = mid.to_bytes(2, "big") + tail
        theirs.sendall(b"\x40" + remaining_length(len(body)) + body)
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        return [*got, (mid, None, None, len(client._out_messages))]


@pytest.mark.parametrize(
    ("protocol", "tail"),
    [(V311, b""), (V5, b""), (V5, b"\x10"), (V5, b"\x00\x00"), (V5, b"\x00\x03\x1f\x00\x00")],
)
def test_a_puback_reaches_on_publish_as_paho_hands_it_over(
    protocol: MQTTProtocolVersion, tail: bytes
) -> None:
    """A PUBACK of just a packet id skips paho's decoder; on_publish gets the same packet id,
    reason code and properties from Ember's client as from paho's, with or without them, and
    the message is no longer in flight."""
    paho = PahoClient(CallbackAPIVersion.VERSION2, protocol=protocol)
    ember = EmberPahoClient(CallbackAPIVersion.VERSION2, protocol=protocol)
    expected = acknowledged(paho, tail)
    assert len(expected) == 2  # on_publish once,
    assert expected[-1][3] == 0  # and then no longer in flight
    assert acknowledged(ember, tail) == expected


def test_a_peer_that_closes_mid_packet_is_a_lost_connection() -> None:
    client = EmberPahoClient(CallbackAPIVersion.VERSION2, protocol=V311)
    with wired(client) as (_, theirs):
        body = packet(b"t/a", 0, b"x" * 1000, None)
        theirs.sendall(b"\x30" + remaining_length(len(body)) + body[:500])
        assert client._packet_read() == MQTTErrorCode.MQTT_ERR_AGAIN
        theirs.close()
        assert client._packet_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST


def read_chunked_stream(
    client: EmberPahoClient, reassembler: Reassembler, pieces: list[bytes]
) -> list[tuple[str, bytes]]:
    """What the transport would deliver (:meth:`Transport._route`) when a socket hands
    ``client`` ``pieces`` one by one: chunk frames reassembled, placed or not."""
    got: list[tuple[str, bytes]] = []

    def on_message(_client: Any, _userdata: Any, message: MQTTMessage) -> None:
        raw: Any = message.payload
        if isinstance(raw, PlacedFrame):
            whole = reassembler.add_placed(message.topic, raw.head, raw.data)
        elif is_chunk(raw):
            whole = reassembler.add(message.topic, raw)
        else:
            whole = memoryview(raw)
        if whole is not None:
            got.append((message.topic, bytes(whole)))

    client.on_message = on_message
    client.place = reassembler.place
    token = _IN_EMBER_CLIENT.set(True)  # as EmberPahoClient._handle_publish does
    try:
        read_stream(client, pieces, on_message)
    finally:
        _IN_EMBER_CLIENT.reset(token)
    return got


@given(
    messages=st.lists(
        st.tuples(
            st.sampled_from(["t/a", "jobs/j/updates/x", "jobs/" + "j" * 990 + "/long"]),
            st.integers(0, 60_000),
            st.sampled_from([2_000, 7_000, 30_000]),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(1, 20_000), max_size=30),
    v5=st.booleans(),
)
def test_chunk_data_received_in_place_reassembles_as_copied_chunks_do(
    messages: list[tuple[str, int, int, bool]], cuts: list[int], v5: bool
) -> None:
    """Chunked messages (some frames sent twice, as a QoS 1 redelivery does), small whole
    messages between them, written in arbitrary pieces: the data of large frames goes straight
    into its message's buffer, and every message comes out whole and exact. A topic too long
    for the head read, frames below the threshold and messages above the reassembler's
    ``place_max_bytes`` take the copying path."""
    protocol = V5 if v5 else V311
    props = Properties(PacketTypes.PUBLISH) if v5 else None
    stream, expected, placeable = b"", [], False
    for index, (topic, size, chunk_size, twice) in enumerate(messages):
        payload = bytes((index * 7 + i) % 251 for i in range(size))
        frames = split(payload, chunk_size)
        if twice:
            frames.insert(len(frames) // 2 + 1, frames[len(frames) // 2])
        for frame in frames:
            body = packet(topic.encode(), 1, frame, props)
            stream += b"\x32" + remaining_length(len(body)) + body
            head = len(body) - len(frame) + HEADER_SIZE
            placeable |= len(body) >= 4_096 and head <= PLACE_HEAD and size <= 50_000
        small = packet(b"t/small", 0, b"hello %d" % index, props)
        stream += b"\x30" + remaining_length(len(small)) + small
        expected += [(topic, payload), ("t/small", b"hello %d" % index)]
    reassembler = Reassembler(place_max_bytes=50_000)  # larger messages are copied
    ember = EmberPahoClient(CallbackAPIVersion.VERSION2, protocol=protocol)
    ember.place_min = 4_096
    assert read_chunked_stream(ember, reassembler, cut_into(stream, cuts)) == expected
    assert (reassembler.stats.placed > 0) == placeable
    assert reassembler.pending_messages == 0


def test_a_placed_chunk_that_fails_its_check_is_taken_when_sent_again() -> None:
    """Data corrupted on the way into its place is refused by its check, and the chunk counts as
    missing again: the good copy sent next (placed again) completes the message."""
    payload = bytes(range(256)) * 100
    frames = split(payload, 10_000)
    bad = bytearray(frames[1])
    bad[-5] ^= 0xFF

    def stream_of(frames: list[bytes]) -> bytes:
        out = b""
        for frame in frames:
            body = packet(b"t/a", 1, frame, None)
            out += b"\x32" + remaining_length(len(body)) + body
        return out

    reassembler = Reassembler()
    ember = EmberPahoClient(CallbackAPIVersion.VERSION2, protocol=V311)
    ember.place_min = 4_096
    with pytest.raises(ChunkError, match="check mismatch"):
        read_chunked_stream(ember, reassembler, [stream_of([frames[0], bytes(bad)])])
    assert reassembler.stats.rejected == 1
    assert reassembler.pending_messages == 1
    ember = EmberPahoClient(CallbackAPIVersion.VERSION2, protocol=V311)
    ember.place_min = 4_096
    got = read_chunked_stream(ember, reassembler, [stream_of(frames[1:])])
    assert got == [("t/a", payload)]
    assert reassembler.stats.placed == 2 + len(frames) - 1

"""The transport's PUBLISH decoder against paho's own: the same packet, the same fields, for
every MQTT version, QoS and property set, and the same refusal of a malformed packet."""

from __future__ import annotations

import struct
from typing import Any

import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport import (
    _IN_EMBER_CLIENT,
    PAHO_DECODE_PUBLISH,
    EmberPahoClient,
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

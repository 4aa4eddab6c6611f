"""The one MQTT adapter: everything in Ember reaches the broker through :class:`Transport`.

This is the only module that imports aiomqtt (and, through it, paho-mqtt). It

* connects with MQTT 5 where the broker speaks it and falls back to 3.1.1 where it does not
  (the embedded pure-Python broker refuses MQTT 5 with "unsupported protocol version");
* sets a Will, reconnects with capped exponential backoff and full jitter (AWS architecture
  blog, "Exponential Backoff and Jitter"), fails over between a list of broker URLs, and
  restores every subscription after each reconnect, in one batched SUBSCRIBE;
* publishes with a size check, splitting anything above the chunk size into chunk frames
  (:mod:`agent.protocol.chunking`), pipelining QoS 1 frames and re-sending the unacknowledged
  ones after a reconnect (at least once; receivers drop duplicates by message id);
* reassembles chunked messages on receipt and hands whole payloads to bounded per-subscription
  queues that count and log every message they have to drop;
* supports TLS (``mqtts://``) and username/password;
* decodes PUBLISH packets without paho's copies of the payload, and sends packets without
  copying what remains of them at every partial write (:class:`EmberPahoClient`, for its own
  clients only): paho 2 copied each received payload four times, a fifth of an aggregator's
  time on 1M-parameter updates.

Roles never touch reconnect logic: they declare subscriptions and publish; the transport keeps
both alive across broker restarts (Home Assistant's MQTT integration works the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import logging
import math
import random
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
import psutil
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt import _packet as paho_packet
from paho.mqtt import client as paho_client
from paho.mqtt.client import (
    MQTT_CLEAN_START_FIRST_ONLY,
    MQTT_LOG_DEBUG,
    MQTT_LOG_ERR,
    PUBACK,
    PUBLISH,
    MQTTMessage,
    MQTTMessageInfo,
)
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.client import time_func as paho_clock
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol.chunking import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MQTT5_CHUNK_SIZE,
    Reassembler,
    is_chunk,
    split_headers,
)
from agent.protocol.errors import PayloadTooLarge, ProtocolError, ReassemblyFull
from agent.protocol.limits import MiB
from agent.tasks import cancel_and_wait, wait_event

log = structlog.get_logger("ember.transport")


def decode_publish(header: int, packet: bytes | bytearray, protocol: int) -> Any:
    """paho's ``_packet.decode_publish`` (MQTT 3.1.1 and 5 PUBLISH: topic, packet id,
    properties, payload) with the payload handed over as a ``memoryview`` of the packet paho
    read, instead of four copies made by successive ``struct.unpack`` and slicing (paho reads
    every packet into a new ``bytearray``, so the view owns it). Malformed packets raise
    :class:`MalformedPacket` as paho's own decoder does."""
    try:
        view = memoryview(packet)
        topic_end = 2 + int.from_bytes(view[:2], "big")
        if len(view) < topic_end:
            raise MalformedPacket(f"topic length {topic_end - 2} past the packet's end")
        topic = bytes(view[2:topic_end])
        if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
            raise MalformedPacket("topic can't be empty in MQTTv3")
        qos = (header & 0x06) >> 1
        mid, at = 0, topic_end
        if qos > 0:
            if len(view) < at + 2:
                raise MalformedPacket("packet id past the packet's end")
            mid, at = int.from_bytes(view[at : at + 2], "big"), at + 2
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5 and len(view) > at and view[at] == 0:
            # No properties (as almost every PUBLISH): a copy of an empty set, where paho builds
            # one from scratch and parses it (10 of the ~75 us a small message costs).
            properties = copy.copy(_NO_PROPERTIES)
            at += 1
        elif protocol == MQTTProtocolVersion.MQTTv5:
            head = bytes(view[at : at + 4])
            length, length_bytes = VariableByteIntegers.decode(head)  # type: ignore[no-untyped-call]
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            own = bytes(view[at : at + length_bytes + length])
            _props, used = properties.unpack(own)  # type: ignore[no-untyped-call]
            at += used
        payload: memoryview | PlacedFrame = view[at:]
        if isinstance(packet, _PlacedPacket):
            payload = PlacedFrame(view[at:], packet.data)
        return paho_packet.PublishPacket(
            dup=bool(header & 0x08),
            qos=qos,
            retain=bool(header & 0x01),
            topic=topic,
            mid=mid,
            properties=properties,
            payload=payload,  # type: ignore[arg-type]  # a view where paho has bytes
        )
    except MalformedPacket:
        raise
    except paho_packet.DECODE_ERRORS as exc:
        raise MalformedPacket(str(exc)) from exc


_NO_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
"""The properties of a PUBLISH without any, copied for each such message."""

_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
"""What paho makes of a PUBACK of just a packet id, copied for each such PUBACK."""

PAHO_DECODE_PUBLISH: Callable[..., Any] | None = getattr(paho_packet, "decode_publish", None)
"""paho's own decoder, which :func:`decode_publish` stands in for (tests compare the two)."""
_IN_EMBER_CLIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("ember_paho", default=False)


def _decode_publish_for(header: int, packet: bytes | bytearray, protocol: int) -> Any:
    """paho's ``_packet.decode_publish`` as installed: :func:`decode_publish` while one of
    Ember's clients handles a packet, paho's own (payloads as ``bytes``) for any other paho
    client in the process."""
    if _IN_EMBER_CLIENT.get():
        return decode_publish(header, packet, protocol)
    assert PAHO_DECODE_PUBLISH is not None  # adopt() installs this only in front of it
    return PAHO_DECODE_PUBLISH(header, packet, protocol)


class PlacedFrame:
    """A received chunk frame whose data the packet reader put straight into the buffer of its
    message (:meth:`Reassembler.place`): the frame's header and that place, for
    :meth:`Reassembler.add_placed`. Only Ember's clients make them (:class:`EmberPahoClient`)."""

    __slots__ = ("data", "head")

    def __init__(self, head: memoryview, data: memoryview) -> None:
        self.head = head
        self.data = data

    def __len__(self) -> int:
        return self.head.nbytes + self.data.nbytes


class _PlacedPacket(bytearray):
    """A PUBLISH packet's body up to the end of its chunk frame's header, with ``data``: the
    frame's data, received in place (:func:`decode_publish` makes a :class:`PlacedFrame`)."""

    data: memoryview


PLACE_HEAD = 1024
"""Bytes of a large PUBLISH read first, to find its topic and chunk header before the data:
topic, packet id and properties fit in them unless the topic is very long (then the packet is
read whole, as any other)."""
READ_AHEAD = 16 * 1024
"""Bytes the packet reader asks the socket for at once (:meth:`EmberPahoClient._read_ahead`):
many small packets or a large one's fixed header and head; larger bodies are received in place."""


def _payload_offset(body: bytearray, command: int, protocol: int) -> int | None:
    """Where a PUBLISH body's payload starts (after topic, packet id and MQTT 5 properties),
    if ``body`` reaches that far; :func:`decode_publish` finds the same place."""
    if len(body) < 2:
        return None
    at = 2 + int.from_bytes(body[:2], "big") + (2 if command & 0x06 else 0)
    if protocol == MQTTProtocolVersion.MQTTv5:
        head = bytes(body[at : at + 4])
        try:  # the properties' length, as decode_publish reads it
            length, used = VariableByteIntegers.decode(head)  # type: ignore[no-untyped-call]
        except MalformedPacket:  # cut short, or longer than four bytes
            return None
        return at + int(used) + int(length)
    return at


class Frame:
    """A chunk frame to publish as its header and a view of the message's bytes: an Ember paho
    client (:class:`EmberPahoClient`) writes the PUBLISH packet's header, this header and the
    data side by side, where a frame of ``bytes`` was copied twice (once into the frame, once
    into paho's packet). Any other paho client refuses it (paho takes bytes only)."""

    __slots__ = ("data", "header")

    def __init__(self, header: bytes, data: memoryview) -> None:
        self.header = header
        self.data = data

    def __len__(self) -> int:
        return len(self.header) + self.data.nbytes


def cut_frames(payload: Payload, chunk_size: int) -> list[Frame]:
    """``payload`` as chunk :class:`Frame` objects of at most ``chunk_size`` data bytes."""
    return [Frame(header, piece) for header, piece in split_headers(payload, chunk_size)]


class Gather:
    """An outgoing packet in several buffers, written with one ``sendmsg``; ``packet[pos:]``
    (paho's writer, after a partial write) is what is left of it, without copies."""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        self.parts = [memoryview(part).cast("B") for part in parts]

    def __len__(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def __getitem__(self, index: slice) -> Gather:
        skip, rest = index.start or 0, []
        for part in self.parts:
            if skip >= part.nbytes:
                skip -= part.nbytes
                continue
            rest.append(part[skip:])
            skip = 0
        return Gather(rest)


_PAHO_ENCODE_PAYLOAD: Callable[[Any], Any] = paho_client._encode_payload


def _encode_payload(payload: Any) -> Any:
    """paho's payload check, with :class:`Frame` let through (to :meth:`EmberPahoClient.\
    _send_publish`, the only code that writes one)."""
    return payload if isinstance(payload, Frame) else _PAHO_ENCODE_PAYLOAD(payload)


class EmberPahoClient(PahoClient):
    """paho's MQTT client (MQTT 3.1.1 and 5) as Ember's transport runs it:

    * each packet's body is received into one buffer of its final size (``recv_into``), where
      paho received a new ``bytes`` per read and appended it to a growing ``bytearray``: one
      copy of every received byte and an allocation per read fewer;
    * the socket is read ahead (:data:`READ_AHEAD` bytes at a time) for fixed headers and small
      bodies, where paho made a ``recv`` for every byte of a fixed header and one per body:
      a burst of PUBACKs or receipts is one system call, not three or four per packet;
    * PUBLISH payloads are handed over as views of that buffer (:func:`decode_publish`);
    * outgoing packets are queued as views, so the writer's ``packet[pos:]`` after each
      partial write is a free slice, not a copy of the rest of a ``bytearray``;
    * a chunk :class:`Frame` goes out as the PUBLISH header, the frame header and a view of the
      message's bytes, written together with ``sendmsg`` (one part at a time over TLS, which
      has no ``sendmsg``): the data is not copied between the caller and the kernel.

    * with :attr:`place` set (by the transport, to its :meth:`Reassembler.place`), a large
      PUBLISH carrying a chunk frame has its data received straight into the buffer of the
      message it belongs to, and is handed over as a :class:`PlacedFrame`: the reassembler
      does not copy it, and no packet buffer is allocated (and zeroed) for it;
    * a PUBLISH or PUBACK is written at once when nothing waits before it (:meth:`_packet_queue`).

    Only clients given this class (:func:`adopt`) behave so."""

    place: Callable[[str, memoryview, int], memoryview | None] | None = None
    """Where a received chunk frame's data may go (topic, frame header, data bytes), or
    ``None`` for the whole packet in a buffer of its own; ``None``: every packet whole."""
    deliver: Callable[[MQTTMessage], None] | None = None
    """Where each received PUBLISH goes, at once and on the event loop's thread, in place of
    paho's ``on_message`` (set by the transport: see :meth:`Transport._read`); ``None``: to
    ``on_message``, as paho does."""
    place_min: int = 64 * 1024
    """PUBLISH bodies at least this large are read head first (:data:`PLACE_HEAD`) to place
    their data; below it a second read costs more than a copy."""
    _fill: memoryview | None = None
    """What is left to receive of the packet being read."""
    _heading: bool = False
    """The packet's head (:data:`PLACE_HEAD` bytes) is being read, its data not yet placed."""
    _ahead: bytearray | None = None
    """Bytes read from the socket ahead of the packet reader (:meth:`_read_ahead`), made at
    the first read: these attributes start as the class's, as :func:`adopt` changes the
    class of a client that exists."""
    _ahead_at: int = 0
    """The first byte of :attr:`_ahead` not yet taken."""
    _ahead_end: int = 0
    """The end of the bytes in :attr:`_ahead`."""
    _ran_dry: bool = False
    """The last read from the socket returned less than it asked for."""

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """paho's ``loop_read`` (packets until the socket runs dry, at least as many as messages
        are in flight), except that it stops without another read once the last one came up
        short of what it asked for: the socket was dry then, and bytes that came since wake the
        loop again (its readiness is level-triggered). paho's extra read is one more system
        call per PUBACK a publisher waits for. Over TLS a short read says nothing of what the
        TLS layer holds, so paho's rule stays."""
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        budget = max(1, len(self._out_messages) + len(self._in_messages))
        while True:
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN or self._sock is None:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            budget -= 1
            if budget <= 0 or (self._ran_dry and not isinstance(self._sock, ssl.SSLSocket)):
                return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_read(self) -> MQTTErrorCode:
        """paho's ``_packet_read`` (the fixed header, then the body, then the handler), for
        every packet whose first byte is already read ahead: a caller waiting for the socket
        to become readable again would never see those bytes."""
        while True:
            rc = self._read_one_packet()
            if (
                rc is not MQTTErrorCode.MQTT_ERR_SUCCESS
                or self._ahead_at == self._ahead_end
                or self._sock is None  # the packet ended the connection
            ):
                return rc

    def _read_one_packet(self) -> MQTTErrorCode:
        """One packet, or as much of it as has come: the fixed header, then the body, then
        the handler; at most 100 reads per call, so that one huge packet does not hold the
        event loop."""
        packet = self._in_packet
        if packet["command"] == 0 or packet["have_remaining"] == 0:
            rc = self._read_fixed_header()
            if rc is not MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
            remaining = packet["remaining_length"]
            self._heading = (
                self.place is not None
                and remaining >= max(self.place_min, PLACE_HEAD)
                and packet["command"] & 0xF0 == PUBLISH
            )
            packet["packet"] = bytearray(PLACE_HEAD if self._heading else remaining)
            self._fill = memoryview(packet["packet"])
        for _ in range(100):
            fill = self._fill
            if packet["to_process"] == 0 or fill is None:
                break
            try:
                received = self._read_into(fill)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                self._easy_log(MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if received == 0:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            packet["to_process"] -= received
            self._fill = fill[received:]
            if self._heading and not self._fill.nbytes:
                self._heading = False
                self._place_data()
            with self._msgtime_mutex:
                self._last_bytes_received = paho_clock()
        else:
            if packet["to_process"]:
                return MQTTErrorCode.MQTT_ERR_AGAIN
        self._fill = None
        packet["pos"] = 0
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(),
            "to_process": 0,
            "pos": 0,
        }
        with self._msgtime_mutex:
            self._last_bytes_received = paho_clock()
        return rc

    def _place_data(self) -> None:
        """The head of a large PUBLISH is in: receive the rest of its chunk frame's data in
        the place :attr:`place` gives, or else the rest of the packet after the head."""
        packet = self._in_packet
        head = packet["packet"]
        remaining = packet["remaining_length"]
        at = _payload_offset(head, packet["command"], self._protocol)
        place = self.place
        target = None
        if place is not None and at is not None and at + HEADER_SIZE <= len(head):
            with contextlib.suppress(UnicodeDecodeError):
                topic = bytes(head[2 : 2 + int.from_bytes(head[:2], "big")]).decode()
                frame_head = memoryview(head)[at : at + HEADER_SIZE]
                target = place(topic, frame_head, remaining - at - HEADER_SIZE)
                frame_head.release()
        if target is None or at is None:
            whole = bytearray(remaining)
            whole[: len(head)] = head
            packet["packet"] = whole
            self._fill = memoryview(whole)[len(head) :]
            return
        cut = at + HEADER_SIZE
        in_head = len(head) - cut
        target[:in_head] = memoryview(head)[cut:]
        short = _PlacedPacket(memoryview(head)[:cut])
        short.data = target
        packet["packet"] = short
        self._fill = target[in_head:]

    def _read_fixed_header(self) -> MQTTErrorCode:
        """The packet type byte and the remaining length (1 to 4 bytes), as paho reads them
        (one ``recv`` per byte), but from the bytes read ahead; what has been read stays in
        ``_in_packet`` when the socket runs dry in between."""
        packet = self._in_packet
        try:
            if packet["command"] == 0:
                command = self._read_byte()
                if command is None:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                packet["command"] = command
            while True:
                byte = self._read_byte()
                if byte is None:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                packet["remaining_count"].append(byte)
                if len(packet["remaining_count"]) > 4:  # the most MQTT allows
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL
                packet["remaining_length"] += (byte & 127) * packet["remaining_mult"]
                packet["remaining_mult"] *= 128
                if not byte & 128:
                    break
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:  # TimeoutError included
            self._easy_log(MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        packet["have_remaining"] = 1
        packet["to_process"] = packet["remaining_length"]
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _read_byte(self) -> int | None:
        """The next byte of the stream, ``None`` when the peer closed; raises
        ``BlockingIOError`` when none has come."""
        if self._ahead_at == self._ahead_end and not self._read_ahead():
            return None
        assert self._ahead is not None
        byte = self._ahead[self._ahead_at]
        self._ahead_at += 1
        return byte

    def _read_into(self, target: memoryview) -> int:
        """Bytes of the stream put into ``target``: those read ahead first; then, for a target
        of :data:`READ_AHEAD` or more, straight from the socket, else through the read-ahead
        buffer. 0 when the peer closed; raises ``BlockingIOError`` when nothing has come."""
        if self._ahead_at == self._ahead_end:
            if target.nbytes >= READ_AHEAD:
                received = self._sock_recv_into(target)
                self._ran_dry = received < target.nbytes
                return received
            if not self._read_ahead():
                return 0
        assert self._ahead is not None
        taken = min(target.nbytes, self._ahead_end - self._ahead_at)
        target[:taken] = memoryview(self._ahead)[self._ahead_at : self._ahead_at + taken]
        self._ahead_at += taken
        return taken

    def _read_ahead(self) -> int:
        """Read what the socket has, up to :data:`READ_AHEAD` bytes, into the read-ahead
        buffer (empty when called): a burst of small packets (PUBACKs, receipts, a PUBLISH's
        fixed header and head) costs one ``recv`` where paho made up to six per packet."""
        if self._ahead is None:
            self._ahead = bytearray(READ_AHEAD)
        received = self._sock_recv_into(memoryview(self._ahead))
        self._ahead_at, self._ahead_end = 0, received
        self._ran_dry = received < READ_AHEAD
        return received

    def reconnect(self) -> MQTTErrorCode:
        """paho's ``reconnect``, with the last connection's unread bytes dropped as paho drops
        its partly read packet."""
        self._ahead_at = self._ahead_end = 0
        return super().reconnect()

    def _sock_recv_into(self, buffer: memoryview) -> int:
        """paho's ``_sock_recv`` into ``buffer``: bytes received, 0 when the peer closed."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("self._sock is None")
        recv_into = getattr(sock, "recv_into", None)
        if recv_into is None:  # a socket wrapper without it
            data = self._sock_recv(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        try:
            return int(recv_into(buffer))
        except ssl.SSLWantReadError as err:
            raise BlockingIOError() from err
        except ssl.SSLWantWriteError as err:
            self._call_socket_register_write()
            raise BlockingIOError() from err

    def _handle_publish(self) -> MQTTErrorCode:
        token = _IN_EMBER_CLIENT.set(True)
        try:
            return super()._handle_publish()
        finally:
            _IN_EMBER_CLIENT.reset(token)

    def _handle_on_message(self, message: MQTTMessage) -> None:
        """paho's, or with :attr:`deliver` set, the message handed straight to it."""
        deliver = self.deliver
        if deliver is None:
            super()._handle_on_message(message)
            return
        with self._in_callback_mutex:  # as paho calls on_message (see _packet_queue)
            deliver(message)

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """paho's, but a PUBACK of just a packet id (success, no properties: what brokers send
        for almost every one) is not decoded into a new reason code and property set; each
        frame a trainer sends gets one."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet, "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(
                    mid, copy.copy(_PUBACK_SUCCESS), copy.copy(_NO_PUBACK_PROPERTIES)
                )
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray | Gather,
        mid: int,
        qos: int,
        info: MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        """paho's ``_packet_queue``, and a PUBLISH or PUBACK written at once when nothing is
        waiting before it and this is the event loop's thread: paho would ask the loop to
        watch the socket (a wake-up through the loop's self-pipe, two ``epoll_ctl`` and a turn
        of the loop for every packet, as aiomqtt runs it) and write it on the next turn. What
        the socket does not take now waits for writability as before. paho itself writes at
        once when no loop drives it, with the same check that no callback is running."""
        queued = packet if isinstance(packet, Gather) else memoryview(packet)
        if (
            command & 0xF0 not in (PUBLISH, PUBACK)
            or self._out_packet
            or self._sock is None
            or asyncio.events._get_running_loop() is None
            or not self._in_callback_mutex.acquire(False)
        ):
            return super()._packet_queue(command, queued, mid, qos, info)  # type: ignore[arg-type]
        self._in_callback_mutex.release()
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(queued),
                "packet": queued,  # type: ignore[typeddict-item]
                "info": info,
            }
        )
        return self.loop_write()

    def _send_publish(
        self,
        mid: int,
        topic: bytes,
        payload: bytes | bytearray | Frame = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: Any = None,
        properties: Properties | None = None,
    ) -> MQTTErrorCode:
        """paho's PUBLISH packet (MQTT 3.1.1 and 5), for a :class:`Frame` without copying it."""
        if not isinstance(payload, Frame):
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        packed = b""
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            packed = b"\x00" if properties is None else properties.pack()  # type: ignore[no-untyped-call]
        head = bytearray([PUBLISH | ((dup & 0x1) << 3) | (qos << 1) | retain])
        self._pack_remaining_length(
            head, 2 + len(topic) + (2 if qos else 0) + len(packed) + len(payload)
        )
        self._pack_str16(head, topic)
        if qos:
            head += mid.to_bytes(2, "big")
        head += packed
        head += payload.header
        return self._packet_queue(PUBLISH, Gather((head, payload.data)), mid, qos, info)

    def _sock_send(self, buf: bytes | bytearray | Gather) -> int:
        if not isinstance(buf, Gather):
            return super()._sock_send(buf)
        sock = self._sock
        if sock is None or isinstance(sock, ssl.SSLSocket) or not hasattr(sock, "sendmsg"):
            return super()._sock_send(buf.parts[0])  # type: ignore[arg-type]
        try:
            return int(sock.sendmsg(buf.parts))
        except BlockingIOError:
            self._call_socket_register_write()
            raise


def adopt(client: aiomqtt.Client) -> aiomqtt.Client:
    """Give an aiomqtt client's paho client :class:`EmberPahoClient`'s behaviour (a subclass
    with no state of its own: the instance is the same); other paho clients are untouched."""
    if callable(PAHO_DECODE_PUBLISH) and paho_packet.decode_publish is PAHO_DECODE_PUBLISH:
        paho_packet.decode_publish = _decode_publish_for
    paho_client._encode_payload = _encode_payload
    paho = client._client  # with _send_immediately, where Ember reaches behind aiomqtt
    if type(paho) is PahoClient:
        paho.__class__ = EmberPahoClient
    return client


Payload = bytes | bytearray | memoryview
ProtocolChoice = Literal["auto", "5", "3.1.1"]

_TRANSIENT_CODES = frozenset({MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST})
_MAX_SEND_ATTEMPTS = 8
"""Connections lost while one message was being sent before the transport gives up on it."""
STALL_GRACE = 5.0
"""Seconds a publish refused for want of a connection waits for the connection loop to notice
the loss before the loop is made to reconnect (see :meth:`Transport._send`)."""


class NotConnectedError(ConnectionError):
    """The broker could not be reached before the caller's deadline."""


class SubscriptionClosed(Exception):
    """The subscription (or its transport) was closed; no more messages will come."""


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerEndpoint:
    """One broker address parsed from ``mqtt://[user:pass@]host[:port]`` or ``mqtts://``."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerEndpoint:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        scheme = parts.scheme.lower()
        if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
        tls = scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise ValueError(f"broker url {url!r}: no host")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ValueError(f"broker url {url!r}: bad port") from None
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """How to reach the broker(s) and how hard to try (MQTT 5 with a 3.1.1 fallback)."""

    urls: tuple[str, ...] = ("mqtt://127.0.0.1:1883",)
    """Brokers to fail over between, in order of preference."""
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    """CA bundle for ``mqtts://``; the system's trust store when unset."""
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    """Skip the broker hostname check (self-signed lab setups only)."""
    tls_verify: bool = True
    """Check the broker's certificate at all. Off only for ``ember-agent enroll`` without a CA,
    whose payloads are authenticated and sealed with the enrolment token instead."""
    keepalive: int = 30
    protocol: ProtocolChoice = "auto"
    session_expiry: int = 0
    """Seconds the broker keeps this client's session (subscriptions and queued QoS 1 messages)
    while it is away; 0 starts a clean session on every connect. Needs a ``client_id``."""
    chunk_size: int | None = None
    """Data bytes per chunk frame, lowered to fit the broker's announced packet limit; ``None``
    (the default): as large as the broker allows up to :data:`MQTT5_CHUNK_SIZE` over MQTT 5,
    :data:`DEFAULT_CHUNK_SIZE` over MQTT 3.1.1 (see :meth:`Transport.chunk_size`)."""
    max_message_bytes: int = 512 * MiB
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    publish_window: int = 32
    """QoS 1 chunk frames in flight at once for one message."""
    queue_messages: int = 10_000
    """Default bound on messages waiting in one subscription's queue."""
    queue_bytes: int = 256 * MiB
    """Default bound on payload bytes waiting in one subscription's queue."""
    reassembly_bytes: int = 1024 * MiB
    reassembly_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("broker: at least one url is needed")
        for url in self.urls:
            BrokerEndpoint.parse(url)
        if self.chunk_size is not None and self.chunk_size < 1024:
            raise ValueError(f"broker.chunk_size: must be ≥ 1024, got {self.chunk_size}")
        if self.session_expiry and not self.client_id:
            raise ValueError("broker.session_expiry: a persistent session needs a client_id")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"broker.protocol: must be auto, 5 or 3.1.1, got {self.protocol!r}")

    def endpoints(self) -> list[BrokerEndpoint]:
        return [BrokerEndpoint.parse(url) for url in self.urls]


@dataclass(frozen=True)
class WillMessage:
    """Published by the broker when this client vanishes without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Inbound:
    """A whole received message (chunks already reassembled)."""

    topic: str
    payload: Payload
    retain: bool
    qos: int


@dataclass
class TransportStats:
    """Counters for logs, telemetry and tests."""

    connections: int = 0
    connection_failures: int = 0
    messages_out: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    chunks_rejected: int = 0
    chunks_refused: int = 0
    """Sound chunks of messages the reassembly bound had no room for (resent by their sender)."""
    dropped_full_queue: int = 0
    dropped_qos0_offline: int = 0
    resent_after_reconnect: int = 0


# -- subscriptions -------------------------------------------------------------------------------


class Subscription:
    """A bounded queue of messages matching one topic filter; iterate it with ``async for``.

    When the queue is full (by count or by bytes) a new message is dropped, counted in
    :attr:`dropped` and logged: never silently.
    """

    def __init__(
        self, transport: Transport, topic_filter: str, qos: int, max_messages: int, max_bytes: int
    ) -> None:
        self.topic_filter = topic_filter
        self.qos = qos
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0
        self._transport = transport
        self._wildcard = aiomqtt.Wildcard(topic_filter)
        self._queue: deque[Inbound] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self._closed = False

    def matches(self, topic: aiomqtt.Topic) -> bool:
        return topic.matches(self._wildcard)

    def offer(self, message: Inbound) -> bool:
        size = memoryview(message.payload).nbytes
        if len(self._queue) >= self.max_messages or self._bytes + size > self.max_bytes:
            self.dropped += 1
            self._transport.stats.dropped_full_queue += 1
            log.warning(
                "subscription_queue_full",
                filter=self.topic_filter,
                topic=message.topic,
                bytes=size,
                queued=len(self._queue),
                queued_bytes=self._bytes,
                dropped_total=self.dropped,
            )
            return False
        self._queue.append(message)
        self._bytes += size
        self._ready.set()
        return True

    def __len__(self) -> int:
        return len(self._queue)

    def get_nowait(self) -> Inbound | None:
        if not self._queue:
            return None
        message = self._queue.popleft()
        self._bytes -= memoryview(message.payload).nbytes
        if not self._queue:
            self._ready.clear()
        return message

    async def get(self, timeout: float | None = None) -> Inbound:
        """The next message; ``asyncio.TimeoutError`` after ``timeout`` seconds,
        :class:`SubscriptionClosed` once the subscription or its transport is closed.

        A message is taken off the queue only once it is returned: a cancellation (raised,
        never lost: :func:`~agent.tasks.wait_event`) leaves it for the next reader. A queued
        message is returned without waiting."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            message = self.get_nowait()
            if message is not None:
                return message
            if self._closed:
                raise SubscriptionClosed(self.topic_filter)
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise asyncio.TimeoutError
            await wait_event(self._ready, left)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Inbound:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        """Stop receiving; unsubscribes when no other subscription shares the filter."""
        if not self._closed:
            self._closed = True
            self._ready.set()
            await self._transport._unsubscribe(self)


# -- the transport -------------------------------------------------------------------------------

ConnectHook = Callable[[int], Awaitable[None]]


class Transport:
    """A resilient MQTT connection (MQTT 5 or 3.1.1) with chunking, reassembly and bounded queues.

    Use as ``async with Transport(config, will=...) as mqtt:``; the connection is kept in the
    background. ``await mqtt.wait_connected()`` if you need to know it is up.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        will: WillMessage | None = None,
        name: str = "ember",
    ) -> None:
        self.config = config
        self.will = will
        self.name = name
        self.stats = TransportStats()
        self.session = 0
        """How many times this transport has connected (1 after the first connection)."""
        self.protocol_in_use: str | None = None
        self.endpoint_in_use: BrokerEndpoint | None = None
        self._endpoints = config.endpoints()
        self._protocols: dict[BrokerEndpoint, aiomqtt.ProtocolVersion] = {}
        self._endpoint_index = 0
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscriptions: list[Subscription] = []
        self._stalled = asyncio.Event()
        """Set by a publish that finds the client disconnected while the loop still reads."""
        self._refused: dict[str, int] = {}
        """Filters the broker refused on this connection (SUBACK ≥ 0x80), retried with backoff."""
        self._retry: asyncio.Task[None] | None = None
        self._hooks: list[ConnectHook] = []
        self._broker_max_packet: int | None = None
        self._reassembler = Reassembler(
            max_message_bytes=config.max_message_bytes,
            max_pending_bytes=config.reassembly_bytes,
            timeout=config.reassembly_timeout,
            on_drop=self._on_reassembly_drop,
        )

    # lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Transport:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-mqtt")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the broker has accepted the connection; ``NotConnectedError`` on timeout."""
        if not await wait_event(self._connected, timeout):
            raise NotConnectedError(
                f"no broker reachable within {timeout:g} s (tried {self._describe_endpoints()})"
            )

    def on_connect(self, hook: ConnectHook) -> None:
        """Run ``await hook(session)`` after every (re)connection, subscriptions restored."""
        self._hooks.append(hook)

    async def close(
        self, final: Sequence[tuple[str, bytes, bool]] = (), timeout: float = 5.0
    ) -> None:
        """Publish ``final`` messages ``(topic, payload, retain)`` at QoS 1 if connected, then
        disconnect cleanly (so the broker discards the Will) and stop reconnecting."""
        if self._closing:
            return
        if final and self.connected:
            for topic, payload, retain in final:
                try:
                    await self.publish(topic, payload, qos=1, retain=retain, timeout=timeout)
                except (NotConnectedError, aiomqtt.MqttError) as exc:
                    log.warning("final_publish_failed", topic=topic, error=str(exc))
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        for sub in self._subscriptions:
            sub._closed = True
            sub._ready.set()

    # connection loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            endpoint = self._endpoints[self._endpoint_index]
            try:
                await self._connect_and_serve(endpoint)
            except aiomqtt.MqttError as exc:
                if self._closing:
                    break
                self.stats.connection_failures += 1
                log.warning(
                    "mqtt_connection_failed",
                    broker=str(endpoint),
                    error=str(exc) or type(exc).__name__,
                )
            finally:
                was_connected = self._mark_disconnected()
            if was_connected:
                failures = 0
            else:
                failures += 1
                self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
            delay = self._backoff(max(1, failures))
            log.info(
                "mqtt_reconnect_wait",
                seconds=round(delay, 2),
                next=str(self._endpoints[self._endpoint_index]),
            )
            self._wake.clear()
            await wait_event(self._wake, delay)

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(cap, base·2^n)], never below a tenth of the base."""
        ceiling = min(
            self.config.backoff_max, self.config.backoff_initial * 2 ** max(0, failures - 1)
        )
        return max(self.config.backoff_initial / 10, random.uniform(0, ceiling))

    async def _connect_and_serve(self, endpoint: BrokerEndpoint) -> None:
        protocol = self._protocols.get(endpoint) or (
            aiomqtt.ProtocolVersion.V311
            if self.config.protocol == "3.1.1"
            else aiomqtt.ProtocolVersion.V5
        )
        client = self._make_client(endpoint, protocol)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            if (
                protocol is aiomqtt.ProtocolVersion.V5
                and self.config.protocol == "auto"
                and _refuses_v5(exc)
            ):
                log.info(
                    "mqtt_protocol_fallback", broker=str(endpoint), to="3.1.1", reason=str(exc)
                )
                self._protocols[endpoint] = aiomqtt.ProtocolVersion.V311
                await self._connect_and_serve(endpoint)
                return
            raise
        self._protocols[endpoint] = protocol
        _send_immediately(client)
        try:
            await self._serve(client, endpoint, protocol)
        finally:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    def _make_client(
        self, endpoint: BrokerEndpoint, protocol: aiomqtt.ProtocolVersion
    ) -> aiomqtt.Client:
        cfg = self.config
        v5 = protocol is aiomqtt.ProtocolVersion.V5
        properties = None
        if v5 and cfg.session_expiry:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = cfg.session_expiry
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        client = aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            identifier=cfg.client_id,
            username=endpoint.username or cfg.username,
            password=endpoint.password or cfg.password,
            protocol=protocol,
            will=will,
            clean_session=None if v5 else not cfg.session_expiry,
            clean_start=False if (v5 and cfg.session_expiry) else MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=cfg.keepalive,
            timeout=cfg.connect_timeout,
            tls_context=self._tls_context() if endpoint.tls else None,
            tls_insecure=(cfg.tls_insecure or not cfg.tls_verify) if endpoint.tls else None,
            max_inflight_messages=max(20, cfg.publish_window * 2),
            logger=logging.getLogger("ember.paho"),
        )
        adopt(client)
        client._client.place = self._reassembler.place  # type: ignore[attr-defined]
        # Chunked sends keep many QoS 1 publishes pending on purpose: do not warn about them.
        client.pending_calls_threshold = 1 << 30
        self._capture_connack_properties(client)
        return client

    def _capture_connack_properties(self, client: aiomqtt.Client) -> None:
        """Read the broker's Maximum Packet Size from the MQTT 5 CONNACK (aiomqtt drops it)."""
        paho = client._client  # with _send_immediately, where Ember reaches behind aiomqtt
        original = paho.on_connect

        def on_connect(*args: Any) -> None:
            properties = args[4] if len(args) > 4 else None
            self._broker_max_packet = getattr(properties, "MaximumPacketSize", None)
            assert original is not None
            original(*args)

        paho.on_connect = on_connect

    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.config
        context = ssl.create_default_context(cafile=cfg.ca_file)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        if cfg.tls_insecure or not cfg.tls_verify:
            context.check_hostname = False
        if not cfg.tls_verify:
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _serve(
        self, client: aiomqtt.Client, endpoint: BrokerEndpoint, protocol: aiomqtt.ProtocolVersion
    ) -> None:
        self.session += 1
        self.stats.connections += 1
        self._client = client
        self.endpoint_in_use = endpoint
        self.protocol_in_use = "5" if protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"
        self._lost = asyncio.Event()
        filters = self._broker_filters()
        self._refused = {}
        if filters:
            self._note_refused(client, filters, await client.subscribe(filters))
        log.info(
            "mqtt_connected",
            broker=str(endpoint),
            protocol=self.protocol_in_use,
            session=self.session,
            subscriptions=len(filters),
            broker_max_packet=self._broker_max_packet,
        )
        self._stalled = asyncio.Event()
        self._connected.set()
        # The hooks (which publish) and then the message loop each race a stall: a publish
        # that finds the client without a connection while nothing else noticed.
        stalled = asyncio.create_task(self._stalled.wait())
        steps: list[asyncio.Task[None]] = []
        try:
            for step in (self._run_hooks, functools.partial(self._read, client)):
                steps.append(asyncio.create_task(step()))
                await asyncio.wait({steps[-1], stalled}, return_when=asyncio.FIRST_COMPLETED)
                if not steps[-1].done():
                    raise aiomqtt.MqttError("connection stalled: the client cannot publish")
                steps[-1].result()  # the hooks' errors; the connection's end, as aiomqtt says
        finally:
            await cancel_and_wait(
                [stalled, *steps], suppress=(aiomqtt.MqttError, NotConnectedError)
            )
            if self._retry is not None:
                self._retry.cancel()

    async def _run_hooks(self) -> None:
        for hook in list(self._hooks):
            try:
                await hook(self.session)
            except (aiomqtt.MqttError, NotConnectedError):
                raise
            except Exception:
                log.exception("connect_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))

    async def _read(self, client: aiomqtt.Client) -> None:
        """Route what came while the hooks ran (in aiomqtt's queue), then have the client hand
        every PUBLISH straight to :meth:`_deliver`: aiomqtt's message iterator costs a task and
        an ``asyncio.wait`` per message (five per 1M-parameter update, one per receipt each
        trainer hears). Iterating it goes on, to end with the connection as aiomqtt says."""
        messages = client.messages
        while True:
            if not len(messages):  # drained: from now on nothing comes this way
                client._client.deliver = self._deliver_paho  # type: ignore[attr-defined]
            message = await anext(messages)
            self._deliver(message.topic.value, message.payload, message.retain, message.qos)

    def _deliver_paho(self, message: MQTTMessage) -> None:
        """A PUBLISH as paho decoded it (:func:`decode_publish`), routed."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("message_topic_not_utf8", topic=repr(message._topic)[:200])
            return
        self._deliver(topic, message.payload, message.retain, message.qos)

    def _deliver(self, topic: str, payload: Any, retain: bool, qos: int) -> None:
        """:meth:`_route`, and any error it raises logged: one bad message must never end
        the connection loop (nor reach paho, which would end it)."""
        try:
            self._route(topic, payload, retain, qos)
        except Exception:
            log.exception("message_route_failed", topic=topic)

    def _note_refused(
        self, client: aiomqtt.Client, filters: list[tuple[str, int]], granted: Sequence[object]
    ) -> None:
        """Remember the filters a SUBACK refused and retry them while this connection lasts.

        A clustered broker can refuse a subscription for a while: NATS backs each MQTT QoS 1
        subscription with a JetStream consumer and answers 0x80 when it cannot create one, as
        happens for seconds after a node of the cluster died. Left alone, the subscription would
        silently not exist until the next reconnect."""
        codes = [int(getattr(code, "value", code)) for code in granted]  # type: ignore[call-overload]
        for (topic_filter, qos), code in zip(filters, codes, strict=False):
            if code >= 0x80:
                log.warning("subscribe_refused", filter=topic_filter, code=code)
                self._refused[topic_filter] = qos
        if self._refused and (self._retry is None or self._retry.done()):
            self._retry = asyncio.create_task(self._retry_refused(client), name="mqtt-resubscribe")

    async def _retry_refused(self, client: aiomqtt.Client) -> None:
        delay = self.config.backoff_initial
        while self._refused and self._client is client:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.backoff_max)
            pending = list(self._refused.items())
            self._refused = {}
            try:
                granted = await client.subscribe(pending)
            except aiomqtt.MqttError:
                return  # the connection is going: the next one subscribes to everything
            self._note_refused(client, pending, granted)
            for topic_filter, _ in pending:
                if topic_filter not in self._refused:
                    log.info("subscribe_granted", filter=topic_filter)

    def _mark_disconnected(self) -> bool:
        """Forget the client; return whether a connection had been established."""
        was_connected = self._connected.is_set()
        if was_connected and not self._closing:
            log.warning("mqtt_disconnected", broker=str(self.endpoint_in_use), session=self.session)
        self._connected.clear()
        self._lost.set()
        self._client = None
        return was_connected

    def _describe_endpoints(self) -> str:
        return ", ".join(str(e) for e in self._endpoints)

    # receiving ---------------------------------------------------------------------------------
    def _route(self, topic: str, raw: Any, retain: bool, qos: int) -> None:
        """A received PUBLISH (``raw``: a view of paho's packet, see :func:`decode_publish`, or a
        :class:`PlacedFrame`) to every subscription it matches, once whole."""
        placed = isinstance(raw, PlacedFrame)
        payload: Payload = (
            raw
            if placed or isinstance(raw, (bytes, bytearray, memoryview))
            else str(raw or "").encode()
        )
        if not placed and not is_chunk(payload):
            payload = bytes(payload)  # whole messages reach subscribers as bytes
        else:
            try:
                if placed:
                    whole = self._reassembler.add_placed(topic, raw.head, raw.data)
                else:
                    whole = self._reassembler.add(topic, payload)
            except ReassemblyFull as exc:  # no room now: delayed (the sender resends), not lost
                self.stats.chunks_refused += 1
                if exc.first:
                    log.info("chunked_message_refused", topic=topic, reason=str(exc))
                return
            except ProtocolError as exc:  # ChunkError, or PayloadTooLarge for a forged size
                self.stats.chunks_rejected += 1
                log.warning("chunk_rejected", topic=topic, reason=str(exc))
                return
            if whole is None:
                return
            payload = whole
        self.stats.messages_in += 1
        self.stats.bytes_in += len(payload)
        inbound = Inbound(topic, payload, bool(retain), int(qos))
        matched = aiomqtt.Topic(topic)
        for sub in self._subscriptions:
            if not sub._closed and sub.matches(matched):
                sub.offer(inbound)

    def _on_reassembly_drop(self, source: str, reason: str, size: int) -> None:
        log.warning("chunked_message_dropped", topic=source, reason=reason, bytes=size)

    def _broker_filters(self) -> list[tuple[str, int]]:
        best: dict[str, int] = {}
        for sub in self._subscriptions:
            best[sub.topic_filter] = max(best.get(sub.topic_filter, 0), sub.qos)
        return list(best.items())

    def make_room(self, nbytes: int) -> int:
        """Let incomplete chunked messages hold at least ``nbytes`` together (at most half of
        this machine's memory); the bound in force is returned. A role that expects many large
        messages at once asks for room for them: an aggregator, one update from every trainer
        at work. With less, the messages past the bound are refused chunk by chunk while the
        broker still delivers every chunk of them (bench/aggregate: 32 trainers of an
        11M-parameter model, 1.4 GB in flight against 1 GiB).

        The messages of that room are also held in ordinary memory
        (:attr:`~agent.protocol.chunking.Reassembler.eager_bytes`): past the default budget
        they went to memory maps, each page a fault and the chunks copied rather than received
        in place, and 64 trainers of a 1M-parameter model had a fifth of their updates there."""
        limit = psutil.virtual_memory().total // 2
        room = min(nbytes, limit)
        reassembler = self._reassembler
        reassembler.max_pending_bytes = max(reassembler.max_pending_bytes, room)
        reassembler.eager_bytes = max(reassembler.eager_bytes, room)
        return reassembler.max_pending_bytes

    async def subscribe(
        self,
        topic_filter: str,
        qos: int = 1,
        *,
        max_messages: int | None = None,
        max_bytes: int | None = None,
    ) -> Subscription:
        """Receive messages matching ``topic_filter``, now and after every reconnect."""
        aiomqtt.Wildcard(topic_filter)  # validates the filter
        sub = Subscription(
            self,
            topic_filter,
            qos,
            max_messages or self.config.queue_messages,
            max_bytes or self.config.queue_bytes,
        )
        already = any(s.topic_filter == topic_filter and s.qos >= qos for s in self._subscriptions)
        self._subscriptions.append(sub)
        client = self._client
        if client is not None and not already:
            try:
                self._note_refused(
                    client, [(topic_filter, qos)], await client.subscribe(topic_filter, qos)
                )
            except aiomqtt.MqttError as exc:
                # Restored by the next reconnect, like every other subscription.
                log.warning("subscribe_deferred", filter=topic_filter, error=str(exc))
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)
        client = self._client
        if client is None or any(s.topic_filter == sub.topic_filter for s in self._subscriptions):
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe(sub.topic_filter)

    # publishing --------------------------------------------------------------------------------
    def chunk_size(self, topic: str) -> int:
        """Data bytes per chunk: the configured size, lowered to fit the broker's packet limit.

        Unconfigured, it follows the connection: over MQTT 5 the broker's CONNACK says what it
        accepts (no Maximum Packet Size: no limit), so frames are as large as that allows up to
        :data:`MQTT5_CHUNK_SIZE`; over MQTT 3.1.1 (and before the first connection) no broker
        can say, and frames keep to :data:`DEFAULT_CHUNK_SIZE`, below every default limit.
        A broker that caps packets without announcing it over MQTT 5 needs ``chunk_size`` set.
        """
        size = self.config.chunk_size
        if size is None:
            size = MQTT5_CHUNK_SIZE if self.protocol_in_use == "5" else DEFAULT_CHUNK_SIZE
        if self._broker_max_packet:
            size = min(size, self._broker_max_packet - HEADER_SIZE - len(topic.encode()) - 64)
        return max(1024, size)

    async def publish(
        self,
        topic: str,
        payload: Payload | str,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish ``payload``; as chunk frames when larger than the chunk size, or than
        :data:`DEFAULT_CHUNK_SIZE` (over MQTT 5 a message may fit one frame that is larger:
        it still goes as a frame, the same message on the wire as before, written from the
        caller's buffer and received in place, where a whole message is copied on both sides).

        QoS 1 and 2 wait for the broker's acknowledgement of every frame, riding out reconnects
        until ``timeout`` (``None`` waits as long as it takes) and raising
        :class:`NotConnectedError` after it. QoS 0 while disconnected is dropped and counted.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        size = memoryview(data).nbytes
        if size > self.config.max_message_bytes:
            raise PayloadTooLarge(
                f"message of {size} bytes for {topic} is above the limit of "
                f"{self.config.max_message_bytes}"
            )
        chunk = self.chunk_size(topic)
        whole_max = min(chunk, DEFAULT_CHUNK_SIZE)
        if size > whole_max:
            if retain:
                raise ValueError(
                    f"{topic}: a retained message must fit one chunk ({whole_max} bytes)"
                )
            qos = max(qos, 1)  # one lost frame would lose the whole message
            frames: list[bytes | bytearray | Frame] = [*cut_frames(data, chunk)]
            chunked: Payload | None = data
        else:
            frames = [bytes(data) if isinstance(data, memoryview) else data]
            chunked = None
        if qos == 0 and not self.connected:
            self.stats.dropped_qos0_offline += 1
            log.debug("qos0_dropped_offline", topic=topic)
            return
        await self._send(topic, frames, qos, retain, timeout, chunked)
        self.stats.messages_out += 1
        self.stats.bytes_out += size

    async def _send(
        self,
        topic: str,
        frames: list[bytes | bytearray | Frame],
        qos: int,
        retain: bool,
        timeout: float | None,
        chunked: Payload | None = None,
    ) -> None:
        """Send ``frames`` (``chunked``: the message they were cut from) until the broker has
        acknowledged each, across reconnects."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pending = set(range(len(frames)))
        attempts = 0
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            if not self.connected:
                if not await wait_event(self._connected, remaining):
                    raise NotConnectedError(
                        f"publish to {topic}: no broker connection within {timeout:g} s "
                        f"({len(pending)} of {len(frames)} frames unsent)"
                    )
                continue
            client, lost = self._client, self._lost
            assert client is not None
            chunk = self.chunk_size(topic)
            if chunked is not None and any(
                isinstance(frame, Frame) and frame.data.nbytes > chunk for frame in frames
            ):
                # Cut for a broker that took larger packets than this one says it does (a
                # failover): sent as they are, each would cost the connection, again and again.
                # Cut again, under a new message id, all of it is sent anew.
                frames = [*cut_frames(chunked, chunk)]
                pending = set(range(len(frames)))
                log.info("publish_recut", topic=topic, frames=len(frames), chunk_size=chunk)
            if attempts:
                self.stats.resent_after_reconnect += len(pending)
                log.info("publish_resume", topic=topic, frames=len(pending), of=len(frames))
            attempts += 1
            sender = asyncio.ensure_future(
                self._send_frames(client, topic, frames, pending, qos, retain)
            )
            watcher = asyncio.ensure_future(lost.wait())
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(
                {sender, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            watcher.cancel()
            if sender in done:
                error = sender.exception()
                if error is None:
                    return
                if not _is_transient(error):
                    raise error
            else:
                await cancel_and_wait([sender], suppress=(aiomqtt.MqttError,))
                if not done:
                    raise NotConnectedError(
                        f"publish to {topic}: not acknowledged within {timeout:g} s "
                        f"({len(pending)} of {len(frames)} frames unacknowledged)"
                    )
            if attempts >= _MAX_SEND_ATTEMPTS:
                raise NotConnectedError(
                    f"publish to {topic}: the connection dropped {attempts} times while sending "
                    f"{len(frames)} frame(s); is chunk_size above the broker's max_packet_size?"
                )
            if not lost.is_set():
                # The publish failed first: let the connection loop notice the loss. It does
                # not always: a NATS node that resets the socket while failing a JetStream
                # request left paho without a connection and aiomqtt's message loop waiting
                # (measured, tests/coordinator/test_clustered_broker.py). Then it is told to.
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                grace = STALL_GRACE if remaining is None else min(STALL_GRACE, remaining)
                await wait_event(lost, grace)
                if not lost.is_set() and self._client is client:
                    log.warning("mqtt_connection_stalled", topic=topic, error=str(error))
                    self._stalled.set()
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                if not await wait_event(lost, remaining):
                    raise NotConnectedError(f"publish to {topic}: connection failing")

    async def _send_frames(
        self,
        client: aiomqtt.Client,
        topic: str,
        frames: list[bytes | bytearray | Frame],
        pending: set[int],
        qos: int,
        retain: bool,
    ) -> None:
        window = asyncio.Semaphore(self.config.publish_window)

        async def send(index: int) -> None:
            async with window:
                await client.publish(
                    topic,
                    frames[index],  # type: ignore[arg-type]  # a Frame: see EmberPahoClient
                    qos=qos,
                    retain=retain,
                    timeout=math.inf,
                )
            pending.discard(index)
            self.stats.frames_out += 1

        tasks = [asyncio.ensure_future(send(i)) for i in sorted(pending)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()


def _send_immediately(client: aiomqtt.Client) -> None:
    """Turn Nagle's algorithm off (paho leaves it on): otherwise a small packet written while an
    earlier segment is unacknowledged waits for that ACK, which the broker's delayed ACK holds
    up to 40 ms, so every update receipt and model version paid about 40 ms on loopback."""
    sock = client._client.socket()  # paho's socket; aiomqtt does not expose it
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        with contextlib.suppress(OSError):
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _refuses_v5(exc: aiomqtt.MqttError) -> bool:
    """Did the broker refuse MQTT 5: a CONNACK with 3.1.1 code 1 or MQTT 5 reason 0x84, or no
    CONNACK at all to a connection it accepted (amqtt never answers an MQTT 5 CONNECT that
    carries both a Will and a client id)?"""
    if isinstance(exc, MqttConnectError):
        rc = getattr(exc, "rc", None)
        value = getattr(rc, "value", rc)
        return value in (1, 0x84) or "protocol" in str(exc).lower()
    return str(exc) == "Operation timed out"


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, aiomqtt.MqttCodeError):
        return error.rc in _TRANSIENT_CODES or error.rc is None
    return isinstance(error, aiomqtt.MqttError)

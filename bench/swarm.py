"""Many simulated agents in one process, each with its own MQTT connection (a load generator).

``python -m bench.swarm CONFIG.json``: ``count`` agents named ``<id_prefix><n>`` with the
``common`` datasets and labels, plus the ``extra`` ones as given. Every agent connects with its
own client id and a Will (retained offline status), publishes a retained online status and a
retained info document shaped like a real agent's (onnxruntime, its datasets), subscribes to
its inbox, sends
telemetry every ``interval`` seconds (spread evenly over the interval) and answers a role
assignment by publishing its retained roles document with the role running, as an agent does.
Prints ``ready`` once every agent is announced, then one JSON line per assignment received.

The agents speak MQTT 3.1.1 through a minimal client written here over asyncio streams (a few
kilobytes per connection) rather than through Ember's transport: a full aiomqtt/paho client per
identity would make the load generator, not the coordinator under test, the bottleneck of a
2-core machine at 10,000 identities. The documents are the ones ``agent.presence`` sends.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
from typing import Any

from agent.protocol import Topics, decode_message
from agent.protocol.chunking import Reassembler, is_chunk
from agent.protocol.errors import ProtocolError
from agent.protocol.messages import AssignRole

CONNECT_CONCURRENCY = 100


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


class MiniClient:
    """One MQTT 3.1.1 connection: CONNECT with a Will, PUBLISH at QoS 0/1, one SUBSCRIBE."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._next_id = 0

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def connect(
        self, host: str, port: int, will_topic: str, will: bytes, keepalive: int
    ) -> None:
        self.reader, self.writer = await asyncio.open_connection(host, port, limit=1 << 22)
        flags = 0x02 | 0x04 | 0x08 | 0x20  # clean session, Will at QoS 1, retained
        body = (
            _string("MQTT")
            + bytes([4, flags])
            + struct.pack("!H", keepalive)
            + _string(self.client_id)
            + _string(will_topic)
            + _string(will)
        )
        self.writer.write(_packet(0x10, body))
        kind, payload = await self.read()
        if kind >> 4 != 2 or payload[1] != 0:
            raise ConnectionError(f"{self.client_id}: CONNACK {payload!r}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        assert self.writer is not None
        header = 0x30 | (qos << 1) | int(retain)
        ident = struct.pack("!H", self._packet_id()) if qos else b""
        self.writer.write(_packet(header, _string(topic) + ident + payload))

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        assert self.writer is not None
        body = struct.pack("!H", self._packet_id()) + _string(topic_filter) + bytes([qos])
        self.writer.write(_packet(0x82, body))

    async def read(self) -> tuple[int, bytes]:
        assert self.reader is not None
        first = (await self.reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await self.reader.readexactly(1))[0]
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, await self.reader.readexactly(length)

    def puback(self, packet_id: bytes) -> None:
        assert self.writer is not None
        self.writer.write(_packet(0x40, packet_id))


class SimulatedAgent:
    """An agent identity as the coordinator sees it: retained documents, telemetry, an inbox."""

    def __init__(self, agent: str, config: dict[str, Any], topics: Topics) -> None:
        self.agent = agent
        self.config = config
        self.topics = topics
        self.client = MiniClient(agent)
        self.roles: dict[str, Any] = {}
        self.reassembler = Reassembler(
            max_message_bytes=64 << 20, max_pending_bytes=64 << 20, timeout=60
        )

    def status(self, state: str) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "type": "agent_status",
                "id": f"{self.agent}-{state}",
                "agent": self.agent,
                "state": state,
                "session": 1,
                "ts": time.time(),
                "reason": "" if state == "online" else "connection lost",
            }
        ).encode()

    def info(self) -> bytes:
        datasets = [dict(d) for d in self.config["datasets"]]
        return json.dumps(
            {
                "v": 1,
                "agent": self.agent,
                "ts": time.time(),
                "version": "0.1.0",
                "hostname": self.agent,
                "os": {"system": "Linux", "release": "6.6", "distro": "Debian GNU/Linux 12"},
                "arch": "aarch64",
                "cpu": {"model": "Cortex-A76", "cores": 4, "threads": 4},
                "memory": {"total": 8 << 30},
                "accelerators": [],
                "runtimes": {
                    "onnxruntime": {"version": "1.20.0", "providers": ["CPUExecutionProvider"]},
                    "torch": None,
                },
                "allow_code": False,
                "labels": dict(self.config.get("labels", {})),
                "datasets": datasets,
                "topics": {
                    "status": self.topics.agent_status(self.agent),
                    "telemetry": self.topics.agent_telemetry(self.agent),
                    "inbox": self.topics.agent_inbox(self.agent),
                    "roles": self.topics.agent_roles(self.agent),
                },
            }
        ).encode()

    def telemetry(self) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "agent": self.agent,
                "ts": round(time.time(), 3),
                "cpu_percent": 3.1,
                "load": [0.12, 0.08, 0.05],
                "memory": {"total": 8 << 30, "available": 6 << 30, "percent": 25.0},
                "temperature": {"cpu_thermal": 48.2},
                "disk": {"path": "/var/lib/ember", "total": 64 << 30, "used": 9 << 30},
                "net": {"bytes_sent": 123456, "bytes_recv": 654321},
                "uptime": 86400,
                "agent_process": {"rss": 55_000_000, "cpu_percent": 0.1, "threads": 4},
                "roles": sorted(self.roles),
            },
            separators=(",", ":"),
        ).encode()

    async def start(self, host: str, port: int) -> None:
        await self.client.connect(
            host, port, self.topics.agent_status(self.agent), self.status("offline"), 120
        )
        self.client.subscribe(self.topics.agent_inbox(self.agent), 1)
        self.client.publish(
            self.topics.agent_status(self.agent), self.status("online"), qos=1, retain=True
        )
        self.client.publish(self.topics.agent_info(self.agent), self.info(), qos=1, retain=True)

    async def serve(self) -> None:
        while True:
            kind, body = await self.client.read()
            if kind >> 4 != 3:
                continue  # acknowledgements
            qos = (kind >> 1) & 0x03
            length = struct.unpack("!H", body[:2])[0]
            topic = body[2 : 2 + length].decode()
            rest = body[2 + length :]
            if qos:
                self.client.puback(rest[:2])
                rest = rest[2:]
            payload: bytes | bytearray | None = rest
            if is_chunk(rest):
                payload = self.reassembler.add(topic, rest)
            if payload is not None:
                self.on_inbox(payload)

    def on_inbox(self, payload: bytes | bytearray) -> None:
        try:
            command = decode_message(payload, expect=AssignRole)
        except ProtocolError:
            return
        assert isinstance(command, AssignRole)
        print(
            json.dumps({"assigned": self.agent, "role": command.role, "t": time.time()}),
            flush=True,
        )
        key = f"{command.job}/{command.role}"
        self.roles[key] = {
            "job": command.job,
            "role": command.role,
            "state": "running",
            "reason": "",
            "bundle": None,
            "since": time.time(),
        }
        document = {"v": 1, "agent": self.agent, "ts": time.time(), "roles": self.roles}
        self.client.publish(
            self.topics.agent_roles(self.agent), json.dumps(document).encode(), qos=1, retain=True
        )


async def heartbeat(agents: list[SimulatedAgent], topics: Topics, interval: float) -> None:
    """Telemetry from every agent once per ``interval``, spread evenly over it."""
    if interval <= 0:
        return
    tick = 0.1
    per_tick = max(1, round(len(agents) * tick / interval))
    index = 0
    while True:
        began = time.monotonic()
        for _ in range(per_tick):
            agent = agents[index % len(agents)]
            index += 1
            agent.client.publish(topics.agent_telemetry(agent.agent), agent.telemetry())
        await asyncio.sleep(max(0.0, tick - (time.monotonic() - began)))


async def main_async(config: dict[str, Any]) -> None:
    topics = Topics(str(config["prefix"]))
    specs: list[dict[str, Any]] = [
        {"id": f"{config['id_prefix']}{n}"} for n in range(int(config["count"]))
    ] + list(config.get("extra", []))
    agents = [SimulatedAgent(spec["id"], {**config["common"], **spec}, topics) for spec in specs]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def start(agent: SimulatedAgent) -> None:
        async with gate:
            await agent.start(str(config["host"]), int(config["port"]))

    await asyncio.gather(*(start(a) for a in agents))
    servers = [asyncio.create_task(a.serve()) for a in agents]
    beat = asyncio.create_task(heartbeat(agents, topics, float(config["interval"])))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # run until told to stop
    beat.cancel()
    for task in servers:
        task.cancel()
    for agent in agents:
        if agent.client.writer is not None:
            agent.client.writer.close()


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        config = json.load(handle)
    asyncio.run(main_async(config))


if __name__ == "__main__":
    main()

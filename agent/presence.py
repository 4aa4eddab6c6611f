"""The agent's presence on the broker: retained status, retained info and periodic telemetry.

Status follows the MQTT Will pattern with a Sparkplug B-style session number (bdSeq):

* the Will, registered with every CONNECT, is the retained ``AgentStatus`` ``offline`` JSON;
* right after each CONNACK the agent publishes the retained ``online`` status;
* before a clean DISCONNECT it publishes the retained ``offline`` status itself (the broker
  discards the Will on a clean disconnect).

The ``session`` number grows by one with every connection *and survives restarts of the agent*:
it is kept in ``state_dir/session``. The Will registered for a connection carries the same
number as that connection's ``online`` message (as Sparkplug's NDEATH carries its NBIRTH's
bdSeq), so a dashboard can drop a late Will of an older session: a status whose session is
lower than the last one seen is stale. (Ember also reuses a stable MQTT client id per agent, so
a restarted agent takes over its dead predecessor's connection at once and the predecessor's
Will is published *before* the new ``online``, never after it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import structlog

from agent import __version__
from agent.protocol.messages import AgentStatus
from agent.protocol.topics import Topics
from agent.tasks import cancel_and_wait
from agent.transport import NotConnectedError, Transport, WillMessage

log = structlog.get_logger("ember.presence")

INFO_VERSION = 1
TELEMETRY_VERSION = 1


class SessionCounter:
    """A connection counter kept in a file, like Sparkplug B's bdSeq but never reset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = self._load()

    def _load(self) -> int:
        try:
            return max(0, int(self.path.read_text(encoding="utf-8").strip() or 0))
        except (OSError, ValueError):
            return 0

    @property
    def upcoming(self) -> int:
        """The session number the next connection will have."""
        return self.last + 1

    def advance(self) -> int:
        """Count one connection; persist it (blocking, small) and return its number."""
        self.last += 1
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{self.last}\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("session_not_persisted", path=str(self.path), error=str(exc))
        return self.last


def status_payload(agent_id: str, state: str, session: int, reason: str = "") -> bytes:
    return AgentStatus(agent=agent_id, state=state, session=session, reason=reason).to_json()  # type: ignore[arg-type]


def build_info(
    *,
    agent_id: str,
    topics: Topics,
    labels: Mapping[str, str],
    hardware: Mapping[str, Any],
    runtimes: Mapping[str, Any],
    datasets: Sequence[Mapping[str, Any]],
    allow_code: bool,
) -> dict[str, Any]:
    """The retained capabilities document (``agents/<id>/info``), a stable flat-ish JSON object
    for dashboards and the coordinator's planner. ``v`` is bumped only for incompatible changes;
    new keys may appear at any time."""
    return {
        "v": INFO_VERSION,
        "agent": agent_id,
        "ts": round(time.time(), 3),
        "version": __version__,
        **hardware,
        "runtimes": dict(runtimes),
        "allow_code": allow_code,
        "labels": dict(labels),
        "datasets": list(datasets),
        "topics": {
            "status": topics.agent_status(agent_id),
            "telemetry": topics.agent_telemetry(agent_id),
            "inbox": topics.agent_inbox(agent_id),
            "roles": topics.agent_roles(agent_id),
        },
    }


class TelemetrySampler:
    """One psutil sample of the device's health (blocking reads of /proc and /sys)."""

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self.started = time.time()
        self._process = psutil.Process()
        psutil.cpu_percent(None)  # start the interval the first sample is measured over
        self._process.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        temperatures = self._temperatures()
        out: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(None),
            "load": [round(v, 2) for v in os.getloadavg()],
            "memory": {"total": vm.total, "available": vm.available, "percent": vm.percent},
            "temperature": temperatures,
            "temperature_max": max(temperatures.values(), default=None),
            "disk": None,
            "net": None,
            "uptime": round(time.time() - psutil.boot_time()),
        }
        with contextlib.suppress(OSError):
            disk = psutil.disk_usage(str(self.disk_path))
            out["disk"] = {
                "path": str(self.disk_path),
                "total": disk.total,
                "used": disk.used,
                "free": disk.free,
                "percent": disk.percent,
            }
        with contextlib.suppress(OSError, RuntimeError):
            net = psutil.net_io_counters()
            if net is not None:
                out["net"] = {"bytes_sent": net.bytes_sent, "bytes_recv": net.bytes_recv}
        with self._process.oneshot():
            out["agent_process"] = {
                "rss": self._process.memory_info().rss,
                "cpu_percent": self._process.cpu_percent(None),
                "threads": self._process.num_threads(),
                "uptime": round(time.time() - self.started),
            }
        return out

    @staticmethod
    def _temperatures() -> dict[str, float]:
        """Hottest reading per sensor chip (``cpu_thermal`` on a Pi, ``coretemp`` on x86)."""
        read = getattr(psutil, "sensors_temperatures", None)
        if read is None:
            return {}
        try:
            chips = read()
        except (OSError, RuntimeError):
            return {}
        return {
            chip: round(max(e.current for e in entries), 1)
            for chip, entries in chips.items()
            if entries
        }


class Presence:
    """Status (MQTT Will pattern + Sparkplug B bdSeq-style session), info and telemetry."""

    def __init__(
        self,
        *,
        agent_id: str,
        topics: Topics,
        sessions: SessionCounter,
        sampler: TelemetrySampler,
        telemetry_interval: float,
        running_roles: Callable[[], list[str]] = list,
        updates_sent: Callable[[], int] = lambda: 0,
    ) -> None:
        self.agent_id = agent_id
        self.topics = topics
        self.sessions = sessions
        self.sampler = sampler
        self.telemetry_interval = telemetry_interval
        self.running_roles = running_roles
        self.updates_sent = updates_sent
        self.info: bytes | None = None
        self.online = asyncio.Event()
        self._announced = 0
        """The transport connection whose online status has been published."""
        self._transport: Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def status_topic(self) -> str:
        return self.topics.agent_status(self.agent_id)

    def will(self) -> WillMessage:
        """The Will for the next connection: retained offline with that connection's session."""
        payload = status_payload(
            self.agent_id, "offline", self.sessions.upcoming, "connection lost"
        )
        return WillMessage(self.status_topic, payload, qos=1, retain=True)

    def attach(self, transport: Transport) -> None:
        self._transport = transport
        transport.on_connect(self.on_connect)

    async def on_connect(self, _transport_session: int) -> None:
        """After every CONNACK: count the session, publish online (and info), arm the next Will."""
        transport = self._require()
        session = await asyncio.to_thread(self.sessions.advance)
        transport.will = self.will()  # for the next connection, whatever happens to this one
        await transport.publish(
            self.status_topic, status_payload(self.agent_id, "online", session), qos=1, retain=True
        )
        self.online.set()
        self._announced = transport.session
        log.info("status_online", session=session, broker=str(transport.endpoint_in_use))
        if self.info is not None:
            await transport.publish(
                self.topics.agent_info(self.agent_id), self.info, qos=1, retain=True
            )

    def set_info(self, document: Mapping[str, Any]) -> None:
        """Keep the info document and publish it now if connected (else at the next connect)."""
        self.info = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
        transport = self._require()
        if transport.connected and self._announced == transport.session:
            # Otherwise the connect hook publishes it, after the online status.
            self._spawn(self._publish_retained(self.topics.agent_info(self.agent_id), self.info))

    async def _publish_retained(self, topic: str, payload: bytes) -> None:
        try:
            await self._require().publish(topic, payload, qos=1, retain=True, timeout=30)
        except NotConnectedError as exc:
            log.info("publish_deferred_to_reconnect", topic=topic, error=str(exc))

    def offline_final(self, reason: str = "stopped") -> tuple[str, bytes, bool]:
        """The retained offline status to publish before a clean disconnect."""
        session = self.sessions.last
        return (self.status_topic, status_payload(self.agent_id, "offline", session, reason), True)

    # telemetry ---------------------------------------------------------------------------------
    def start_telemetry(self) -> None:
        if self.telemetry_interval > 0:
            self._spawn(self._telemetry_loop())

    async def _telemetry_loop(self) -> None:
        transport = self._require()
        topic = self.topics.agent_telemetry(self.agent_id)
        while True:
            await asyncio.sleep(self.telemetry_interval)
            if not transport.connected:
                continue
            try:
                sample = await asyncio.to_thread(self.sampler.sample)
            except Exception:
                log.exception("telemetry_sample_failed")
                continue
            document = {
                "v": TELEMETRY_VERSION,
                "agent": self.agent_id,
                "ts": round(time.time(), 3),
                **sample,
                "roles": self.running_roles(),
                "updates_sent": self.updates_sent(),
            }
            with contextlib.suppress(NotConnectedError):
                await transport.publish(topic, json.dumps(document, separators=(",", ":")), qos=0)

    async def close(self) -> None:
        await cancel_and_wait(self._tasks, suppress=(Exception,))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _require(self) -> Transport:
        if self._transport is None:
            raise RuntimeError("Presence.attach(transport) first")
        return self._transport

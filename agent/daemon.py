"""The agent's lifecycle: start, stay present, host roles, stop cleanly.

Start-up order, chosen so that the device counts as started even when its broker is down and
reaches ``online`` as fast as the broker answers:

1. the MQTT transport starts connecting (Will = retained offline status, see
   :mod:`agent.presence`), with the inbox subscription declared so it is in the first SUBSCRIBE;
2. ``READY=1`` goes to systemd right away (sd_notify(3)): readiness never waits for the broker;
3. watchdog pings (``WATCHDOG=1`` at half ``$WATCHDOG_USEC``) come from a task on the event
   loop itself, so a wedged loop stops them and systemd restarts the agent;
4. in the background: the capabilities document (hardware in a worker thread, ML runtimes in a
   child process, dataset summaries from the cache), telemetry, zeroconf registration.

After every (re)connection the agent publishes its retained online status, its info document
and its role states. SIGTERM or SIGINT: ``STOPPING=1``, roles cancelled, zeroconf goodbye, the
role states and a retained offline status published, then a clean MQTT DISCONNECT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent import capabilities
from agent.config import AgentConfig
from agent.datasets import Dataset, DatasetSummary, summarize_all, summarize_all_in_child
from agent.discovery import Advertiser, txt_record
from agent.health import HEARTBEAT_INTERVAL, Health, State, health_path, write_health
from agent.homeassistant import DiscoveryPublisher
from agent.notify import Notifier, watchdog_interval
from agent.presence import Presence, SessionCounter, TelemetrySampler, build_info
from agent.protocol.homeassistant import agent_discovery
from agent.runtime import RoleRuntime
from agent.tasks import cancel_and_wait
from agent.transport import Transport

if TYPE_CHECKING:
    from agent.roles.base import Role

log = structlog.get_logger("ember.agent")


def dataset_cache(config: AgentConfig) -> Path:
    return config.state_dir / "datasets.json"


def runtimes_cache(config: AgentConfig) -> Path:
    return config.state_dir / "runtimes.json"


def info_document(
    config: AgentConfig,
    agent_id: str,
    hardware: Mapping[str, Any],
    runtimes: Mapping[str, Any],
    summaries: Sequence[DatasetSummary],
) -> dict[str, Any]:
    return build_info(
        agent_id=agent_id,
        topics=config.topics,
        labels=config.labels,
        hardware=hardware,
        runtimes=runtimes,
        datasets=[s.to_info() for s in summaries],
        allow_code=config.allow_code,
    )


def collect_info(config: AgentConfig, agent_id: str) -> dict[str, Any]:
    """The info document, computed synchronously (``ember-agent info``); raises
    :class:`~agent.datasets.DatasetError` for a bad dataset."""
    summaries = summarize_all(config.datasets, dataset_cache(config))
    hardware = capabilities.hardware(config.state_dir)
    runtimes = capabilities.probe_runtimes(runtimes_cache(config))
    return info_document(config, agent_id, hardware, runtimes, summaries)


class AgentDaemon:
    """One edge agent: presence by MQTT Will with a Sparkplug-style session, capabilities,
    telemetry, DNS-SD advertisement (RFC 6763) and the role runtime, under sd_notify(3)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        agent_id: str,
        summaries: Sequence[DatasetSummary] | None = None,
        notifier: Notifier | None = None,
        role_types: Mapping[str, type[Role]] | None = None,
    ) -> None:
        self.config = config
        self.agent_id = agent_id
        self.summaries = summaries
        self.notifier = notifier or Notifier()
        self.role_types = role_types
        self.stopped = asyncio.Event()
        self.transport: Transport | None = None
        self.presence: Presence | None = None
        self.runtime: RoleRuntime | None = None
        self.advertiser: Advertiser | None = None
        self.homeassistant: DiscoveryPublisher | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until :meth:`request_stop` (or SIGTERM/SIGINT when ``handle_signals``)."""
        config = self.config
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        topics = config.topics
        sessions = await asyncio.to_thread(SessionCounter, config.state_dir / "session")
        sampler = await asyncio.to_thread(TelemetrySampler, config.state_dir)
        datasets = {d.name: Dataset(d) for d in config.datasets}
        broker = config.broker
        if broker.client_id is None:
            # A stable client id: a restarted agent takes over its dead predecessor's session at
            # once, so the predecessor's Will lands before the new online status, not after it.
            broker = dataclasses.replace(broker, client_id=f"ember-agent-{self.agent_id}")
        self.presence = presence = Presence(
            agent_id=self.agent_id,
            topics=topics,
            sessions=sessions,
            sampler=sampler,
            telemetry_interval=config.telemetry.interval,
            running_roles=self._running_roles,
            updates_sent=self._updates_sent,
        )
        self.transport = transport = Transport(broker, will=presence.will(), name="ember-agent")
        self.runtime = runtime = RoleRuntime(
            agent_id=self.agent_id,
            topics=topics,
            transport=transport,
            state_dir=config.state_dir,
            datasets=datasets,
            trusted_keys=config.coordinator_keys,
            allow_code=config.allow_code,
            role_types=self.role_types,
            role_extras={
                "labels": dict(config.labels),
                "slowdown": config.simulation.slowdown,
                "partial_work": config.simulation.partial_work,
                "min_update_seconds": config.simulation.min_update_seconds,
                "spool_max_updates": config.spool.max_updates,
                "spool_max_bytes": int(config.spool.max_mb * (1 << 20)),
            },
        )
        presence.attach(transport)
        transport.on_connect(self._on_connect)
        await runtime.start()
        if config.homeassistant.enabled:
            await self._start_homeassistant(transport)
        transport.start()
        brokers = [str(e) for e in broker.endpoints()]  # without credentials
        self.notifier.send("READY=1", f"STATUS=connecting to {brokers[0]}")
        log.info(
            "agent_started",
            agent=self.agent_id,
            brokers=brokers,
            datasets=sorted(datasets),
            state_dir=str(config.state_dir),
            watchdog=watchdog_interval(),
        )
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            self._spawn(self._watchdog(interval))
        presence.start_telemetry()
        self._spawn(self._heartbeat())
        self._spawn(self._publish_info())
        if config.zeroconf.enabled:
            self.advertiser = Advertiser(
                agent_id=self.agent_id,
                properties=txt_record(
                    agent_id=self.agent_id,
                    version=_version(),
                    arch=_arch(),
                    datasets=[d.name for d in config.datasets],
                    info_topic=topics.agent_info(self.agent_id),
                    prefix=topics.prefix,
                ),
                interfaces=config.zeroconf.interfaces,
            )
            self._spawn(self.advertiser.start())
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()

    async def _start_homeassistant(self, transport: Transport) -> None:
        """Announce this agent to Home Assistant (MQTT discovery), if the config says so."""
        ha = self.config.homeassistant
        self.homeassistant = DiscoveryPublisher(transport, ha.discovery_prefix)
        self.homeassistant.set(
            "agent",
            agent_discovery(
                ha.discovery_prefix,
                self.agent_id,
                self.config.topics,
                telemetry_interval=self.config.telemetry.interval,
            ),
        )
        await self.homeassistant.start()

    def _running_roles(self) -> list[str]:
        return self.runtime.running() if self.runtime is not None else []

    def _updates_sent(self) -> int:
        return self.runtime.updates_sent if self.runtime is not None else 0

    async def _on_connect(self, session: int) -> None:
        self.notifier.send(f"STATUS=online (connection {session})")
        await self._write_health("online")

    async def _heartbeat(self) -> None:
        """Rewrite ``state_dir/health.json`` from the event loop (see :mod:`agent.health`)."""
        while True:
            connected = self.transport is not None and self.transport.connected
            await self._write_health("online" if connected else "connecting")
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _write_health(self, state: State) -> None:
        health = Health(
            pid=os.getpid(),
            state=state,
            session=self.presence.sessions.last if self.presence is not None else 0,
            version=_version(),
            agent=self.agent_id,
            ts=time.time(),
        )
        try:
            await asyncio.to_thread(write_health, health_path(self.config.state_dir), health)
        except OSError as exc:
            log.warning("health_not_written", state_dir=str(self.config.state_dir), error=str(exc))

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` from the event loop: if the loop wedges, the pings stop."""
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _publish_info(self) -> None:
        try:
            await self._collect_and_publish_info()
        except Exception:
            log.exception("info_failed")

    async def _collect_and_publish_info(self) -> None:
        config = self.config
        summaries = self.summaries
        if summaries is None:
            try:
                summaries = await summarize_all_in_child(config.datasets, dataset_cache(config))
            except ValueError as exc:
                log.error("datasets_invalid", error=str(exc))
                summaries = []
        hardware = await asyncio.to_thread(capabilities.hardware, config.state_dir)
        runtimes = await capabilities.probe_runtimes_async(runtimes_cache(config))
        document = info_document(config, self.agent_id, hardware, runtimes, summaries)
        assert self.presence is not None
        self.presence.set_info(document)
        log.info("info_ready", datasets=[s.name for s in summaries], runtimes=sorted(runtimes))

    async def _shutdown(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        log.info("agent_stopping", agent=self.agent_id)
        await cancel_and_wait(self._tasks, suppress=(Exception,))
        if self.runtime is not None:
            await self.runtime.stop()
        if self.advertiser is not None:
            await self.advertiser.close()
        if self.homeassistant is not None:
            await self.homeassistant.close()
        if self.presence is not None:
            await self.presence.close()
        if self.transport is not None:
            final = []
            if self.runtime is not None:
                final += self.runtime.final_publishes()
            if self.presence is not None:
                final.append(self.presence.offline_final("stopped"))
            await self.transport.close(final=final)
        self.notifier.close()
        await self._write_health("stopped")
        self.stopped.set()
        log.info("agent_stopped", agent=self.agent_id)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _version() -> str:
    from agent import __version__

    return __version__


def _arch() -> str:
    import platform

    return platform.machine()

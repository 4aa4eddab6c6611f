"""``ember serve``: the coordinator, one process beside an MQTT broker.

It wires the parts together: the fleet :class:`~coordinator.registry.Registry` (retained agent
topics, plus zeroconf on the LAN), the SQLite :class:`~coordinator.store.Store`, the
:class:`~coordinator.dispatcher.Dispatcher` that follows jobs, the
:class:`~coordinator.model_keeper.ModelKeeper` that keeps the newest weights of every job's
model, the :class:`~coordinator.rpc.RpcServer` the CLI talks to, and, unless told otherwise, an
embedded agent (a child process running ``ember-agent run``) that hosts the top aggregator role.

Stopping: SIGTERM or SIGINT stops cleanly (queued commands are flushed, the embedded agent is
stopped, the MQTT session is closed). SIGKILL loses nothing either: every state change is in
SQLite before it is announced, and a restart reloads the jobs and follows them on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.process import spawn_agent, stop_process
from agent.protocol.homeassistant import DEFAULT_DISCOVERY_PREFIX
from agent.protocol.messages import RpcRequest
from agent.protocol.topics import DEFAULT_PREFIX, Topics, check_segment
from agent.tasks import cancel_and_wait
from agent.transport import BrokerConfig, Transport
from coordinator.brokerkit import KitError
from coordinator.bundles import INFERENCE, init_key, public_text
from coordinator.dispatcher import SHOWN_VERSIONS, Dispatcher, JobError, Timings
from coordinator.enrolment import Enrolment
from coordinator.homeassistant import JobAnnouncer
from coordinator.model_keeper import DEFAULT_FINAL_GRACE, DEFAULT_INTERVAL, ModelKeeper
from coordinator.registry import LanBrowser, Registry
from coordinator.rpc import RpcError, RpcServer
from coordinator.spec import parse_spec
from coordinator.store import Store, StoredWeights

log = structlog.get_logger("ember.service")

LOCK_FILE = "coordinator.lock"
EMBEDDED_CONFIG = "embedded-agent.toml"
EMBEDDED_LOG = "embedded-agent.log"


class ServiceError(RuntimeError):
    """``ember serve`` cannot start (state directory in use, unreadable key, ...)."""


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """How to run the coordinator."""

    broker: BrokerConfig
    state_dir: Path
    prefix: str = DEFAULT_PREFIX
    embedded_agent: bool = True
    zeroconf: bool = True
    zeroconf_interfaces: tuple[str, ...] = ()
    timings: Timings = field(default_factory=Timings)
    agent_id: str | None = None
    """The embedded agent's id; ``coordinator-<hostname>`` by default."""
    agent_datasets: tuple[tuple[str, Path], ...] = ()
    """Datasets for the embedded agent (name, absolute path): a held-out set to evaluate on."""
    aggregator_shards: int = 1
    """Embedded agents to start, each its own process carrying the aggregator label: a job with
    ``algorithm.shards`` S places one aggregator shard per agent, so S of them let it run on
    this machine alone. The first is the usual embedded agent; the others are
    ``<agent id>-<n>``, with no datasets."""
    weights_interval: float = DEFAULT_INTERVAL
    """Write a running job's newest model weights at most this often (final ones at once)."""
    final_grace: float = DEFAULT_FINAL_GRACE
    """Follow an ended job's model topic this long for its final version."""
    homeassistant: bool = False
    """Announce running jobs (and the embedded agent) to Home Assistant by MQTT discovery."""
    homeassistant_prefix: str = DEFAULT_DISCOVERY_PREFIX
    broker_kit: Path | None = None
    """The ``ember broker config`` kit of the broker this coordinator manages: enables
    enrolment by token (``ember agents token``, ``ember-agent enroll``)."""
    broker_pid_file: Path | None = None
    """The local mosquitto's pid file, to SIGHUP it after an enrolment; default the kit's."""


def embedded_agent_id(hostname: str | None = None) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", hostname or socket.gethostname()).strip("-")
    return check_segment(f"coordinator-{host or 'local'}"[:128], "agent id")


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def embedded_agent_toml(
    *,
    agent_id: str,
    state_dir: Path,
    prefix: str,
    broker_url: str | Sequence[str],
    public_key: str,
    datasets: tuple[tuple[str, Path], ...] = (),
    protocol: str = "auto",
    broker: BrokerConfig | None = None,
    homeassistant: str | None = None,
) -> str:
    """The embedded agent's configuration (``agent.config``'s format). It reaches the broker
    as the coordinator does (same brokers in the same failover order, same credentials and
    TLS files in ``broker``);
    ``homeassistant`` is the discovery prefix to announce it under, if any."""
    secrets = [
        f"{key} = {_toml_string(str(value))}"
        for key in ("username", "password", "ca_file", "cert_file", "key_file")
        if broker is not None and (value := getattr(broker, key))
    ]
    ha = (
        []
        if homeassistant is None
        else [
            "[homeassistant]",
            "enabled = true",
            f"discovery_prefix = {_toml_string(homeassistant)}",
        ]
    )
    tables = [
        f"[[datasets]]\nname = {_toml_string(name)}\npath = {_toml_string(str(path))}"
        for name, path in datasets
    ]
    return "\n".join(
        [
            "# Written by 'ember serve': the agent that hosts this coordinator's aggregator role.",
            "[agent]",
            f"id = {_toml_string(agent_id)}",
            f"state_dir = {_toml_string(str(state_dir))}",
            'labels = { role = "aggregator" }',
            f"topic_prefix = {_toml_string(prefix)}",
            "allow_code = false",
            "[broker]",
            "url = "
            + (
                _toml_string(broker_url)
                if isinstance(broker_url, str)
                else f"[{', '.join(_toml_string(u) for u in broker_url)}]"
            ),
            f"protocol = {_toml_string(protocol)}",
            *secrets,
            "[trust]",
            f"coordinator_keys = [{_toml_string(public_key)}]",
            "[zeroconf]",
            "enabled = false",
            *ha,
            *tables,
            "",
        ]
    )


def agent_cli_available() -> bool:
    """Whether this installation's agent has ``ember-agent run``."""
    try:
        from agent.cli import cli
    except ImportError:
        return False
    return "run" in getattr(cli, "commands", {})


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM when ``ember serve`` dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedAgent:
    """An ``ember-agent run`` child process, restarted with backoff if it exits."""

    def __init__(self, *, config_path: Path, log_path: Path, agent_id: str) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.agent_id = agent_id
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.starts = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="embedded-agent")

    async def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping:
            log_file = await asyncio.to_thread(self._open_log)
            try:
                self.process = await spawn_agent(
                    self.config_path,
                    log_file,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            finally:
                log_file.close()
            self.starts += 1
            log.info("embedded_agent_started", agent=self.agent_id, pid=self.process.pid)
            loop = asyncio.get_running_loop()
            started = loop.time()
            code = await self.process.wait()
            if self._stopping:
                break
            log.warning(
                "embedded_agent_exited", agent=self.agent_id, code=code, log=str(self.log_path)
            )
            if loop.time() - started > 60:
                delay = 1.0
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _open_log(self) -> IO[bytes]:
        return open(self.log_path, "ab")  # handed to the child, closed by the caller

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            await stop_process(process, timeout)
        if self._task is not None:
            await cancel_and_wait([self._task])


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/coordinator.lock``: one coordinator per state."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise ServiceError(
                f"another 'ember serve' (pid {holder or '?'}) is using {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Coordinator:
    """The running coordinator: use :meth:`run` until ``stop`` is set, or ``async with``."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.state_dir = Path(config.state_dir).expanduser().resolve()
        self.key: Ed25519PrivateKey | None = None
        self.store: Store | None = None
        self.transport: Transport | None = None
        self.registry: Registry | None = None
        self.dispatcher: Dispatcher | None = None
        self.keeper: ModelKeeper | None = None
        self.rpc: RpcServer | None = None
        self.enrolment: Enrolment | None = None
        self.lan: LanBrowser | None = None
        self.agent: EmbeddedAgent | None = None
        self.shard_hosts: list[EmbeddedAgent] = []
        """The embedded agents beyond the first (``aggregator_shards``)."""
        self.homeassistant: JobAnnouncer | None = None
        self.agent_id = config.agent_id or embedded_agent_id()
        self._lock = StateDirLock(self.state_dir)
        self.ready = asyncio.Event()

    @property
    def public_key(self) -> str:
        assert self.key is not None
        return public_text(self.key)

    async def start(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self._lock.acquire)
        try:
            key, created = await asyncio.to_thread(init_key, self.state_dir)
            self.key = key
            if created:
                log.info("coordinator_key_created", public_key=self.public_key)
            self.store = await Store.open(self.state_dir)
            self.transport = Transport(cfg.broker, name="coordinator")
            self.transport.start()
            self.registry = Registry(self.transport, self.topics)
            await self.registry.start()
            embedded = cfg.embedded_agent and agent_cli_available()
            self.dispatcher = Dispatcher(
                transport=self.transport,
                topics=self.topics,
                store=self.store,
                registry=self.registry,
                key=key,
                timings=cfg.timings,
                prefer_aggregator=self.agent_id if cfg.embedded_agent else None,
            )
            self.keeper = ModelKeeper(
                transport=self.transport,
                topics=self.topics,
                store=self.store,
                interval=cfg.weights_interval,
                final_grace=cfg.final_grace,
            )
            self.dispatcher.listen(self.keeper.job_changed)
            await self.dispatcher.start()
            self.keeper.start((j.record.id, j.record.phase) for j in self.dispatcher.jobs.values())
            if cfg.homeassistant:
                await self._start_homeassistant(self.dispatcher)
            if cfg.broker_kit is not None:
                self.enrolment = Enrolment(
                    transport=self.transport,
                    topics=self.topics,
                    store=self.store,
                    kit_dir=cfg.broker_kit,
                    coordinator_keys=[self.public_key],
                    pid_file=cfg.broker_pid_file,
                )
                try:
                    await self.enrolment.start()
                except KitError as exc:
                    raise ServiceError(f"--broker-kit: {exc}") from None
            self.rpc = RpcServer(self.transport, self.topics)
            self._register_methods(self.rpc)
            await self.rpc.start()
            if cfg.zeroconf:
                self.lan = LanBrowser(self.registry, interfaces=cfg.zeroconf_interfaces or None)
                try:
                    await self.lan.start()
                except OSError as exc:
                    log.warning("zeroconf_unavailable", error=str(exc))
                    self.lan = None
            if cfg.embedded_agent and not embedded:
                log.warning(
                    "embedded_agent_unavailable",
                    reason="this installation's agent has no 'run' command",
                )
            if embedded:
                await self._start_embedded_agent()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "coordinator_ready",
            version=__version__,
            broker=", ".join(cfg.broker.urls),
            prefix=cfg.prefix,
            state_dir=str(self.state_dir),
            public_key=self.public_key,
            embedded_agent=self.agent_id if self.agent else None,
        )
        self.ready.set()

    async def _start_homeassistant(self, dispatcher: Dispatcher) -> None:
        assert self.transport is not None

        def job_name(job_id: str) -> str | None:
            job = dispatcher.jobs.get(job_id)
            return job.record.name if job is not None else None

        self.homeassistant = JobAnnouncer(
            self.transport, self.topics, self.config.homeassistant_prefix, job_name=job_name
        )
        dispatcher.listen(self.homeassistant.job_changed)
        await self.homeassistant.start(
            (j.record.id, j.record.phase, j.record.finished_at) for j in dispatcher.jobs.values()
        )

    async def _start_embedded_agent(self) -> None:
        self.agent = await self._embedded_agent(0)
        self.shard_hosts = [
            await self._embedded_agent(n) for n in range(1, self.config.aggregator_shards)
        ]

    async def _embedded_agent(self, n: int) -> EmbeddedAgent:
        """Write embedded agent ``n``'s configuration and start it (0: the usual one, with the
        datasets; others host aggregator shards)."""
        suffix = "" if n == 0 else f"-{n}"
        agent_id = self.agent_id + suffix
        state_dir = self.state_dir / f"embedded-agent{suffix}"
        path = self.state_dir / EMBEDDED_CONFIG.replace(".toml", f"{suffix}.toml")
        text = embedded_agent_toml(
            agent_id=agent_id,
            state_dir=state_dir,
            prefix=self.config.prefix,
            # Every URL: on a clustered broker the aggregator fails over with the coordinator.
            broker_url=self.config.broker.urls,
            public_key=self.public_key,
            datasets=self.config.agent_datasets if n == 0 else (),
            protocol=self.config.broker.protocol,
            broker=self.config.broker,
            homeassistant=self.config.homeassistant_prefix if self.config.homeassistant else None,
        )

        def write() -> None:
            state_dir.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)

        await asyncio.to_thread(write)
        log_path = self.state_dir / EMBEDDED_LOG.replace(".log", f"{suffix}.log")
        agent = EmbeddedAgent(config_path=path, log_path=log_path, agent_id=agent_id)
        agent.start()
        return agent

    async def stop(self) -> None:
        """Stop everything that was started, in reverse order."""
        if self.rpc is not None:
            await self.rpc.stop()
        if self.enrolment is not None:
            await self.enrolment.stop()
            self.enrolment = None
        if self.dispatcher is not None:
            await self.dispatcher.drain(timeout=3.0)
            await self.dispatcher.stop()
        if self.keeper is not None:
            await self.keeper.stop()
        if self.homeassistant is not None:
            await self.homeassistant.stop()
        for embedded in [*self.shard_hosts, *([self.agent] if self.agent else [])]:
            await embedded.stop()
        self.shard_hosts = []
        if self.lan is not None:
            await self.lan.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.transport is not None:
            await self.transport.close()
        if self.store is not None:
            await self.store.close()
        await asyncio.to_thread(self._lock.release)
        self.rpc = self.dispatcher = self.agent = self.lan = self.registry = None
        self.keeper = self.homeassistant = None
        self.transport = None
        self.store = None

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
            log.info("coordinator_stopping")
        finally:
            await self.stop()

    # RPC ---------------------------------------------------------------------------------------
    def _register_methods(self, rpc: RpcServer) -> None:
        rpc.register("ping", self._ping)
        rpc.register("agents.ls", self._agents_ls)
        rpc.register("agents.show", self._agents_show)
        rpc.register("agents.token", self._agents_token)
        rpc.register("jobs.plan", self._jobs_plan)
        rpc.register("jobs.submit", self._jobs_submit)
        rpc.register("jobs.ls", self._jobs_ls)
        rpc.register("jobs.show", self._jobs_show)
        rpc.register("jobs.cancel", self._jobs_cancel)
        rpc.register("jobs.export", self._jobs_export)

    @property
    def _d(self) -> Dispatcher:
        assert self.dispatcher is not None
        return self.dispatcher

    @property
    def _r(self) -> Registry:
        assert self.registry is not None
        return self.registry

    async def _ping(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        return {
            "version": __version__,
            "prefix": self.config.prefix,
            "agents": len(self._r),
            "jobs": len(self._d.jobs),
            "public_key": self.public_key,
            "embedded_agent": self.agent_id if self.agent else None,
            "shard_hosts": [a.agent_id for a in self.shard_hosts],
        }

    async def _agents_ls(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        return [agent.summary() for agent in self._r.snapshot()]

    async def _agents_token(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        if self.enrolment is None:
            raise RpcError(
                "this coordinator does not manage a broker kit, so it cannot enrol agents "
                "(start it with 'ember serve --broker-kit DIR', DIR from 'ember broker config')"
            )
        ttl = params.get("ttl", 3600.0)
        agent = params.get("agent")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise RpcError("agents.token: ttl must be a number of seconds")
        if agent is not None:
            try:
                check_segment(str(agent), "agent id")
            except ValueError as exc:
                raise RpcError(str(exc)) from None
        try:
            return await self.enrolment.make_token(
                float(ttl), agent=agent, aggregator=bool(params.get("aggregator", False))
            )
        except (ValueError, OSError) as exc:
            raise RpcError(str(exc)) from None

    async def _agents_show(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        wanted = _param(params, "agent")
        agents = self._r.snapshot()
        exact = [a for a in agents if a.id == wanted]
        found = exact or [a for a in agents if a.id.startswith(wanted)]
        if not found:
            raise RpcError(f"no agent {wanted!r} (ember agents ls lists them)")
        if len(found) > 1:
            raise RpcError(f"{wanted!r} matches several agents: {', '.join(a.id for a in found)}")
        return found[0].summary()

    async def _jobs_plan(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        spec = parse_spec(params.get("spec"))
        result = self._d.plan(spec)
        return {"job": spec.name, "mode": spec.algorithm.mode, **result.to_dict()}

    async def _jobs_submit(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        spec = parse_spec(params.get("spec"))
        artifacts = params.get("artifacts")
        code = params.get("code") or {}
        if not isinstance(artifacts, dict) or not all(
            isinstance(v, bytes) for v in artifacts.values()
        ):
            raise RpcError("jobs.submit: artifacts must map names to bytes")
        if not isinstance(code, dict) or not all(isinstance(v, str) for v in code.values()):
            raise RpcError("jobs.submit: code must map file names to text")
        job = await self._d.submit(spec, artifacts, code=code, request_id=request.id)
        return self._d.summary(job)

    async def _jobs_ls(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        jobs = sorted(self._d.jobs.values(), key=lambda j: (j.record.submitted_at, j.record.id))
        return [self._d.summary(j) for j in jobs]

    async def _jobs_show(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        try:
            job = self._d.find(_param(params, "job"))
        except JobError as exc:
            raise RpcError(str(exc)) from None
        every = params.get("versions") == "all"  # ember jobs report: the whole curve
        detail = await self._d.detail(job, versions=None if every else SHOWN_VERSIONS)
        assert self.store is not None
        weights = await self.store.job_weights(job.record.id)  # what is on disk, as it is
        detail["weights"] = None if weights is None else weights.to_dict()
        return detail

    async def stored_weights(self, job_id: str) -> StoredWeights | None:
        """The job's kept weights, after writing a newer version the keeper holds."""
        if self.keeper is not None:
            return await self.keeper.stored(job_id)
        assert self.store is not None
        return await self.store.job_weights(job_id)

    async def _jobs_export(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        """The job's inference graph and its newest kept weights (tensor codec), as bytes: the
        caller bakes one into the other (``coordinator.onnx_model.with_weights``)."""
        assert self.store is not None
        try:
            job = self._d.find(_param(params, "job"))
        except JobError as exc:
            raise RpcError(str(exc)) from None
        job_id = job.record.id
        wanted = params.get("version", "latest")
        if wanted != "latest" and (not isinstance(wanted, int) or isinstance(wanted, bool)):
            raise RpcError(f"version: expected 'latest' or a version number, got {wanted!r}")
        inference = job.record.artifacts.get(INFERENCE)
        if inference is None:
            raise RpcError(
                f"job {job_id} has no inference graph to export (an onnx model needs "
                "model.onnx.inference in the job spec)"
            )
        weights = await self.stored_weights(job_id)
        if weights is None:
            raise RpcError(
                f"job {job_id} has no model weights yet (kept from the aggregator's model "
                f"versions; the job is {job.record.phase})"
            )
        if wanted != "latest" and wanted != weights.version:
            raise RpcError(
                f"job {job_id}: version {wanted} is not kept; the coordinator keeps the newest "
                f"version only ({weights.version})"
            )
        return {
            "job": job_id,
            "phase": job.record.phase,
            **weights.to_dict(),
            "inference": await self.store.get_blob(inference),
            "weights": await self.store.get_blob(weights.digest),
        }

    async def _jobs_cancel(self, params: Mapping[str, Any], request: RpcRequest) -> Any:
        reason = params.get("reason")
        try:
            job = await self._d.cancel(
                _param(params, "job"), reason if isinstance(reason, str) else ""
            )
        except JobError as exc:
            raise RpcError(str(exc)) from None
        return self._d.summary(job)


def _param(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise RpcError(f"missing parameter {name!r}")
    return value


async def serve(config: ServiceConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    coordinator = Coordinator(config)
    await coordinator.run(stop)

"""A whole Ember deployment in real processes for fault tests: a mosquitto, ``ember serve`` with
its embedded agent hosting the aggregator, and ``ember-agent`` trainer processes, each holding a
shard of digits. Faults are done to the real processes (SIGKILL, a broker restart, a network
namespace whose link goes down), and :meth:`Fleet.audit` compares what every trainer spooled and
had acknowledged (its ``updates.jsonl``) with the update ids the aggregator's checkpoint says it
applied.

Timings come from configuration, never from sleeping: trainers pace themselves with
``[simulation] min_update_seconds`` so a job's progress rate has an upper bound whatever the
machine, and each test's stop rule leaves room for its faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from agent.learning.aggregation import stored_applied_ids
from agent.learning.arrays import read_int, unprefixed
from agent.process import spawn_agent, stop_process
from agent.protocol import Topics
from agent.roles.checkpoints import Checkpoints
from agent.roles.delivery import read_ledger
from agent.transport import Subscription, Transport
from coordinator.bundles import init_key, model_artifacts, public_text
from coordinator.demo.data import dirichlet_shards, holdout_split, load_digits_scaled
from coordinator.demo.run import DemoOptions, job_spec
from coordinator.mosquitto import MosquittoProcess
from coordinator.rpc import CoordinatorNotRunning, RpcClient
from coordinator.spec import parse_spec
from tests.coordinator.conftest import broker_config
from tests.coordinator.test_cli import environment, spawn_serve

AGGREGATOR = "coordinator-faults"


@dataclass
class Audit:
    """What became of every update of a job (the fault tests' bar: none lost, none twice)."""

    spooled: dict[str, set[str]]
    """Per trainer: every update id it made (its ledger)."""
    acked: dict[str, set[str]]
    discarded: dict[str, set[str]]
    """Dropped by the trainer when the job's final version came (nobody could apply them)."""
    pending: dict[str, set[str]]
    """Still in the trainer's spool when the job ended (its roles were cancelled)."""
    applied: list[str]
    """The aggregator's ledger of applied ids, from its last checkpoint."""
    applied_count: int
    """The aggregator's own counter of applications (in the same checkpoint)."""
    duplicates_refused: int

    @property
    def made(self) -> set[str]:
        return set().union(*self.spooled.values())

    @property
    def lost(self) -> set[str]:
        """Acknowledged but not applied, or made and accounted for nowhere."""
        applied = set(self.applied)
        acked = set().union(*self.acked.values())
        ended = set().union(*self.discarded.values(), *self.pending.values())
        return (acked - applied) | (self.made - applied - ended)

    @property
    def applied_twice(self) -> int:
        return self.applied_count - len(set(self.applied))

    def summary(self) -> dict[str, int]:
        return {
            "made": len(self.made),
            "applied": len(self.applied),
            "acked": sum(len(a) for a in self.acked.values()),
            "discarded_at_end": sum(len(d) for d in self.discarded.values()),
            "pending_at_end": sum(len(p) for p in self.pending.values()),
            "duplicates_refused": self.duplicates_refused,
            "lost": len(self.lost),
            "applied_twice": self.applied_twice,
        }

    def check(self) -> None:
        """The issue's bar: every accepted update applied, none twice, nothing unknown."""
        assert self.applied_twice == 0, self.summary()
        assert len(self.applied) == len(set(self.applied)), self.summary()
        assert not self.lost, (sorted(self.lost)[:5], self.summary())
        assert set(self.applied) <= self.made, "the aggregator applied ids no trainer made"


@dataclass
class Fleet:
    """The processes of one deployment and what the test has seen of its jobs."""

    root: Path
    broker: MosquittoProcess
    topics: Topics
    shards: list[Path]
    holdout: Path
    key: str
    env: dict[str, str]
    watcher: Transport
    coordinator: asyncio.subprocess.Process | None = None
    agents: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    versions: list[tuple[float, int, int]] = field(default_factory=list)
    """(arrival time, version, updates applied) of every model_version event seen."""
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The newest retained state document of every job."""
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The newest retained roles document of every agent."""
    serve_starts: int = 0
    _logs: list[IO[bytes]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # -- processes ------------------------------------------------------------------------------
    async def start_coordinator(self) -> None:
        log = await asyncio.to_thread(open, self.root / f"serve-{self.serve_starts}.log", "wb")
        self._logs.append(log)
        self.serve_starts += 1
        self.coordinator = await spawn_serve(
            self.env,
            self.root / "coord",
            log,
            "--no-zeroconf",
            "--agent-id",
            AGGREGATOR,
            "--agent-dataset",
            f"digits-holdout={self.holdout}",
            "--settle",
            "0.5",
            "--tick",
            "0.2",
            "--dispatch-timeout",
            "5",
        )

    async def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.send_signal(signal.SIGKILL)
        await self.coordinator.wait()

    def agent_config(
        self, index: int, *, url: str | None = None, keepalive: int = 30, pace: float = 0.3
    ) -> Path:
        name = f"pi-{index}"
        path = self.root / name / "agent.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            textwrap.dedent(
                f"""\
                [agent]
                id = "{name}"
                state_dir = "{self.root / name / "state"}"
                topic_prefix = "{self.topics.prefix}"
                [broker]
                url = "{url or self.broker.url}"
                keepalive = {keepalive}
                backoff_initial = 0.2
                backoff_max = 2.0
                [trust]
                coordinator_keys = ["{self.key}"]
                [telemetry]
                interval = 0
                [zeroconf]
                enabled = false
                [simulation]
                min_update_seconds = {pace}
                [[datasets]]
                name = "digits"
                path = "{self.shards[index]}"
                """
            )
        )
        return path

    async def start_agent(self, index: int, *, netns: str | None = None) -> None:
        config = self.root / f"pi-{index}" / "agent.toml"
        if not config.exists():
            self.agent_config(index)
        log = await asyncio.to_thread(open, self.root / f"pi-{index}" / "agent.log", "ab")
        self._logs.append(log)
        if netns is None:
            process = await spawn_agent(config, log)
        else:
            process = await asyncio.create_subprocess_exec(
                *("ip", "netns", "exec", netns, sys.executable, "-m", "agent.cli"),
                *("--log-format", "json", "run", "--config", str(config)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.agents[f"pi-{index}"] = process

    async def kill_agent(self, index: int) -> None:
        process = self.agents[f"pi-{index}"]
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async def stop(self) -> None:
        for process in [*self.agents.values(), self.coordinator]:
            if process is not None and process.returncode is None:
                await stop_process(process, 15)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for log in self._logs:
            log.close()

    # -- the job --------------------------------------------------------------------------------
    async def submit(
        self, *, trainers: int, algorithm: dict[str, Any], stop: dict[str, Any]
    ) -> str:
        """Submit the digits job once the planner places ``trainers`` trainers; its id."""
        raw = job_spec(DemoOptions(agents=trainers))
        raw["name"] = "digits-faults"
        raw["algorithm"] = {
            "concurrency": trainers,
            "staleness": {"weight": "sqrt"},  # no cut-off: every delivered update counts
            "server_optimizer": {"name": "fedavg", "lr": 1.0},
            "client": {"local_steps": 10, "batch_size": 32, "lr": 0.1},
            **algorithm,
        }
        raw["stop"] = stop
        spec = parse_spec(raw)
        artifacts = await asyncio.to_thread(model_artifacts, spec, None)
        async with RpcClient(self.watcher, self.topics) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    plan = await client.call("jobs.plan", {"spec": spec.to_dict()}, timeout=5)
                except CoordinatorNotRunning:
                    plan = {"selected": []}
                chosen = [s for s in plan["selected"] if s["role"] == "trainer"]
                if len(chosen) >= trainers and not any(s["standby"] for s in chosen):
                    break
                assert time.monotonic() < deadline, f"the fleet never came up: {plan}"
                await asyncio.sleep(0.3)
            summary = await client.call(
                "jobs.submit",
                {"spec": spec.to_dict(), "artifacts": artifacts.artifacts, "code": {}},
                timeout=30,
            )
        job_id = str(summary["job"])
        self._tasks.append(asyncio.create_task(self._follow_state(job_id)))
        return job_id

    async def _follow_metrics(self, sub: Subscription) -> None:
        async for message in sub:
            try:
                event = json.loads(bytes(message.payload))
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "model_version":
                self.versions.append(
                    (time.time(), int(event["version"]), int(event["updates_applied"]))
                )

    async def _follow_state(self, job_id: str) -> None:
        sub = await self.watcher.subscribe(self.topics.job_state(job_id))
        async for message in sub:
            document = json.loads(bytes(message.payload))
            if isinstance(document, dict):
                self.states[job_id] = document

    async def _follow_roles(self, sub: Subscription) -> None:
        async for message in sub:
            document = json.loads(bytes(message.payload))
            if isinstance(document, dict) and isinstance(document.get("agent"), str):
                self.roles[document["agent"]] = document

    @property
    def version(self) -> int:
        return max((v for _, v, _ in self.versions), default=-1)

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05
    ) -> float:
        """Until ``predicate()`` holds; returns the time it did. Fails with the logs' tails."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s\n{self.tails()}")
            await asyncio.sleep(poll)
        return time.time()

    async def wait_version(self, at_least: int, timeout: float = 120) -> float:
        return await self.wait_until(
            lambda: self.version >= at_least, timeout, f"model version {at_least}"
        )

    async def wait_done(self, job_id: str, timeout: float = 180) -> dict[str, Any]:
        await self.wait_until(
            lambda: self.states.get(job_id, {}).get("phase") in ("completed", "failed"),
            timeout,
            f"job {job_id} finished",
        )
        state = self.states[job_id]
        assert state["phase"] == "completed", state
        return state

    def first_version_after(self, moment: float) -> float | None:
        return next((t for t, _, _ in self.versions if t > moment), None)

    # -- the audit ------------------------------------------------------------------------------
    def trainer_dir(self, agent: str, job_id: str) -> Path:
        return self.root / agent / "state" / "roles" / job_id / "trainer"

    def ledger(self, agent: str, job_id: str) -> list[dict[str, Any]]:
        return read_ledger(self.trainer_dir(agent, job_id) / "updates.jsonl")

    def first_ack_after(self, agent: str, job_id: str, moment: float) -> float | None:
        rows = self.ledger(agent, job_id)
        return next((r["ts"] for r in rows if r["event"] == "acked" and r["ts"] > moment), None)

    def spooled_now(self, agent: str, job_id: str) -> set[str]:
        """Ids in a trainer's spool, read without touching it (its agent may be writing)."""
        names = (self.trainer_dir(agent, job_id) / "spool").glob("*.msgpack")
        return {name.stem.split("-", 1)[1] for name in names}

    async def audit(self, job_id: str) -> Audit:
        """Once the job is over: the trainers' ledgers against the aggregator's checkpoint
        (after its last write: the aggregator's role has ended)."""
        await self.wait_until(
            lambda: self._aggregator_ended(job_id), 60, "the aggregator's role to end"
        )
        return await asyncio.to_thread(self._audit, job_id)

    def _aggregator_ended(self, job_id: str) -> bool:
        doc = self.roles.get(AGGREGATOR, {}).get("roles", {})
        state = doc.get(f"{job_id}/aggregator", {}).get("state")
        return state is not None and state != "running"

    def _audit(self, job_id: str) -> Audit:
        spooled, acked, discarded, pending = {}, {}, {}, {}
        for agent in sorted(self.agents):
            rows = self.ledger(agent, job_id)
            for event, into in (("spooled", spooled), ("acked", acked), ("discarded", discarded)):
                into[agent] = {r["id"] for r in rows if r["event"] == event}
            pending[agent] = self.spooled_now(agent, job_id)
        directory = self.root / "coord" / "embedded-agent" / "roles" / job_id / "aggregator"
        loaded = Checkpoints(directory / "checkpoints").load_latest()
        assert loaded is not None, "the aggregator never checkpointed"
        state, _ = loaded
        counters = unprefixed("counters", state)
        return Audit(
            spooled=spooled,
            acked=acked,
            discarded=discarded,
            pending=pending,
            applied=stored_applied_ids(state),
            applied_count=read_int(counters, "applied"),
            duplicates_refused=read_int(counters, "duplicates"),
        )

    def tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.root.glob("**/*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.relative_to(self.root)}\n" + "\n".join(text))
        return "\n".join(parts)


def report(test: str, **numbers: Any) -> None:
    """One line per fault test with its measured numbers (``pytest -s`` shows them; CI logs)."""
    line = json.dumps({"fault_test": test, **numbers}, sort_keys=True)
    print(f"\nFAULT-REPORT {line}")
    target = os.environ.get("EMBER_FAULT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


@pytest.fixture
def digits_shards(tmp_path: Path) -> tuple[list[Path], Path]:
    x, y = load_digits_scaled()
    train, test = holdout_split(x, y, 0.2, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    shards = dirichlet_shards(train, 3, alpha=1.0, seed=0)
    paths = [s.save(data / f"digits-{i}.npz") for i, s in enumerate(shards)]
    return paths, test.save(data / "holdout.npz")


@pytest.fixture
async def fleet_factory(
    tmp_path: Path,
    topics: Topics,
    mosquitto_factory: Callable[..., MosquittoProcess],
    digits_shards: tuple[list[Path], Path],
) -> AsyncIterator[Callable[..., Any]]:
    """``await make(extra_config="")``: a broker, a coordinator key and a watcher connection;
    start the processes with :meth:`Fleet.start_coordinator` and :meth:`Fleet.start_agent`."""
    fleets: list[Fleet] = []

    async def make(extra_config: str = "") -> Fleet:
        broker = mosquitto_factory(extra_config=extra_config)
        key, _ = await asyncio.to_thread(init_key, tmp_path / "coord")
        watcher = Transport(broker_config(broker.url), name="fault-watcher")
        watcher.start()
        await watcher.wait_connected(10)
        shards, holdout = digits_shards
        fleet = Fleet(
            root=tmp_path,
            broker=broker,
            topics=topics,
            shards=shards,
            holdout=holdout,
            key=public_text(key),
            env=environment(broker, topics),
            watcher=watcher,
        )
        metrics = await watcher.subscribe(topics.all_job_metrics(), 0)
        roles = await watcher.subscribe(f"{topics.prefix}/agents/+/roles")
        fleet._tasks.append(asyncio.create_task(fleet._follow_metrics(metrics)))
        fleet._tasks.append(asyncio.create_task(fleet._follow_roles(roles)))
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            await fleet.stop()
            await fleet.watcher.close()


# -- network namespaces --------------------------------------------------------------------------


@dataclass
class Namespace:
    """One network namespace joined to the host by a veth pair: the host side has ``host_ip``,
    the namespace side ``ns_ip``. :meth:`cut` and :meth:`heal` take the link down and up."""

    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or ``None``."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if subprocess.run(["which", "ip"], capture_output=True).returncode != 0:
        return "the ip command (iproute2) is not installed"
    probe = f"ember-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A namespace with a veth link to the host on a private /30; removed afterwards."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"network partition test needs network namespaces: {reason}")
    tag = f"{os.getpid() % 10000}{int(time.monotonic() * 1000) % 100}"
    octet = 16 + (os.getpid() + int(time.monotonic())) % 200
    ns = Namespace(f"ember-{tag}", f"emh{tag}", f"10.213.{octet}.1", f"10.213.{octet}.2")
    peer = f"emn{tag}"
    try:
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/30", "dev", peer)
        _ip("-n", ns.name, "link", "set", peer, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", ns.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)

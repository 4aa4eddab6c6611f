"""`ember demo`: a whole federation on one machine, with nothing to configure.

An embedded broker (or ``--broker``), a coordinator with its embedded agent holding the
held-out split, and ``--agents`` agent processes, each with a Dirichlet(α = 0.5) non-IID shard
of scikit-learn's digits. A FedBuff (or FedAvg) job trains the shipped digits model with
onnxruntime (no torch), or with torch where asked. The run ends with a summary, a PNG of
accuracy against time and the final model as an inference ONNX graph.

The digits are one :data:`Scenario`; the examples bring others (their own data writer, agents
and job) to the same runner: ``Demo(options, scenario=...)``.

Everything here is the real system: real agent processes running ``ember-agent run``, the real
coordinator placing the job and dispatching signed bundles, real MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import structlog

from agent.capabilities import probe_runtimes
from agent.learning.assets import DEMO_MODEL_DIR
from agent.learning.backend import ARTIFACTS
from agent.process import reap, spawn_agent, terminate
from agent.protocol import Topics
from agent.protocol.codec import decode_tensors
from agent.transport import BrokerConfig, Subscription
from coordinator.bundles import ModelArtifacts, model_artifacts
from coordinator.demo.data import dirichlet_shards, holdout_split, load_digits_scaled
from coordinator.embedded_broker import EmbeddedBroker
from coordinator.service import Coordinator, ServiceConfig
from coordinator.spec import parse_spec

log = structlog.get_logger("ember.demo")

Algorithm = Literal["fedbuff", "fedavg"]
Topology = Literal["two_tier", "hierarchical", "hybrid"]
Backend = Literal["onnxruntime", "torch", "auto"]
"""``auto``: every other agent allows code and trains with torch, the rest with onnxruntime."""
MODEL_SOURCE = Path(__file__).with_name("model.py")
RUNTIMES_CACHE = "runtimes.json"
"""Where an agent caches its runtime probe, in its state directory (agent.daemon)."""


class DemoError(RuntimeError):
    """The demo could not run; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What ``ember demo`` runs."""

    agents: int = 6
    algorithm: Algorithm = "fedbuff"
    backend: Backend = "onnxruntime"
    broker: str | None = None
    out: Path = Path("ember-demo")
    target_accuracy: float | None = 0.95
    """Drawn on the plot and timed (``time_to_target``); the digits job also stops there."""
    max_seconds: float = 100.0
    alpha: float = 0.5
    seed: int = 0
    stragglers: float = 0.0
    """Fraction of the agents that play slow devices (``[simulation] slowdown``)."""
    slowdown: float = 10.0
    """How many times slower those agents train."""
    min_update_seconds: float = 0.0
    """Every agent's ``[simulation] min_update_seconds``: a fixed least time per update, so a
    job lasts long enough on any machine (fault tests outlast a failover with it)."""
    topology: Topology = "two_tier"
    """``hierarchical`` or ``hybrid``: the agents form :attr:`sites` groups by a ``site``
    label (agent i is at ``site-{i % sites}``), each with its own middle aggregator."""
    sites: int = 2
    site_brokers: dict[str, str] = field(default_factory=dict)
    """Site name → the broker URL that site's agents use (e.g. a site mosquitto bridged to
    the central one); other agents use the coordinator's broker."""
    selection: Literal["random", "oort"] = "random"
    """How the aggregator picks trainers (``algorithm.selection``)."""
    clients_per_round: int | None = None
    """Sync rounds: trainers sampled per round (``None``: all of them)."""
    local_steps: int = 20
    """SGD steps of 32 samples in each local run."""
    cluster: tuple[str, ...] = ()
    """The nodes of a clustered broker (instead of ``broker``): agent i connects to node
    i mod n first and fails over to the next ones in turn; the coordinator and its embedded
    aggregator agent to the first node first."""
    work_dir: Path | None = None
    """Where the coordinator and the agents keep their state (a temporary directory, removed
    at the end, when ``None``); fault tests read the trainers' update ledgers there."""
    agents_per_process: int = 1
    """Agents each ``ember-agent run`` process hosts (``--also``): a large simulated fleet
    starts faster on a small machine. Each keeps its own identity, connection and state."""
    shards: int = 1
    """FedBuff with the aggregator split into this many shards (``algorithm.shards``), each in
    an embedded agent of its own (``ember serve --aggregator-shards``)."""

    @property
    def slow_agents(self) -> int:
        return round(self.agents * self.stragglers)


@dataclass(frozen=True, kw_only=True)
class LocalAgent:
    """One agent process a local run starts: its id, its one dataset and its knobs."""

    agent_id: str
    dataset: Path
    dataset_name: str
    tags: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    allow_code: bool = False
    simulation: Mapping[str, float | bool] = field(default_factory=dict)
    """The agent's ``[simulation]`` table (``slowdown``, ``partial_work``)."""

    @property
    def straggler(self) -> bool:
        """Plays a slow device or one that cannot finish its local work."""
        return float(self.simulation.get("slowdown", 1.0)) > 1.0 or bool(
            self.simulation.get("partial_work", False)
        )


@dataclass(frozen=True, kw_only=True)
class Federation:
    """What a local run trains: the agents, the aggregator's held-out dataset and the job."""

    agents: tuple[LocalAgent, ...]
    holdout: Path
    holdout_name: str
    job: dict[str, Any]
    """The job spec as an operator writes it in YAML."""
    algorithm: str
    """How the summary and the plot name the algorithm."""
    title: str
    """The plot's title."""
    base_dir: Path | None = None
    """Where the job's relative model paths are looked up."""


Scenario = Callable[[Path], Federation]
"""Writes a run's datasets into the directory it is given and says who holds what."""


@dataclass
class Progress:
    """What the demo has seen so far (fed to the progress display)."""

    phase: str = "starting"
    agents_online: int = 0
    version: int = 0
    updates: int = 0
    accuracy: float | None = None
    history: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the job started, held-out accuracy) per evaluated version."""


@dataclass(frozen=True)
class DemoSummary:
    """The outcome, printed as a table and as ``--json``."""

    final_accuracy: float
    model_versions: int
    updates_applied: int
    seconds: float
    job_seconds: float
    agents: int
    algorithm: str
    backend: str
    phase: str
    reason: str
    plot: str | None
    model: str | None
    time_to_target: float | None
    """Seconds from the job's start to the first version at the target accuracy."""
    stragglers: int
    history: list[tuple[float, float]]
    """(seconds since the job started, held-out accuracy) of every evaluated version."""
    backends: dict[str, str] = field(default_factory=dict)
    """Trainer agent → the backend of the bundle it was sent."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def job_spec(options: DemoOptions) -> dict[str, Any]:
    """The demo's job, as an operator would write it in YAML (see examples/digits_fedbuff)."""
    sync = options.algorithm == "fedavg"
    model: dict[str, Any]
    if options.backend in ("torch", "auto"):
        model = {"torch": f"{MODEL_SOURCE}:Net", "input_shape": [64]}
    else:
        model = {
            "onnx": {
                kind: str(DEMO_MODEL_DIR / ARTIFACTS[kind])
                for kind in ("train_step", "eval", "inference", "initial")
            }
        }
    return {
        "name": f"digits-{options.algorithm}",
        "description": "ember demo: digits, Dirichlet(0.5) non-IID shards",
        "model": model,
        "backend": options.backend,
        "data": {"dataset": "digits", "min_samples": 20, "eval_dataset": "digits-holdout"},
        "algorithm": {
            "mode": "sync" if sync else "async",
            "buffer_size": max(1, options.agents // 2),
            "concurrency": options.agents,
            "min_trainers": options.agents if sync else 1,
            "selection": options.selection,
            **({"shards": options.shards} if options.shards > 1 else {}),
            **(
                {"clients_per_round": options.clients_per_round}
                if options.clients_per_round
                else {}
            ),
            "staleness": {"weight": "sqrt", "max": 20},
            "server_optimizer": {"name": "fedavg", "lr": 1.0},
            "client": {"local_steps": options.local_steps, "batch_size": 32, "lr": 0.1},
        },
        "stop": {
            **({"target_accuracy": options.target_accuracy} if options.target_accuracy else {}),
            "max_minutes": round(options.max_seconds / 60.0, 3),
        },
        **(
            {}
            if options.topology == "two_tier"
            else {"topology": {"kind": options.topology, "group_by": "site", "buffer_size": 2}}
        ),
    }


def demo_labels(options: DemoOptions, index: int) -> dict[str, str]:
    """Agent ``index``'s labels: in a hierarchical or hybrid demo also its ``site``."""
    if options.topology == "two_tier":
        return {"demo": "digits"}
    return {"demo": "digits", "site": f"site-{index % options.sites}"}


def digits_scenario(options: DemoOptions) -> Scenario:
    """``ember demo``'s federation: Dirichlet(α) shards of digits, the first
    ``options.slow_agents`` agents ``options.slowdown`` times slower."""

    def write(data: Path) -> Federation:
        x, y = load_digits_scaled()
        train, test = holdout_split(x, y, 0.2, seed=options.seed)
        shards = dirichlet_shards(train, options.agents, alpha=options.alpha, seed=options.seed)
        slow = options.slow_agents
        agents = tuple(
            LocalAgent(
                agent_id=f"demo-pi-{i}",
                dataset=shard.save(data / f"digits-{i}.npz"),
                dataset_name="digits",
                tags=("vision", "demo"),
                labels=demo_labels(options, i),
                allow_code=options.backend == "torch" or (options.backend == "auto" and i % 2 == 0),
                simulation={
                    "slowdown": options.slowdown if i < slow else 1.0,
                    "min_update_seconds": options.min_update_seconds,
                },
            )
            for i, shard in enumerate(shards)
        )
        return Federation(
            agents=agents,
            holdout=test.save(data / "digits-holdout.npz"),
            holdout_name="digits-holdout",
            job=job_spec(options),
            algorithm=options.algorithm,
            title=f"ember demo: {options.algorithm}, {options.agents} agents, {options.backend}"
            + (f", {slow} of them {options.slowdown:g}× slower" if slow else ""),
        )

    return write


def agent_toml(
    agent: LocalAgent,
    *,
    state_dir: Path,
    prefix: str,
    broker: str | Sequence[str],
    protocol: str,
    key: str,
) -> str:
    """An agent's config file (agent/config.py's schema)."""
    labels = ", ".join(f"{k} = {json.dumps(v)}" for k, v in agent.labels.items())
    simulation = [f"{k} = {json.dumps(v)}" for k, v in agent.simulation.items()]
    return "\n".join(
        [
            "[agent]",
            f"id = {json.dumps(agent.agent_id)}",
            f"state_dir = {json.dumps(str(state_dir))}",
            f"topic_prefix = {json.dumps(prefix)}",
            f"allow_code = {json.dumps(agent.allow_code)}",
            f"labels = {{ {labels} }}",
            "[broker]",
            f"url = {json.dumps(broker if isinstance(broker, str) else list(broker))}",
            f"protocol = {json.dumps(protocol)}",
            "[trust]",
            f"coordinator_keys = [{json.dumps(key)}]",
            "[telemetry]",
            "interval = 30",
            "[zeroconf]",
            "enabled = false",
            "[[datasets]]",
            f"name = {json.dumps(agent.dataset_name)}",
            f"path = {json.dumps(str(agent.dataset))}",
            f"tags = {json.dumps(list(agent.tags))}",
            "[simulation]",
            *simulation,
            "",
        ]
    )


class Demo:
    """One run of the demo; :meth:`run` returns its summary."""

    def __init__(
        self,
        options: DemoOptions,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        scenario: Scenario | None = None,
    ) -> None:
        self.options = options
        self.scenario = scenario or digits_scenario(options)
        self.progress = Progress()
        self.on_progress = on_progress or (lambda _p: None)
        self.prefix = f"ember-demo/{secrets.token_hex(4)}"
        self.topics = Topics(self.prefix)
        self.children: list[asyncio.subprocess.Process] = []
        self._evaluated: set[Any] = set()
        self.logs: list[IO[bytes]] = []

    def _update(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self.progress, name, value)
        self.on_progress(self.progress)

    async def run(self) -> DemoSummary:
        opts = self.options
        if opts.agents < 1:
            raise DemoError(f"--agents: must be ≥ 1, got {opts.agents}")
        federation: Federation | None = None
        began = time.monotonic()
        opts.out.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if opts.work_dir is None:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-demo-")))
            else:
                root = opts.work_dir
                root.mkdir(parents=True, exist_ok=True)
            external = opts.broker or (opts.cluster[0] if opts.cluster else None)
            broker = EmbeddedBroker() if external is None else None
            url = external or await broker.start()  # type: ignore[union-attr]
            coordinator: Coordinator | None = None
            try:
                self._update(phase="preparing data")
                data = root / "data"
                data.mkdir()
                federation = await asyncio.to_thread(self.scenario, data)
                if not federation.agents:
                    raise DemoError("the scenario made no agents")
                config = BrokerConfig(
                    urls=opts.cluster or (url,),
                    protocol="3.1.1" if broker else "auto",
                    backoff_initial=0.1,
                    backoff_max=2.0,
                )
                coordinator = Coordinator(
                    ServiceConfig(
                        broker=config,
                        state_dir=root / "coordinator",
                        prefix=self.prefix,
                        zeroconf=False,
                        agent_id="demo-aggregator",
                        agent_datasets=((federation.holdout_name, federation.holdout),),
                        aggregator_shards=opts.shards,
                    )
                )
                await coordinator.start()
                self._update(phase="starting agents")
                await self._start_agents(root, config, coordinator.public_key, federation.agents)
                await self._wait_for_agents(coordinator, len(federation.agents) + opts.shards)
                return await self._run_job(coordinator, federation, began)
            finally:
                await self._stop_agents()
                if coordinator is not None:
                    await coordinator.stop()
                if broker is not None:
                    await broker.stop()
                for handle in self.logs:
                    handle.close()

    # -- set-up --------------------------------------------------------------------------------
    async def _start_agents(
        self, root: Path, broker: BrokerConfig, key: str, agents: tuple[LocalAgent, ...]
    ) -> None:
        # Every agent here runs the same Python: probe its runtimes (a child process importing
        # onnxruntime and torch) once and hand each agent the answer its cache would hold.
        probe = root / RUNTIMES_CACHE
        await asyncio.to_thread(probe_runtimes, probe)
        configs = []
        nodes = self.options.cluster
        for i, agent in enumerate(agents):
            agent_dir = root / f"agent-{i}"
            (agent_dir / "state").mkdir(parents=True)
            if probe.exists():
                shutil.copyfile(probe, agent_dir / "state" / RUNTIMES_CACHE)
            config = agent_dir / "agent.toml"
            config.write_text(
                agent_toml(
                    agent,
                    state_dir=agent_dir / "state",
                    prefix=self.prefix,
                    broker=nodes[i % len(nodes) :] + nodes[: i % len(nodes)]
                    if nodes
                    else self.options.site_brokers.get(
                        agent.labels.get("site", ""), broker.urls[0]
                    ),
                    protocol=broker.protocol,
                    key=key,
                )
            )
            configs.append(config)
        per_process = max(1, self.options.agents_per_process)
        for first in range(0, len(configs), per_process):
            group = configs[first : first + per_process]
            handle = await asyncio.to_thread(open, group[0].with_name("agent.log"), "wb")
            self.logs.append(handle)
            child = await spawn_agent(group[0], handle, also=group[1:])
            self.children.append(child)

    async def _wait_for_agents(self, coordinator: Coordinator, count: int) -> None:
        assert coordinator.registry is not None
        deadline = time.monotonic() + 90
        while True:
            ready = [a for a in coordinator.registry.snapshot() if a.online and a.info is not None]
            self._update(agents_online=len(ready))
            if len(ready) >= count:
                return
            dead = [c for c in self.children if c.returncode is not None]
            if dead:
                raise DemoError(f"{len(dead)} agent process(es) exited; see their logs")
            if time.monotonic() > deadline:
                raise DemoError(f"only {len(ready)} of {count} agents came online in 90 s")
            await asyncio.sleep(0.1)

    async def _stop_agents(self) -> None:
        for child in self.children:
            terminate(child)  # all at once, then a grace period each
        for child in self.children:
            await reap(child, 10)

    # -- the job -------------------------------------------------------------------------------
    async def _run_job(
        self, coordinator: Coordinator, federation: Federation, began: float
    ) -> DemoSummary:
        opts = self.options
        assert coordinator.dispatcher is not None
        assert coordinator.transport is not None
        spec = parse_spec(federation.job)
        artifacts: ModelArtifacts = await asyncio.to_thread(
            model_artifacts, spec, federation.base_dir
        )
        job = await coordinator.dispatcher.submit(spec, artifacts.artifacts, code=artifacts.code)
        job_id = job.record.id
        transport = coordinator.transport
        metrics = await transport.subscribe(
            self.topics.all_job_metrics(job_id), max_messages=10_000
        )
        started = time.monotonic()
        self._update(phase="training")
        try:
            while not job.record.terminal:
                await self._drain_metrics(metrics, started)
                self._update(
                    phase=job.record.phase,
                    version=job.record.model_version,
                    updates=job.record.updates_applied,
                )
                if time.monotonic() - started > opts.max_seconds + 30:
                    await coordinator.dispatcher.cancel(job_id, "demo time limit")
                    break
                await asyncio.sleep(0.1)
            await self._drain_metrics(metrics, started)
        finally:
            await metrics.close()
        weights = await self._final_weights(coordinator, job_id)
        job_seconds = time.monotonic() - started
        record = job.record
        accuracy = self.progress.accuracy or 0.0
        plot = await asyncio.to_thread(self._plot, opts.out / "accuracy.png", federation.title)
        model = await asyncio.to_thread(
            self._write_model, artifacts, weights, opts.out / "model.onnx"
        )
        target = opts.target_accuracy
        reached = [t for t, a in self.progress.history if target is not None and a >= target]
        summary = DemoSummary(
            final_accuracy=round(accuracy, 4),
            model_versions=record.model_version,
            updates_applied=record.updates_applied,
            seconds=round(time.monotonic() - began, 2),
            job_seconds=round(job_seconds, 2),
            agents=len(federation.agents),
            algorithm=federation.algorithm,
            backend=spec.backend,
            phase=record.phase,
            reason=record.reason,
            plot=str(plot) if plot else None,
            model=str(model) if model else None,
            time_to_target=round(reached[0], 2) if reached else None,
            stragglers=sum(a.straggler for a in federation.agents),
            history=[(round(t, 3), round(a, 4)) for t, a in self.progress.history],
            backends=dict(sorted(coordinator.dispatcher.trainer_backends(job_id).items())),
        )
        (opts.out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        self._update(phase=record.phase)
        return summary

    async def _drain_metrics(self, metrics: Subscription, started: float) -> None:
        while (message := metrics.get_nowait()) is not None:
            try:
                event = json.loads(bytes(message.payload))
            except ValueError:
                continue
            if event.get("event") != "model_version" or "accuracy" not in event:
                continue
            # The coordinator's client also subscribes to every job's metrics: a broker may
            # deliver a message once per matching subscription.
            version = event.get("version")
            if version in self._evaluated:
                continue
            self._evaluated.add(version)
            accuracy = float(event["accuracy"])
            self.progress.history.append((time.monotonic() - started, accuracy))
            self._update(accuracy=accuracy)

    async def _final_weights(self, coordinator: Coordinator, job_id: str) -> bytes | None:
        """The job's final weights as the coordinator keeps them (``ember jobs export`` reads
        the same); the aggregator's final version follows its completion event closely."""
        assert coordinator.store is not None
        stored = None
        for _ in range(100):
            stored = await coordinator.stored_weights(job_id)
            if stored is not None and stored.final:
                break
            await asyncio.sleep(0.1)
        if stored is None:
            return None
        return await coordinator.store.get_blob(stored.digest)

    # -- outputs -------------------------------------------------------------------------------
    def _plot(self, path: Path, title: str) -> Path | None:
        if not self.progress.history:
            return None
        from coordinator.plots import save_curves

        return save_curves(
            path,
            {"held-out accuracy": self.progress.history},
            xlabel="seconds since the job started",
            ylabel="held-out accuracy",
            title=title,
            target=self.options.target_accuracy,
            ylim=(0, 1),
        )

    def _write_model(
        self, artifacts: ModelArtifacts, weights: bytes | None, path: Path
    ) -> Path | None:
        graph = artifacts.artifacts.get(ARTIFACTS["inference"])
        if weights is None or graph is None:
            return None
        from coordinator.onnx_model import with_weights

        path.write_bytes(with_weights(graph, decode_tensors(weights)))
        return path


def demo_available() -> str | None:
    """Why the demo cannot run here (a missing extra), or ``None``."""
    import importlib.util

    missing = [m for m in ("amqtt", "sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the demo needs {', '.join(missing)}: pip install 'ember-fl[demo]'"
    return None

"""The real ``ember`` CLI and ``ember serve`` as subprocesses, against a real mosquitto and
fake agents (retained documents published by the test): the issue's bar, checked end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from agent.process import stop_process
from agent.protocol import Topics
from agent.protocol.codec import encode_tensors
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess, free_port
from coordinator.rpc import CoordinatorNotRunning, RpcClient
from tests.coordinator.conftest import FakeAgent, agent_info, broker_config

EMBER = Path(sys.executable).parent / "ember"
COMMAND = [str(EMBER)] if EMBER.exists() else [sys.executable, "-m", "coordinator.cli"]
DIGITS_ASSETS = Path(__file__).resolve().parents[2] / "agent" / "learning" / "assets" / "digits"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def environment(mosquitto: MosquittoProcess, topics: Topics) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EMBER_BROKER=mosquitto.url, EMBER_PREFIX=topics.prefix, COLUMNS="200")
    env.pop("EMBER_STATE_DIR", None)
    return env


async def ember(*args: str, env: dict[str, str], timeout: float = 60) -> Result:
    return await run_command(*COMMAND, *args, env=env, timeout=timeout)


async def run_command(*args: str, env: dict[str, str], timeout: float = 60) -> Result:
    """A command's exit status and output (stdin closed)."""
    process = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def spawn_serve(
    env: dict[str, str], state_dir: Path, output: IO[bytes], *options: str
) -> asyncio.subprocess.Process:
    """``ember serve --state-dir <state_dir> <options>``, its output to ``output``."""
    return await asyncio.create_subprocess_exec(
        *COMMAND,
        "serve",
        "--state-dir",
        str(state_dir),
        *options,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=output,
        stderr=output,
    )


async def wait_answering(
    process: asyncio.subprocess.Process, log: Path, mosquitto: MosquittoProcess, topics: Topics
) -> None:
    """Until ``ember serve`` answers a ping; fails with its log if it exits or never answers."""
    async with Transport(broker_config(mosquitto.url)) as transport:
        await transport.wait_connected(5)
        async with RpcClient(transport, topics) as client:
            for _ in range(100):
                if process.returncode is not None:
                    output = await asyncio.to_thread(log.read_text)
                    raise AssertionError(f"ember serve exited: {output}")
                try:
                    await client.call("ping", timeout=0.3)
                    return
                except CoordinatorNotRunning:
                    continue
    output = await asyncio.to_thread(log.read_text)
    raise AssertionError(f"ember serve did not answer: {output}")


@dataclass
class Serve:
    process: asyncio.subprocess.Process
    log: Path


ServeFactory = Callable[[], Awaitable[Serve]]


@pytest.fixture
async def serve(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[ServeFactory]:
    """Start ``ember serve`` (again and again, on one state directory); waits until it answers."""
    started: list[Serve] = []
    env = environment(mosquitto, topics)

    async def start() -> Serve:
        log = tmp_path / f"serve-{len(started)}.log"
        with log.open("wb") as sink:  # a local file, opened once
            process = await spawn_serve(
                env,
                tmp_path / "state",
                sink,
                "--no-embedded-agent",
                "--no-zeroconf",
                "--settle",
                "0.3",
                "--tick",
                "0.1",
                "--dispatch-timeout",
                "3",
            )
        serve = Serve(process, log)
        started.append(serve)
        await wait_answering(process, log, mosquitto, topics)
        return serve

    try:
        yield start
    finally:
        for s in started:
            await stop_process(s.process, 15)


JOB = """
name: digits-fedbuff
model: { onnx: model/train_step.onnx }
backend: onnxruntime
data: { dataset: digits, min_samples: 50 }
compute: { min_memory_mb: 256, arch: [aarch64, x86_64] }
algorithm:
  mode: async
  buffer_size: 10
  concurrency: 20
  staleness: { weight: sqrt, max: 20 }
  server_optimizer: { name: fedadam, lr: 0.01 }
  client: { local_steps: 20, batch_size: 32, lr: 0.05 }
stop: { target_accuracy: 0.95, max_updates: 5000, max_minutes: 30 }
"""


def write_job(directory: Path, text: str = JOB) -> Path:
    model = directory / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "train_step.onnx").write_bytes(b"train-step graph")
    (model / "eval.onnx").write_bytes(b"eval graph")
    (model / "initial.tensors").write_bytes(encode_tensors({"w": np.zeros(4, np.float32)}))
    path = directory / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


async def three_agents_and_more(transport: Transport, topics: Topics) -> dict[str, FakeAgent]:
    """Three agents whose datasets differ, one offline, one too small, and a gateway."""
    specs: dict[str, dict[str, Any]] = {
        "pi-digits": {"datasets": [{"name": "digits", "tags": ["vision"], "samples": 600}]},
        "pi-few": {"datasets": [{"name": "digits", "tags": ["vision"], "samples": 20}]},
        "pi-mnist": {"datasets": [{"name": "mnist", "tags": ["vision"], "samples": 6000}]},
        "pi-away": {"datasets": [{"name": "digits", "samples": 900}]},
        "pi-zero": {"datasets": [{"name": "digits", "samples": 400}], "memory_mb": 128},
        "gateway": {"labels": {"role": "aggregator"}, "arch": "x86_64"},
    }
    agents = {}
    for name, options in specs.items():
        agent = FakeAgent(name, transport, topics, agent_info(name, **options))
        agents[name] = await agent.start(online=name != "pi-away")
    await agents["pi-away"].go_offline()
    return agents


@pytest.fixture
async def fake_agents(
    mosquitto: MosquittoProcess, topics: Topics
) -> AsyncIterator[tuple[Transport, dict[str, FakeAgent]]]:
    async with Transport(broker_config(mosquitto.url), name="fake-agents") as transport:
        await transport.wait_connected(5)
        yield transport, await three_agents_and_more(transport, topics)


async def test_plan_selects_exactly_the_agents_that_fit(
    serve: ServeFactory,
    fake_agents: tuple[Transport, dict[str, FakeAgent]],
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
) -> None:
    env = environment(mosquitto, topics)
    running = await serve()
    job = write_job(tmp_path)
    result = await ember("jobs", "plan", "--json", str(job), env=env)
    assert result.code == 0, result.err
    plan = result.json()
    assert plan["feasible"] is True
    assert [(s["agent"], s["role"]) for s in plan["selected"]] == [
        ("gateway", "aggregator"),
        ("pi-digits", "trainer"),
    ]
    assert plan["selected"][1]["dataset"] == "digits"
    assert plan["selected"][1]["samples"] == 600
    rejected = {r["agent"]: r for r in plan["rejected"]}
    assert set(rejected) == {"pi-few", "pi-mnist", "pi-away", "pi-zero"}
    assert rejected["pi-away"]["code"] == "offline"
    assert rejected["pi-away"]["reason"].startswith("offline since ")
    assert rejected["pi-few"]["reason"] == "too few samples: digits has 20, job needs ≥ 50"
    assert rejected["pi-mnist"]["reason"] == (
        "no matching dataset (job needs dataset digits; has mnist)"
    )
    assert rejected["pi-zero"]["reason"] == "too little memory: 128 MB < 256 MB"

    human = await ember("jobs", "plan", str(job), env=env)
    assert human.code == 0
    assert "pi-digits" in human.out
    assert "trainer" in human.out
    assert "too few samples" in human.out
    assert "offline since" in human.out

    listed = await ember("agents", "ls", env=env)
    assert listed.code == 0, listed.err
    for name in ("pi-digits", "pi-few", "pi-mnist", "pi-away", "gateway"):
        assert name in listed.out
    assert "digits:600" in listed.out
    assert "role=aggregator" in listed.out
    as_json = (await ember("agents", "ls", "--json", env=env)).json()
    assert {a["agent"]: a["online"] for a in as_json}["pi-away"] is False
    shown = await ember("agents", "show", "pi-dig", env=env)
    assert shown.code == 0
    assert "Cortex-A76" in shown.out
    assert "digits" in shown.out
    missing = await ember("agents", "show", "nobody", env=env)
    assert missing.code == 2
    assert missing.err.strip() == ("Error: no agent 'nobody' (ember agents ls lists them)")
    running.process.send_signal(signal.SIGTERM)  # a clean stop
    assert await asyncio.wait_for(running.process.wait(), 15) == 0
    assert "coordinator_stopping" in running.log.read_text()


@pytest.mark.parametrize(
    ("change", "replacement", "message"),
    [
        ("buffer_size: 10", "buffer_size: 0", "algorithm.buffer_size: must be ≥ 1, got 0"),
        (
            "concurrency: 20",
            "concurrency: [20",
            "line 11, column 12: expected ',' or ']', but got ':'",
        ),
    ],
)
async def test_a_bad_spec_is_one_line_and_exit_2(
    change: str,
    replacement: str,
    message: str,
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, JOB.replace(change, replacement, 1))
    for command in ("plan", "submit"):
        result = await ember("jobs", command, str(job), env=environment(mosquitto, topics))
        assert result.code == 2
        assert result.err.strip().startswith(f"Error: {job}: {message}")
        assert result.err.count("\n") == 1
        assert result.out == ""


async def test_a_missing_coordinator_or_broker_is_a_clear_error(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    env = environment(mosquitto, topics)
    result = await ember("jobs", "ls", "--timeout", "1", env=env)
    assert result.code == 2
    assert result.err.strip() == (
        f"Error: no answer from the coordinator on {mosquitto.url} within 1 s "
        "— is 'ember serve' running?"
    )
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    result = await ember("--broker", nowhere, "agents", "ls", "--timeout", "1", env=env)
    assert result.code == 2
    assert result.err.strip() == f"Error: cannot reach the MQTT broker at {nowhere} within 1 s"


async def test_keys_init(tmp_path: Path, mosquitto: MosquittoProcess, topics: Topics) -> None:
    env = environment(mosquitto, topics)
    first = await ember("keys", "init", "--state-dir", str(tmp_path), env=env)
    assert first.code == 0
    assert first.out.startswith("ed25519:")
    assert stat.S_IMODE((tmp_path / "coordinator.key").stat().st_mode) == 0o600
    again = await ember("keys", "init", "--state-dir", str(tmp_path), env=env)
    assert again.out == first.out
    assert "kept it" in again.err
    shown = await ember("keys", "show", "--state-dir", str(tmp_path), env=env)
    assert shown.out == first.out


async def test_jobs_survive_sigkill_and_can_be_watched_and_cancelled(
    serve: ServeFactory,
    fake_agents: tuple[Transport, dict[str, FakeAgent]],
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
) -> None:
    transport, agents = fake_agents
    env = environment(mosquitto, topics)
    first = await serve()
    from coordinator.bundles import load_key

    job = write_job(tmp_path)
    submitted = await ember("jobs", "submit", "--json", str(job), env=env)
    assert submitted.code == 0, submitted.err
    job_id = submitted.json()["job"]
    assert job_id.startswith("digits-fedbuff-")
    key = load_key(tmp_path / "state")  # the key 'ember serve' created
    await agents["gateway"].accept(key)
    bundle = await agents["pi-digits"].accept(key)
    assert bundle.job == job_id
    assert bundle.dataset == {"name": "digits"}

    async def shown() -> dict[str, Any]:
        result = await ember("jobs", "show", "--json", job_id, env=env)
        assert result.code == 0, result.err
        detail = result.json()
        assert isinstance(detail, dict)
        return detail

    detail = await shown()
    for _ in range(50):
        if detail["phase"] == "running":
            break
        detail = await shown()
    assert detail["phase"] == "running"
    event = {"event": "model_version", "version": 7, "updates_applied": 70, "accuracy": 0.5}
    await transport.publish(topics.job_metrics(job_id, "gateway"), json.dumps(event))
    states = await transport.subscribe(topics.job_state(job_id))

    async def state_with(predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            state = json.loads(bytes((await states.get(10)).payload))
            if predicate(state):
                return state  # type: ignore[no-any-return]

    await state_with(lambda s: s["model_version"] == 7)

    # SIGKILL: no clean stop at all. Then start again on the same state directory.
    first.process.send_signal(signal.SIGKILL)
    assert await first.process.wait() == -signal.SIGKILL
    await serve()
    listed = await ember("jobs", "ls", "--json", env=env)
    assert listed.code == 0, listed.err
    [row] = listed.json()
    assert (row["job"], row["phase"], row["model_version"], row["updates_applied"]) == (
        job_id,
        "running",
        7,
        70,
    )
    assert row["metrics"] == {"accuracy": 0.5}
    detail = await shown()
    assert {(a["agent"], a["role"], a["state"]) for a in detail["assignments"]} == {
        ("gateway", "aggregator", "running"),
        ("pi-digits", "trainer", "running"),
    }
    assert [e["kind"] for e in detail["events"]][:3] == ["submitted", "planned", "assignment"]
    # The roles still run on the agents: nothing was dispatched again.
    assert agents["pi-digits"].idle()
    table = await ember("jobs", "ls", env=env)
    assert job_id in table.out
    assert "running" in table.out

    # Watch it to the end (not a terminal: one line per change), ended by the aggregator.
    watcher = asyncio.ensure_future(ember("jobs", "watch", "digits-fedbuff", env=env))
    # (The watcher may subscribe before or after the end: the retained state tells it either way.)
    await transport.publish(
        topics.job_metrics(job_id, "gateway"),
        json.dumps(
            {"event": "model_version", "version": 8, "updates_applied": 80, "accuracy": 0.96}
        ),
    )
    watched = await watcher
    assert watched.code == 0, watched.err
    assert f"{job_id} completed: target_accuracy reached" in watched.out
    assert "version 8" in watched.out

    # A second job, cancelled.
    second = (await ember("jobs", "submit", "--json", str(job), env=env)).json()["job"]
    await agents["gateway"].accept(key)
    await agents["pi-digits"].accept(key)
    cancelled = await ember("jobs", "cancel", second, "--reason", "wrong data", env=env)
    assert cancelled.code == 0
    assert cancelled.out.strip() == f"{second} cancelled"
    for name in ("gateway", "pi-digits"):
        cancel = await agents[name].cancellation(job=second)
        assert cancel.reason == "job cancelled: wrong data"
    again = await ember("jobs", "cancel", second, env=env)
    assert again.code == 2
    assert again.err.strip() == f"Error: job {second} is already cancelled"
    await states.close()  # a fresh SUBSCRIBE makes the broker send the retained state
    retained = await transport.subscribe(topics.job_state(job_id))
    final = json.loads(bytes((await retained.get(5)).payload))
    assert final["phase"] == "completed"
    assert final["reason"].startswith("target_accuracy")


async def test_the_embedded_agent_hosts_the_aggregator(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    """Default ``ember serve``: a real ``ember-agent run`` child labelled for the aggregator;
    it goes when the coordinator goes, even by SIGKILL."""
    env = environment(mosquitto, topics)
    agent_id = "coordinator-test"
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:  # a local file, opened once
        process = await spawn_serve(
            env,
            tmp_path / "state",
            sink,
            "--no-zeroconf",
            "--agent-id",
            agent_id,
            "--settle",
            "0.3",
        )
    try:
        async with Transport(broker_config(mosquitto.url)) as transport:
            await transport.wait_connected(5)
            status = await transport.subscribe(topics.agent_status(agent_id))
            info = await transport.subscribe(topics.agent_info(agent_id))

            async def next_doc(sub: Any) -> dict[str, Any]:
                doc = json.loads(bytes((await sub.get(30)).payload))
                assert isinstance(doc, dict)
                return doc

            assert (await next_doc(status))["state"] == "online"
            assert (await next_doc(info))["labels"] == {"role": "aggregator"}
            job = write_job(tmp_path)
            plan = await ember("jobs", "plan", "--json", str(job), env=env)
            assert plan.code == 0, plan.err + log.read_text()
            assert plan.json()["selected"][0] == {
                "agent": agent_id,
                "role": "aggregator",
                "dataset": None,
                "samples": None,
                "standby": False,
                "feature_shape": None,
                "backend": None,
                "group": None,
                "shard": None,
            }
            toml = (tmp_path / "state" / "embedded-agent.toml").read_text()
            assert 'coordinator_keys = ["ed25519:' in toml
            process.send_signal(signal.SIGKILL)
            await process.wait()
            # PR_SET_PDEATHSIG: the child gets SIGTERM and says goodbye on its status topic.
            while (doc := await next_doc(status))["state"] != "offline":
                pass
            assert doc["agent"] == agent_id
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def digits_job(
    tmp_path: Path, name: str, concurrency: int = 1, *, shards: int = 1, versions: int = 3
) -> Path:
    """scikit-learn's digits as ``train.npz`` and held-out ``test.npz`` in ``tmp_path``, and a
    ``versions``-version job on the demo's ONNX model evaluating on ``digits-test``; its path.
    Skips the test when the demo assets are not in this checkout."""
    if not (DIGITS_ASSETS / "train_step.onnx").exists():
        pytest.skip("the digits demo assets are not in this checkout")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16).astype(np.float32)
    y = digits.target.astype(np.int64)
    np.savez(tmp_path / "train.npz", x=x[:900], y=y[:900])
    np.savez(tmp_path / "test.npz", x=x[900:], y=y[900:])
    job = tmp_path / "job.yaml"
    job.write_text(
        textwrap.dedent(
            f"""
            name: {name}
            model: {{ onnx: {DIGITS_ASSETS / "train_step.onnx"} }}
            data: {{ dataset: digits, min_samples: 50, eval_dataset: digits-test }}
            algorithm:
              buffer_size: 2
              concurrency: {concurrency}
              shards: {shards}
              client: {{ local_steps: 10, batch_size: 32, lr: 0.1 }}
            stop: {{ max_versions: {versions}, max_minutes: 2 }}
            """
        )
    )
    return job


@dataclass
class RealFleet:
    """``ember serve`` (its embedded agent the aggregator, holding ``test.npz``) and one
    ``ember-agent run`` trainer holding ``train.npz``, as processes, each logging to a file."""

    env: dict[str, str]
    children: list[asyncio.subprocess.Process]
    logs: dict[str, Path]
    """``serve``, ``trainer`` and ``aggregator`` (the embedded agent's own log)."""

    async def wait_feasible(self, job: Path) -> None:
        """Until both agents are online and the job's plan can start."""
        for _ in range(100):
            plan = await ember("jobs", "plan", "--json", str(job), env=self.env)
            if plan.code == 0 and plan.json()["feasible"]:
                return
        raise AssertionError(plan.out + plan.err + self.logs["serve"].read_text())


@contextlib.asynccontextmanager
async def real_fleet(
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
    *,
    trainer: str = "pi-trainer",
    aggregator: str | None = None,
    trainer_config: str = "",
    serve_options: tuple[str, ...] = (),
) -> AsyncIterator[RealFleet]:
    """A :class:`RealFleet` in ``tmp_path`` (after :func:`digits_job` wrote the data), stopped
    on the way out; ``trainer_config`` adds TOML tables to the trainer's configuration,
    ``serve_options`` options to ``ember serve``."""
    env = environment(mosquitto, topics)
    keys = await ember("keys", "init", "--state-dir", str(tmp_path / "coord"), env=env)
    trainer_toml = tmp_path / "trainer.toml"
    trainer_toml.write_text(
        textwrap.dedent(
            f"""
            [agent]
            id = "{trainer}"
            state_dir = "{tmp_path / "trainer"}"
            topic_prefix = "{topics.prefix}"
            [broker]
            url = "{mosquitto.url}"
            [trust]
            coordinator_keys = ["{keys.out.strip()}"]
            [zeroconf]
            enabled = false
            [[datasets]]
            name = "digits"
            path = "{tmp_path / "train.npz"}"
            """
        )
        + textwrap.dedent(trainer_config)
    )
    logs = {
        "serve": tmp_path / "serve.log",
        "trainer": tmp_path / "trainer.log",
        "aggregator": tmp_path / "coord" / "embedded-agent.log",
    }
    named = ("--agent-id", aggregator) if aggregator else ()
    children = []
    with logs["serve"].open("wb") as serve_log, logs["trainer"].open("wb") as trainer_log:
        children.append(
            await spawn_serve(
                env,
                tmp_path / "coord",
                serve_log,
                "--no-zeroconf",
                *named,
                "--agent-dataset",
                f"digits-test={tmp_path / 'test.npz'}",
                "--settle",
                "0.3",
                *serve_options,
            )
        )
        children.append(
            await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "ember-agent"),
                "run",
                "--config",
                str(trainer_toml),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=trainer_log,
                stderr=trainer_log,
            )
        )
    try:
        yield RealFleet(env, children, logs)
    finally:
        for child in reversed(children):
            await stop_process(child, 15)


@pytest.mark.slow
async def test_a_real_job_runs_to_completion_on_real_agents(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    """The whole road: ``ember serve`` with its embedded agent (the aggregator, evaluating on a
    held-out set), a real ``ember-agent`` trainer, the digits demo model as ONNX, and
    ``ember jobs submit --watch`` until the stop rule."""
    job = digits_job(tmp_path, "digits-real")
    async with real_fleet(mosquitto, topics, tmp_path) as fleet:
        await fleet.wait_feasible(job)
        env = fleet.env
        done = await ember("jobs", "submit", "--watch", str(job), env=env, timeout=120)
        assert done.code == 0, done.out + done.err + fleet.logs["serve"].read_text()
        assert "completed: max_versions reached (3)" in done.out
        [row] = (await ember("jobs", "ls", "--json", env=env)).json()
        assert row["model_version"] == 3
        assert 0.0 < row["metrics"]["accuracy"] <= 1.0

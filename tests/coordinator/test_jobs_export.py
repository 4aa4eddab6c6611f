"""``ember jobs export``: the real ``ember serve`` and ``ember`` as subprocesses on a real
mosquitto; the test plays the agents (retained documents) and the aggregator (model versions),
and checks the written model against numpy's forward pass, also after ``ember serve`` was
SIGKILLed and started again."""

from __future__ import annotations

import asyncio
import signal
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.process import stop_process
from agent.protocol import Topics
from agent.protocol.messages import ModelVersion
from agent.transport import Transport
from coordinator.bundles import load_key
from coordinator.mosquitto import MosquittoProcess
from coordinator.rpc import RpcClient
from tests.coordinator.conftest import FakeAgent, agent_info, broker_config
from tests.coordinator.test_cli import (
    ember,
    environment,
    spawn_serve,
    wait_answering,
    write_job,
)
from tests.coordinator.test_model_keeper import DIGITS, weights
from tests.coordinator.test_onnx_model import mlp

JOB = f"""
name: digits-export
model:
  onnx:
    train_step: {DIGITS / "train_step.onnx"}
    eval: {DIGITS / "eval.onnx"}
    initial: {DIGITS / "initial.tensors"}
    inference: {DIGITS / "inference.onnx"}
data: {{ dataset: digits, min_samples: 50 }}
algorithm: {{ mode: async, buffer_size: 2, concurrency: 1 }}
stop: {{ max_versions: 100, max_minutes: 30 }}
"""
PARAMETERS = 128 * 64 + 128 + 10 * 128 + 10


Start = Callable[[], Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def serve(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[Start]:
    """``ember serve`` on one state directory (start it again after a kill); waits for it."""
    started: list[asyncio.subprocess.Process] = []

    async def start() -> asyncio.subprocess.Process:
        log = tmp_path / f"serve-{len(started)}.log"
        with log.open("wb") as sink:  # a local file, opened once
            process = await spawn_serve(
                environment(mosquitto, topics),
                tmp_path / "state",
                sink,
                "--no-embedded-agent",
                "--no-zeroconf",
                "--weights-interval",
                "60",
                "--settle",
                "0.2",
                "--tick",
                "0.1",
            )
        started.append(process)
        await wait_answering(process, log, mosquitto, topics)
        return process

    try:
        yield start
    finally:
        for process in started:
            await stop_process(process, 15)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Poll an asynchronous condition (an RPC, a publish) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def placed_job(
    transport: Transport, topics: Topics, env: dict[str, str], state_dir: Path
) -> str:
    """Submit JOB with ``ember jobs submit`` to a fleet of two fake agents (an aggregator's
    gateway and a trainer) that accept their bundles; the job's id."""
    job_file = state_dir.parent / "job.yaml"
    job_file.write_text(textwrap.dedent(JOB))
    gateway = await FakeAgent(
        "gateway", transport, topics, agent_info("gateway", labels={"role": "aggregator"})
    ).start()
    trainer = await FakeAgent(
        "pi-digits",
        transport,
        topics,
        agent_info("pi-digits", datasets=[{"name": "digits", "samples": 600}]),
    ).start()
    submitted = await ember("jobs", "submit", "--json", str(job_file), env=env)
    assert submitted.code == 0, submitted.err
    key = load_key(state_dir)
    await gateway.accept(key)
    await trainer.accept(key)
    return str(submitted.json()["job"])


def outputs(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [logits] = session.run(None, {"x": x})
    return np.asarray(logits)


async def test_export_writes_the_kept_model_also_after_a_sigkill(
    serve: Start, mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    env = environment(mosquitto, topics)
    first = await serve()
    async with Transport(broker_config(mosquitto.url), name="fake-agents") as transport:
        await transport.wait_connected(5)
        job = await placed_job(transport, topics, env, tmp_path / "state")
        model = tmp_path / "out" / "model.onnx"
        model.parent.mkdir()

        async def publish(version: int, *, final: bool = False) -> None:
            message = ModelVersion(job=job, version=version, tensors=weights(version), final=final)
            await transport.publish(topics.job_model(job), message.to_msgpack())

        async with RpcClient(transport, topics) as client:

            async def kept() -> dict[str, Any]:
                detail = await client.call("jobs.show", {"job": job})
                return dict(detail["weights"] or {})

            async def running() -> bool:
                detail = await client.call("jobs.show", {"job": job})
                return bool(detail["phase"] == "running")

            async def published_and_kept() -> bool:
                await publish(1)
                return bool(await kept())

            async def final_kept() -> bool:
                return bool((await kept()).get("final"))

            nothing = await ember("jobs", "export", job, "-o", str(model), env=env)
            assert nothing.code == 2
            assert nothing.err.startswith(f"Error: job {job} has no model weights yet")
            assert not model.exists()

            # The coordinator follows the job's model topic from its placement on: the first
            # version is stored at once (republished until then, as an aggregator does).
            await until(published_and_kept, "version 1 kept")
            await publish(2)  # within --weights-interval: pending; the export writes it first
            await until(running, "the job running")
            exported = await ember("jobs", "export", job, "-o", str(model), "--json", env=env)
            assert exported.code == 0, exported.err
            summary = exported.json()
            assert (summary["version"], summary["final"], summary["phase"]) == (2, False, "running")
            assert summary["parameters"] == PARAMETERS
            assert summary["outputs"] == {"logits": [1, 10]}
            x = np.random.default_rng(3).random((32, 64), dtype=np.float32)
            np.testing.assert_allclose(outputs(model, x), mlp(weights(2), x), rtol=1e-4, atol=1e-5)

            await publish(3, final=True)
            await until(final_kept, "the final version kept")

        first.send_signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        await serve()
        model.unlink()
        again = await ember("jobs", "export", job, "-o", str(model), env=env)
        assert again.code == 0, again.err
        assert again.out.strip() == (
            f"wrote {model} ({model.stat().st_size:,} bytes): {job} version 3 (final), "
            f"{PARAMETERS:,} parameters"
        )
        np.testing.assert_allclose(outputs(model, x), mlp(weights(3), x), rtol=1e-4, atol=1e-5)
        props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
        assert (props["ember.job"], props["ember.version"], props["ember.final"]) == (
            job,
            "3",
            "true",
        )
        shown = await ember("jobs", "show", job, env=env)
        assert "model kept: version 3, final" in shown.out

        older = await ember("jobs", "export", job, "-o", str(model), "--version", "2", env=env)
        assert older.code == 2
        assert older.err.strip() == (
            f"Error: job {job}: version 2 is not kept; the coordinator keeps the newest "
            "version only (3)"
        )
        unknown = await ember("jobs", "export", "nobody", "-o", str(model), env=env)
        assert (unknown.code, unknown.err.strip()) == (2, "Error: no job 'nobody'")

        # A job whose spec gave no inference graph has nothing to export.
        plain = await ember("jobs", "submit", "--json", str(write_job(tmp_path / "plain")), env=env)
        assert plain.code == 0, plain.err
        plain_job = plain.json()["job"]
        refused = await ember("jobs", "export", plain_job, "-o", str(model), env=env)
        assert refused.code == 2
        assert refused.err.strip() == (
            f"Error: job {plain_job} has no inference graph to export (an onnx model needs "
            "model.onnx.inference in the job spec)"
        )
        assert refused.err.count("\n") == 1

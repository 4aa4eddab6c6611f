"""The backup and restore procedure of docs/operations.md, as an operator runs it: an online
backup of ``state.db`` with ``sqlite3 .backup`` (or Python's backup API) while ``ember serve``
writes, a copy of ``blobs/``, the key and the embedded agent's directory; then the original is
lost and ``ember serve`` on the restored directory still has the job, its kept final model and
the key agents trust."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent.process import stop_process
from agent.protocol import Topics
from agent.protocol.messages import ModelVersion
from agent.transport import Transport
from coordinator.bundles import load_key, public_text
from coordinator.mosquitto import MosquittoProcess
from coordinator.rpc import RpcClient
from tests.coordinator.conftest import broker_config
from tests.coordinator.test_cli import ember, environment, spawn_serve, wait_answering
from tests.coordinator.test_jobs_export import outputs, placed_job, until
from tests.coordinator.test_model_keeper import weights
from tests.coordinator.test_onnx_model import mlp

SQLITE3 = shutil.which("sqlite3")


def backup(state: Path, target: Path, *, cli: bool) -> None:
    """docs/operations.md, "Backing up the coordinator", step by step."""
    target.mkdir()
    if cli:
        assert SQLITE3 is not None
        subprocess.run(
            [SQLITE3, str(state / "state.db"), f".backup '{target / 'state.db'}'"], check=True
        )
    else:
        source = sqlite3.connect(state / "state.db")
        copy = sqlite3.connect(target / "state.db")
        with copy:
            source.backup(copy)
        source.close()
        copy.close()
    shutil.copytree(state / "blobs", target / "blobs")
    shutil.copy2(state / "coordinator.key", target / "coordinator.key")
    if (state / "embedded-agent").exists():
        shutil.copytree(state / "embedded-agent", target / "embedded-agent")


@pytest.mark.parametrize(
    "cli", [pytest.param(True, id="sqlite3-cli"), pytest.param(False, id="python")]
)
async def test_an_online_backup_restores_jobs_models_and_the_key(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, cli: bool
) -> None:
    if cli and SQLITE3 is None:
        pytest.skip("the sqlite3 command is not installed")
    env = environment(mosquitto, topics)
    state, saved = tmp_path / "state", tmp_path / "backup"
    options = ("--no-embedded-agent", "--no-zeroconf", "--settle", "0.2", "--tick", "0.1")

    async def serve(directory: Path, n: int) -> asyncio.subprocess.Process:
        log = tmp_path / f"serve-{n}.log"
        with log.open("wb") as sink:
            process = await spawn_serve(env, directory, sink, *options)
        await wait_answering(process, log, mosquitto, topics)
        return process

    first = await serve(state, 0)
    key = public_text(load_key(state))
    async with Transport(broker_config(mosquitto.url), name="fake-agents") as transport:
        await transport.wait_connected(5)
        job = await placed_job(transport, topics, env, state)
        async with RpcClient(transport, topics) as client:

            async def final_kept() -> bool:
                final = ModelVersion(job=job, version=3, tensors=weights(3), final=True)
                await transport.publish(topics.job_model(job), final.to_msgpack())
                detail = await client.call("jobs.show", {"job": job})
                return bool((detail["weights"] or {}).get("final"))

            await until(final_kept, "the final version kept")
        # Online: the coordinator is running (and may be writing) while the backup is taken.
        await asyncio.to_thread(backup, state, saved, cli=cli)
    await stop_process(first, 15)
    shutil.rmtree(state)  # the disk is gone

    restored = await serve(saved, 1)
    try:
        assert public_text(load_key(saved)) == key  # agents keep trusting the same key
        listed = await ember("jobs", "ls", env=env)
        assert job in listed.out
        model = tmp_path / "model.onnx"
        exported = await ember("jobs", "export", job, "-o", str(model), env=env)
        assert exported.code == 0, exported.err
        assert "version 3 (final)" in exported.out
        x = np.random.default_rng(3).random((8, 64), dtype=np.float32)
        np.testing.assert_allclose(outputs(model, x), mlp(weights(3), x), rtol=1e-4, atol=1e-5)
    finally:
        await stop_process(restored, 15)

"""``ember jobs report``: the real ``ember serve`` and ``ember`` as subprocesses on a real
mosquitto; the test plays the agents and the aggregator (its ``model_version`` and
``completed`` events, its model versions), then reads every file the report wrote."""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent.protocol import Topics
from agent.protocol.messages import ModelVersion
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess
from coordinator.rpc import RpcClient
from tests.coordinator.conftest import broker_config
from tests.coordinator.test_cli import ember, environment
from tests.coordinator.test_jobs_export import (
    PARAMETERS,
    Start,
    outputs,
    placed_job,
    serve,
    until,
)
from tests.coordinator.test_model_keeper import weights
from tests.coordinator.test_onnx_model import mlp

__all__ = ["serve"]  # the fixture, imported for the tests below

CURVE = [  # version: (held-out accuracy, held-out loss, trainers' loss)
    (1, 0.41, 1.90, 2.10),
    (2, 0.66, 1.20, 1.50),
    (3, 0.83, 0.71, 0.90),
    (4, 0.91, 0.40, 0.52),
    (5, 0.89, 0.43, 0.47),
    (6, 0.94, 0.25, 0.33),
]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@dataclass
class Placed:
    """A placed job: the CLI's environment, the fake agents' connection, the job's id."""

    env: dict[str, str]
    transport: Transport
    job: str


@pytest.fixture
async def placed(
    serve: Start, mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> AsyncIterator[Placed]:
    """``ember serve`` with a job placed on two fake agents; the fake agents' connection."""
    env = environment(mosquitto, topics)
    await serve()
    async with Transport(broker_config(mosquitto.url), name="fake-agents") as transport:
        await transport.wait_connected(5)
        job = await placed_job(transport, topics, env, tmp_path / "state")
        yield Placed(env, transport, job)


async def test_report_of_a_completed_job_holds_its_curve_plots_model_and_summary(
    placed: Placed, topics: Topics, tmp_path: Path
) -> None:
    env, transport, job = placed.env, placed.transport, placed.job

    async def event(body: dict[str, Any]) -> None:
        await transport.publish(topics.job_metrics(job, "gateway"), json.dumps(body).encode())

    async with RpcClient(transport, topics) as client:

        async def show() -> dict[str, Any]:
            return dict(await client.call("jobs.show", {"job": job, "versions": "all"}))

        async def running() -> bool:
            return (await show())["phase"] == "running"

        await until(running, "the job running")
        for version, accuracy, loss, train_loss in CURVE:
            await event(
                {
                    "event": "model_version",
                    "version": version,
                    "updates_applied": 2 * version,
                    "accuracy": accuracy,
                    "loss": loss,
                    "train_loss": train_loss,
                    "elapsed": version * 1.5,
                }
            )
        final = ModelVersion(job=job, version=6, tensors=weights(6), final=True)
        await transport.publish(topics.job_model(job), final.to_msgpack())
        await event({"event": "completed", "version": 6, "reason": "max_versions"})

        async def ended_and_kept() -> bool:
            detail = await show()
            return detail["phase"] == "completed" and bool((detail["weights"] or {}).get("final"))

        await until(ended_and_kept, "the job completed with its final model kept")
        assert [r["version"] for r in (await show())["model_versions"]] == [1, 2, 3, 4, 5, 6]
        # jobs.show without the parameter lists the newest 20 versions, as before.
        shown = await client.call("jobs.show", {"job": job})
        assert len(shown["model_versions"]) == 6

    out = tmp_path / "report"
    result = await ember("jobs", "report", job, "-o", str(out), "--json", env=env)
    assert result.code == 0, result.err
    summary = result.json()
    assert (summary["job"], summary["phase"], summary["versions"]) == (job, "completed", 6)
    assert summary["best_accuracy"]["value"] == 0.94
    assert summary["best_accuracy"]["version"] == 6
    assert summary["lowest_loss"]["value"] == 0.25
    assert summary["updates_applied"] == 12
    # Roles by state: the job's end stopped both (the fake agents do not report "finished").
    assert summary["agents"] == {"aggregator": {"cancelled": 1}, "trainer": {"cancelled": 1}}
    assert set(summary["files"]) == {
        "versions.csv",
        "accuracy.png",
        "loss.png",
        "model.onnx",
        "report.md",
    }, summary["files"]

    with (out / "versions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["version"]) for r in rows] == [v for v, *_ in CURVE]
    assert [float(r["accuracy"]) for r in rows] == [a for _, a, _, _ in CURVE]
    assert [float(r["loss"]) for r in rows] == [loss for _, _, loss, _ in CURVE]
    assert [float(r["train_loss"]) for r in rows] == [t for *_, t in CURVE]
    assert [int(r["updates_applied"]) for r in rows] == [2 * v for v, *_ in CURVE]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds)
    assert seconds[0] >= 0
    assert list(rows[0])[:7] == [
        "version",
        "seconds",
        "time",
        "updates_applied",
        "accuracy",
        "loss",
        "train_loss",
    ]

    for name in ("accuracy.png", "loss.png"):
        assert png_size(out / name) == (840, 480)
        with Image.open(out / name) as image:  # drawn on: more than the background's colour
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10

    x = np.random.default_rng(5).random((16, 64), dtype=np.float32)
    np.testing.assert_allclose(outputs(out / "model.onnx", x), mlp(weights(6), x), rtol=1e-4)
    assert f"version 6 (final), {PARAMETERS:,} parameters" in summary["files"]["model.onnx"]

    markdown = (out / "report.md").read_text()
    assert markdown.startswith(f"# Job {job}: digits-export\n")
    assert "* Phase: **completed**" in markdown
    assert "* Best held-out accuracy: 0.9400 at version 6" in markdown
    assert "* Lowest held-out loss: 0.2500 at version 6" in markdown
    assert "| pi-digits | trainer |" in markdown
    assert "* `model.onnx`: version 6 (final)" in markdown

    people = await ember("jobs", "report", job, "-o", str(tmp_path / "again"), env=env)
    assert people.code == 0, people.err
    assert "best accuracy" in people.out
    assert "0.9400 (version 6)" in people.out
    assert f"wrote {tmp_path / 'again'}" in people.out


async def test_report_of_a_job_without_versions_says_what_it_could_not_write(
    placed: Placed, tmp_path: Path
) -> None:
    env, job = placed.env, placed.job
    out = tmp_path / "report"
    result = await ember("jobs", "report", job, "-o", str(out), "--json", env=env)
    assert result.code == 0, result.err
    files = result.json()["files"]
    assert files["versions.csv"] == "0 model versions, one row each"
    assert files["plots"] == "not drawn: the job has no model versions yet"
    assert files["model.onnx"].startswith(f"not written: job {job} has no model weights yet")
    assert (out / "versions.csv").read_text().splitlines() == [
        "version,seconds,time,updates_applied"
    ]
    assert not (out / "accuracy.png").exists()
    assert not (out / "model.onnx").exists()
    assert "not written: job" in (out / "report.md").read_text()

    unknown = await ember("jobs", "report", "no-such-job", "-o", str(tmp_path / "x"), env=env)
    assert unknown.code == 2
    assert unknown.err.startswith("Error: ")
    assert "no-such-job" in unknown.err
    assert not (tmp_path / "x").exists()

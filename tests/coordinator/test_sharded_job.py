"""Sharded FedBuff placed and followed by the coordinator: ``ember serve --aggregator-shards 2``
starts two embedded agents, the planner puts the assembler and one shard on each, and a job
submitted with ``ember jobs submit`` runs to its end on real agent processes and mosquitto."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.protocol import Topics
from coordinator.demo.run import Demo, DemoOptions
from coordinator.mosquitto import MosquittoProcess
from tests.coordinator.test_cli import digits_job, ember, real_fleet

AGGREGATOR = "coordinator-sharded"


@pytest.mark.slow
async def test_ember_serve_places_and_follows_a_sharded_job(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    job = digits_job(tmp_path, "digits-sharded", shards=2, versions=5)
    async with real_fleet(
        mosquitto,
        topics,
        tmp_path,
        aggregator=AGGREGATOR,
        serve_options=("--aggregator-shards", "2"),
    ) as fleet:
        env = fleet.env
        await fleet.wait_feasible(job)
        plan = (await ember("jobs", "plan", "--json", str(job), env=env)).json()
        placed = {(s["role"], s["shard"]): s["agent"] for s in plan["selected"]}
        # The assembler evaluates, so it goes where the held-out set is; the shards each get
        # an agent process of their own, the assembler's host last.
        assert placed == {
            ("shard_assembler", None): AGGREGATOR,
            ("aggregator_shard", 0): f"{AGGREGATOR}-1",
            ("aggregator_shard", 1): AGGREGATOR,
            ("trainer", None): "pi-trainer",
        }
        done = await ember("jobs", "submit", "--watch", str(job), env=env, timeout=180)
        logs = fleet.logs["serve"].read_text() + fleet.logs["aggregator"].read_text()
        assert done.code == 0, done.out + done.err + logs
        assert "completed: max_versions reached (5)" in done.out
        [row] = (await ember("jobs", "ls", "--json", env=env)).json()
        assert row["model_version"] == 5
        assert 0.0 < row["metrics"]["accuracy"] <= 1.0
        detail = (await ember("jobs", "show", "--json", row["job"], env=env)).json()
        roles = {(a["role"], a["shard"]): (a["agent"], a["state"]) for a in detail["assignments"]}
        assert roles[("aggregator_shard", 0)][0] == f"{AGGREGATOR}-1"
        assert roles[("aggregator_shard", 1)][0] == AGGREGATOR
        # The job ended on the assembler's word (its completion event or its role's end); what
        # still ran then was cancelled. Nothing failed.
        assert {state for _agent, state in roles.values()} <= {"finished", "cancelled"}


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_sharded_demo_reaches_the_target_accuracy(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """The digits demo, FedBuff split over two shards placed by the coordinator, on four
    Dirichlet(0.5) non-IID agents: the same held-out target as the unsharded demo."""
    options = DemoOptions(
        agents=4, shards=2, broker=mosquitto.url, out=tmp_path / "out", max_seconds=150
    )
    summary = await Demo(options).run()
    assert summary.phase == "completed", summary.reason
    assert options.target_accuracy is not None
    assert summary.final_accuracy >= options.target_accuracy
    assert summary.updates_applied >= summary.model_versions  # K = 2 updates per version
    # The coordinator kept the assembled weights: the final model exports as usual.
    assert summary.model is not None
    assert os.path.getsize(summary.model) > 0  # noqa: ASYNC240 (after the run)

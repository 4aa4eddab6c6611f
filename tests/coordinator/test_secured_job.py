"""A real job through a broker secured by ``ember broker config``: ``ember serve`` with the
coordinator's credentials, the CLI with an operator's, real ``ember-agent`` trainers with the
agent.toml the kit wrote; one trainer does not trust the coordinator's key and refuses its
bundle, and the refusal reaches ``ember jobs show`` with its reason."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.process import stop_process
from agent.protocol.bundle import public_key_to_text
from agent.protocol.topics import Topics
from tests.coordinator.brokerkit_fixtures import start_kit_broker
from tests.coordinator.test_cli import digits_job, ember, spawn_serve

AGENT_CLI = str(Path(sys.executable).parent / "ember-agent")


@pytest.mark.slow
async def test_a_job_runs_through_the_secured_broker_and_refusals_reach_the_coordinator(
    tmp_path: Path, topics: Topics
) -> None:
    job = digits_job(tmp_path, "digits-secured", concurrency=2)
    base = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    keys = await ember("keys", "init", "--state-dir", str(tmp_path / "coord"), env=base)
    secured = start_kit_broker(
        tmp_path,
        topics,
        agents=("pi-trainer", "pi-stranger"),
        coordinator_keys=(keys.out.strip(),),
    )
    coordinator_env = {**base, **secured.env("ember-coordinator")}
    operator_env = {**base, **secured.env("op"), "COLUMNS": "200"}
    stranger_key = public_key_to_text(Ed25519PrivateKey.generate().public_key())
    children = []
    try:
        with (tmp_path / "serve.log").open("wb") as sink:  # local files, opened once
            children.append(
                await spawn_serve(
                    coordinator_env,
                    tmp_path / "coord",
                    sink,
                    "--no-zeroconf",
                    "--agent-dataset",
                    f"digits-test={tmp_path / 'test.npz'}",
                    "--settle",
                    "0.3",
                )
            )
        for name, env in (
            ("pi-trainer", {}),
            ("pi-stranger", {"EMBER_AGENT__TRUST__COORDINATOR_KEYS": f'["{stranger_key}"]'}),
        ):
            config = secured.kit.credentials_dir(name) / "agent.toml"
            with config.open("a") as f:  # the kit's file plus what only the device knows
                f.write('[zeroconf]\nenabled = false\n[[datasets]]\nname = "digits"\n')
                f.write(f'path = "{tmp_path / "train.npz"}"\n')
            with (tmp_path / f"{name}.log").open("wb") as sink:
                children.append(
                    await asyncio.create_subprocess_exec(
                        AGENT_CLI,
                        "run",
                        "--config",
                        str(config),
                        env={
                            **base,
                            "EMBER_AGENT__AGENT__STATE_DIR": str(tmp_path / name),
                            **env,
                        },
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=sink,
                        stderr=sink,
                    )
                )
        for _ in range(150):  # until the coordinator, its aggregator and both trainers are up
            plan = await ember("jobs", "plan", "--json", str(job), env=operator_env)
            if plan.code == 0 and len(plan.json()["selected"]) == 3:
                break
        else:
            raise AssertionError(plan.out + plan.err + (tmp_path / "serve.log").read_text())
        done = await ember("jobs", "submit", "--watch", str(job), env=operator_env, timeout=120)
        logs = "".join((tmp_path / f"{n}.log").read_text() for n in ("serve", "pi-trainer"))
        assert done.code == 0, done.out + done.err + logs
        assert "completed: max_versions reached (3)" in done.out
        [row] = (await ember("jobs", "ls", "--json", env=operator_env)).json()
        shown = (await ember("jobs", "show", "--json", row["job"], env=operator_env)).json()
        by_agent = {a["agent"]: a for a in shown["assignments"] if a["role"] == "trainer"}
        assert by_agent["pi-stranger"]["state"] == "refused"
        assert "untrusted key" in by_agent["pi-stranger"]["reason"]
        assert by_agent["pi-trainer"]["state"] in ("finished", "cancelled", "running")
        stranger_log = (tmp_path / "pi-stranger.log").read_text()
        assert "role_refused" in stranger_log
        assert "untrusted key" in stranger_log
        table = await ember("jobs", "show", row["job"], env=operator_env)
        assert "untrusted key" in table.out
    finally:
        for child in reversed(children):
            await stop_process(child, 15)
        secured.process.stop()

"""Enrolment by one-time token against a real mosquitto started with a broker kit: ``ember
serve --broker-kit``, ``ember agents token``, ``ember-agent enroll`` and ``ember-agent run`` as
real processes. The enrolled agent logs in with its new login (mosquitto reloaded its password
file and ACL on SIGHUP) and appears in ``ember agents ls``; reused, wrong, unknown, expired and
other agents' tokens are refused with a clear reason."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.process import stop_process
from agent.protocol.topics import Topics
from coordinator.brokerkit.passwords import parse_password_file
from tests.coordinator.brokerkit_fixtures import SecuredBroker, start_kit_broker
from tests.coordinator.test_cli import Result, ember, run_command, spawn_serve

AGENT_CLI = str(Path(sys.executable).parent / "ember-agent")
_toml: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")


async def agent_cli(*args: str, env: dict[str, str]) -> Result:
    return await run_command(AGENT_CLI, *args, env=env)


@dataclass
class Fleet:
    secured: SecuredBroker
    operator: dict[str, str]
    base: dict[str, str]
    coordinator_key: str
    tmp: Path

    async def token(self, *options: str) -> dict[str, Any]:
        made = await ember("agents", "token", "--json", *options, env=self.operator)
        assert made.code == 0, made.err
        result: dict[str, Any] = made.json()
        return result

    async def enroll(self, made: dict[str, Any], agent: str, *, token: str = "") -> Result:
        return await agent_cli(
            "enroll",
            "--coordinator",
            made["url"],
            "--token",
            token or made["token"],
            "--id",
            agent,
            "--prefix",
            self.secured.topics.prefix,
            "--config",
            str(self.tmp / agent / "agent.toml"),
            "--timeout",
            "20",
            env=self.base,
        )


@pytest.fixture
async def fleet(tmp_path: Path, topics: Topics) -> AsyncIterator[Fleet]:
    secured = start_kit_broker(tmp_path, topics)
    base = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    operator = {**base, **secured.env("op")}
    keys = await ember("keys", "init", "--state-dir", str(tmp_path / "coord"), env=base)
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:  # a local file, opened once
        serve = await spawn_serve(
            {**base, **secured.env("ember-coordinator")},
            tmp_path / "coord",
            sink,
            "--no-embedded-agent",
            "--no-zeroconf",
            "--broker-kit",
            str(secured.kit.root),
            "--settle",
            "0.3",
        )
    try:
        for _ in range(100):  # until it answers an operator
            if (await ember("agents", "ls", "--json", "--timeout", "2", env=operator)).code == 0:
                break
            assert serve.returncode is None, log.read_text()
        yield Fleet(secured, operator, base, keys.out.strip(), tmp_path)
    finally:
        await stop_process(serve, 15)
        secured.process.stop()


async def test_an_agent_enrols_with_a_token_and_shows_up(fleet: Fleet) -> None:
    made = await fleet.token("--ttl", "10m")
    assert made["command"].startswith(f"ember-agent enroll --coordinator {made['url']} --token ")
    device = fleet.tmp / "pi-new"
    device.mkdir()
    config = device / "agent.toml"
    config.write_text(  # what an image ships: everything but the credentials
        textwrap.dedent(
            f"""
            [agent]
            state_dir = "{device / "state"}"
            labels = {{ site = "kitchen" }}
            [telemetry]
            interval = 0
            [zeroconf]
            enabled = false
            """
        )
    )
    enrolled = await fleet.enroll(made, "pi-new")
    assert enrolled.code == 0, enrolled.err
    assert f"enrolled as pi-new: wrote {config}" in enrolled.out
    written = _toml.loads(config.read_text())
    assert written["agent"]["labels"] == {"site": "kitchen"}  # kept
    assert written["broker"]["username"] == "pi-new"
    assert written["trust"]["coordinator_keys"] == [fleet.coordinator_key]
    assert (device / "ember-ca.crt").read_text() == (fleet.secured.kit.root / "ca.crt").read_text()
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert "pi-new" in parse_password_file((fleet.secured.kit.root / "passwd").read_text())

    log = device / "agent.log"
    with log.open("wb") as sink:  # a local file, opened once
        agent = await asyncio.create_subprocess_exec(
            AGENT_CLI, "run", "--config", str(config), env=fleet.base, stdout=sink, stderr=sink
        )
    try:
        for _ in range(100):
            listed = await ember("agents", "ls", "--json", env=fleet.operator)
            online = {a["agent"] for a in listed.json() if a.get("online")}
            if "pi-new" in online:
                break
            assert agent.returncode is None, log.read_text()
        else:
            raise AssertionError(log.read_text())
    finally:
        await stop_process(agent, 15)

    again = await fleet.enroll(made, "pi-other")
    assert again.code == 2
    assert "error: enrolment refused: enrolment token already used by pi-new at" in again.err


async def test_wrong_unknown_expired_and_pinned_tokens_are_refused(fleet: Fleet) -> None:
    made = await fleet.token("--ttl", "10m")
    token_id = made["token"].split(".")[0]
    wrong = await fleet.enroll(made, "pi-w", token=f"{token_id}.not-the-secret-at-all")
    assert "error: enrolment refused: wrong enrolment token" in wrong.err
    unknown = await fleet.enroll(made, "pi-u", token="0123456789ab.some-secret-nobody-made")
    assert "error: enrolment refused: unknown enrolment token" in unknown.err
    pinned = await fleet.token("--id", "pi-pinned")
    other = await fleet.enroll(pinned, "pi-x")
    assert "error: enrolment refused: this enrolment token is for agent 'pi-pinned' only" in (
        other.err
    )
    short = await fleet.token("--ttl", "1s")
    await asyncio.sleep(1.2)  # the behaviour under test is the passing of time
    expired = await fleet.enroll(short, "pi-e")
    assert "error: enrolment refused: enrolment token expired at" in expired.err
    for result in (wrong, unknown, other, expired):
        assert result.code == 2
    accounts = parse_password_file((fleet.secured.kit.root / "passwd").read_text())
    assert not {"pi-w", "pi-u", "pi-x", "pi-e"} & accounts.keys()
    # The token that was only tried with a wrong secret still works.
    assert (await fleet.enroll(made, "pi-w")).code == 0

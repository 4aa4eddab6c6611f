"""The heartbeat file and ``ember-agent health``, against real agent processes and mosquitto."""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.health import Health, check_health, health_path, write_health
from agent.protocol.topics import Topics
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess, free_port
from tests.agent.conftest import AgentProcess, agent_toml, eventually, next_json
from tests.agent.test_cli import run_cli

StartAgent = Callable[..., Awaitable[AgentProcess]]


def beat(state: str = "online", ts: float = 1000.0) -> Health:
    return Health(pid=7, state=state, session=3, version="9.9", agent="pi-a", ts=ts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("health", "online", "ok", "says"),
    [
        (beat("online"), True, True, "agent pi-a online (session 3, pid 7, version 9.9"),
        (beat("connecting"), False, True, "connecting"),
        (beat("connecting"), True, False, "not connected to the broker"),
        (beat("stopped"), False, False, "stopped"),
        (beat("online", ts=900.0), False, False, "stale"),
    ],
)
def test_verdicts(tmp_path: Path, health: Health, online: bool, ok: bool, says: str) -> None:
    path = tmp_path / "health.json"
    write_health(path, health)
    verdict = check_health(path, max_age=30, require_online=online, now=1010.0)
    assert (verdict.ok, says in verdict.reason) == (ok, True), verdict.reason


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "has not started"), (b"{", "cannot read"), (b'{"pid": 1}', "bad field")],
)
def test_missing_or_broken_file_is_unhealthy(
    tmp_path: Path, content: bytes | None, says: str
) -> None:
    path = tmp_path / "health.json"
    if content is not None:
        path.write_bytes(content)
    verdict = check_health(path)
    assert not verdict.ok
    assert says in verdict.reason


async def test_a_running_agent_is_healthy_and_a_stopped_one_is_not(
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = agent_toml(state_dir=state, broker_url=mosquitto.url, topics=topics, agent_id="pi-h")
    status = await watcher.subscribe(topics.agent_status("pi-h"))
    agent = await start_agent(config)
    online = await next_json(status, 20, state="online")
    await eventually(lambda: check_health(health_path(state), require_online=True).ok, 20)

    done = run_cli("health", "--online", "--config", str(agent.config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"healthy: agent pi-h online (session {online['session']}" in done.stdout

    assert await agent.stop(signal.SIGTERM) == 0
    done = run_cli("health", "--config", str(agent.config))
    assert done.returncode == 1
    assert "unhealthy: agent pi-h stopped" in done.stdout


async def test_without_a_broker_the_agent_is_alive_but_not_online(
    topics: Topics, start_agent: StartAgent, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    nobody = f"mqtt://127.0.0.1:{free_port()}"
    config = agent_toml(state_dir=state, broker_url=nobody, topics=topics, agent_id="pi-h")
    agent = await start_agent(config)
    await eventually(lambda: check_health(health_path(state)).ok, 20)

    alive = run_cli("health", "--config", str(agent.config))
    assert alive.returncode == 0, alive.stdout + alive.stderr
    assert "connecting" in alive.stdout
    online = run_cli("health", "--online", "--config", str(agent.config))
    assert online.returncode == 1
    assert "not connected to the broker" in online.stdout

    agent.kill()  # no clean stop: the file is left saying "connecting" and goes stale
    await agent.process.wait()
    written = check_health(health_path(state)).health
    assert written is not None
    stale = check_health(health_path(state), now=written.ts + 31)
    assert not stale.ok
    assert "stale" in stale.reason
    assert written.ts <= time.time()

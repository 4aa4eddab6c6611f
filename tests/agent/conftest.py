"""Fixtures for the agent daemon: a dataset on disk, agent configs, real agent processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.process import spawn_agent
from agent.protocol.topics import Topics
from agent.transport import BrokerConfig, Subscription, Transport

REPO = Path(__file__).resolve().parents[2]
FAST_BROKER = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 3.0}


def make_npz(path: Path, samples: int = 120, features: int = 8, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, features)).astype(np.float32)
    y = np.arange(samples) % classes
    np.savez(path, x=x, y=y)
    return path


def agent_toml(
    *,
    state_dir: Path,
    broker_url: str,
    topics: Topics,
    agent_id: str | None = "pi-test",
    datasets: list[dict[str, Any]] | None = None,
    keepalive: int = 2,
    telemetry: float = 0,
    zeroconf: bool = False,
    extra: str = "",
) -> str:
    lines = ["[agent]"]
    if agent_id is not None:
        lines.append(f'id = "{agent_id}"')
    lines += [
        f'state_dir = "{state_dir}"',
        'labels = { site = "kitchen" }',
        f'topic_prefix = "{topics.prefix}"',
        "[broker]",
        f'url = "{broker_url}"',
        f"keepalive = {keepalive}",
        "backoff_initial = 0.05",
        "backoff_max = 0.3",
        "[telemetry]",
        f"interval = {telemetry}",
        "[zeroconf]",
        f"enabled = {'true' if zeroconf else 'false'}",
        'interfaces = ["127.0.0.1"]',
    ]
    for ds in datasets or []:
        lines.append("[[datasets]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in ds.items()]
    return "\n".join(lines) + "\n" + extra


@dataclass
class AgentProcess:
    """An ``ember-agent run`` child process."""

    process: asyncio.subprocess.Process
    config: Path
    log: Path

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.running:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), timeout)

    def kill(self) -> None:
        if self.running:
            self.process.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
async def start_agent(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[AgentProcess]]]:
    """Start real agent processes from a config text; every one is stopped after the test."""
    started: list[AgentProcess] = []

    async def start(config_text: str, env: dict[str, str] | None = None) -> AgentProcess:
        n = len(started)
        config = tmp_path / f"agent-{n}.toml"
        config.write_text(config_text)
        log = tmp_path / f"agent-{n}.log"
        environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with log.open("wb") as sink:
            process = await spawn_agent(config, sink, env=environ)
        agent = AgentProcess(process, config, log)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.kill()
            with contextlib.suppress(ProcessLookupError):
                await agent.process.wait()


@pytest.fixture
async def watcher(mosquitto: Any) -> AsyncIterator[Transport]:
    """A plain client on the test broker, for watching what agents publish."""
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST_BROKER)) as transport:
        await transport.wait_connected(5)
        yield transport


async def next_json(sub: Subscription, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
    """The next JSON message on ``sub`` whose fields equal ``match`` (others are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"no message matching {match} on {sub.topic_filter}")
        try:
            message = await sub.get(timeout=remaining)
        except asyncio.TimeoutError:
            raise AssertionError(f"no message matching {match} on {sub.topic_filter}") from None
        document: dict[str, Any] = json.loads(bytes(message.payload))
        if all(document.get(k) == v for k, v in match.items()):
            return document


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition by polling an event-driven state, never by a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)

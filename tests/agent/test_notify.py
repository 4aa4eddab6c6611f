"""sd_notify(3) with real unix datagram sockets, and the agent under a pretend systemd."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.notify import Notifier, watchdog_interval
from agent.protocol.topics import Topics
from coordinator.mosquitto import free_port
from tests.agent.conftest import AgentProcess, agent_toml


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """systemd's side: an abstract-namespace datagram socket (``@name`` in NOTIFY_SOCKET)."""
    name = f"ember-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        yield f"@{name}", sock
    finally:
        sock.close()


def test_one_datagram_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        notifier = Notifier(str(path))
        assert notifier.send("READY=1", "STATUS=up")
        assert server.recv(4096) == b"READY=1\nSTATUS=up"
        notifier.close()


def test_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    address, server = abstract_socket
    server.setblocking(True)
    assert Notifier(address).send("WATCHDOG=1")
    assert server.recv(4096) == b"WATCHDOG=1"


def test_without_systemd_nothing_is_sent(tmp_path: Path) -> None:
    assert not Notifier("").send("READY=1")
    assert not Notifier(str(tmp_path / "gone")).send("READY=1")  # logged, never raised


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


async def test_agent_is_ready_without_a_broker_pings_the_watchdog_and_says_stopping(
    abstract_socket: tuple[str, socket.socket],
    start_agent: Callable[..., Awaitable[AgentProcess]],
    topics: Topics,
    tmp_path: Path,
) -> None:
    address, server = abstract_socket
    loop = asyncio.get_running_loop()
    dead_broker = f"mqtt://127.0.0.1:{free_port()}"  # the device's broker is down
    config = agent_toml(state_dir=tmp_path / "state", broker_url=dead_broker, topics=topics)
    agent = await start_agent(config, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})

    async def receive() -> list[str]:
        data = await asyncio.wait_for(loop.sock_recv(server, 4096), 20)
        return data.decode().split("\n")

    first = await receive()
    assert "READY=1" in first
    ready_at = loop.time()
    watchdog = 0
    while watchdog < 5:
        if "WATCHDOG=1" in await receive():
            watchdog += 1
    # Pings come every WATCHDOG_USEC / 2 = 0.1 s, from the event loop.
    assert loop.time() - ready_at < 3
    agent.process.send_signal(signal.SIGTERM)
    while "STOPPING=1" not in await receive():
        pass
    assert await asyncio.wait_for(agent.process.wait(), 15) == 0

"""A real fleet running a real job, for the tests of what watches one (``ember top``, the web
dashboard): mosquitto with a TCP and a WebSockets listener on loopback, and ``ember demo``'s
coordinator, aggregator and two agent processes training digits with FedBuff, in a thread of
its own until the test module ends."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from agent.protocol.topics import Topics
from coordinator.demo.run import Demo, DemoOptions
from coordinator.mosquitto import MosquittoProcess, free_port


@dataclass
class LiveFleet:
    broker: MosquittoProcess
    ws_url: str
    topics: Topics
    agents: tuple[str, ...]
    errors: list[BaseException] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.broker.url


def websockets_listener(port: int) -> str:
    """mosquitto.conf lines for an MQTT-over-WebSockets listener on loopback."""
    return f"listener {port} 127.0.0.1\nprotocol websockets"


@pytest.fixture(scope="module")
def live_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    """The demo's job against our own mosquitto, with a target it will not reach soon (so it is
    still running while the tests look) and telemetry every second."""
    root = tmp_path_factory.mktemp("live-fleet")
    ws_port = free_port()
    broker = MosquittoProcess(root / "mosquitto", extra_config=websockets_listener(ws_port))
    broker.start()
    topics = Topics(f"ember-test/live-{ws_port}")
    options = DemoOptions(
        agents=2, broker=broker.url, out=root / "out", target_accuracy=0.999, max_seconds=240
    )
    demo = Demo(options)
    demo.prefix, demo.topics = topics.prefix, topics  # the tests must know where to look
    fleet = LiveFleet(
        broker=broker,
        ws_url=f"ws://127.0.0.1:{ws_port}",
        topics=topics,
        agents=("demo-aggregator", "demo-pi-0", "demo-pi-1"),
    )
    ready = threading.Event()
    state: dict[str, asyncio.AbstractEventLoop | asyncio.Task[object]] = {}

    def run() -> None:
        async def main() -> None:
            state["loop"] = asyncio.get_running_loop()
            task = state["task"] = asyncio.ensure_future(demo.run())
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        try:
            asyncio.run(main())
        except BaseException as exc:
            fleet.errors.append(exc)
            ready.set()

    with pytest.MonkeyPatch.context() as env:
        env.setenv("EMBER_AGENT__TELEMETRY__INTERVAL", "1")
        thread = threading.Thread(target=run, name="live-fleet", daemon=True)
        thread.start()
        ready.wait(30)
        try:
            yield fleet
        finally:
            loop, task = state.get("loop"), state.get("task")
            if isinstance(loop, asyncio.AbstractEventLoop) and isinstance(task, asyncio.Task):
                loop.call_soon_threadsafe(task.cancel)
            thread.join(60)
            broker.stop()
    assert not thread.is_alive(), "the demo did not stop"


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Z0-9]")


def plain(text: str) -> str:
    """Terminal output without escape sequences."""
    return ANSI.sub("", text).replace("\r", "")

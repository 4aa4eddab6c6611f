"""What every role gets from its context: a publish that outlives a failing link."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.protocol import Topics
from agent.protocol.bundle import RoleBundle
from agent.roles import base
from agent.roles.base import RoleContext
from agent.transport import BrokerConfig, Transport
from coordinator.mosquitto import MosquittoProcess


async def test_role_publish_keeps_trying_with_the_reason_logged(
    mosquitto_factory: Callable[..., MosquittoProcess],
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 3.1.1 broker that disconnects every oversized frame makes each transport publish give
    up; the role's publish logs why and tries again instead of failing the role."""
    monkeypatch.setattr(base, "PUBLISH_RETRY_INITIAL", 0.05)
    broker = mosquitto_factory(max_packet_size=8 * 1024)
    config = BrokerConfig(
        urls=(broker.url,), protocol="3.1.1", chunk_size=64 * 1024, backoff_initial=0.01
    )
    async with Transport(config) as transport:
        await transport.wait_connected(5)
        ctx = RoleContext(
            agent_id="pi",
            bundle=RoleBundle(job="j", role="trainer"),
            transport=transport,
            topics=topics,
            state_dir=tmp_path,
            datasets={},
            run_cpu=asyncio.to_thread,
            report=lambda _event: asyncio.sleep(0),
        )
        with capture_logs() as logs:
            task = asyncio.create_task(ctx.publish(topics.job_updates("j", "pi"), b"x" * 50_000))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not any(e["event"] == "role_publish_retry" for e in logs):
                assert loop.time() < deadline, "no retry within 60 s"
                assert not task.done(), task
                await asyncio.sleep(0.05)
            assert not task.done()  # still trying: the role is alive
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    retry = next(e for e in logs if e["event"] == "role_publish_retry")
    assert "max_packet_size" in retry["reason"]

"""Fixtures that model Ember's environment: real mosquitto brokers on loopback, unique topics."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, settings

from agent.protocol.topics import Topics
from coordinator.mosquitto import MosquittoProcess, free_port


@pytest.fixture(autouse=True, scope="session")
def _structlog_never_caches() -> Iterator[None]:
    """Tests that run a CLI command in-process (click's CliRunner) configure logging the way
    the command does, with loggers cached on first use; a cached logger never reaches
    ``structlog.testing.capture_logs`` again. In tests, configuration never caches."""
    original = structlog.configure

    def configure(*args: Any, **kwargs: Any) -> None:
        kwargs["cache_logger_on_first_use"] = False
        original(*args, **kwargs)

    structlog.configure = configure
    yield
    structlog.configure = original


@pytest.fixture(autouse=True)
def _structlog_defaults_after_each_test() -> Iterator[None]:
    """Whatever a test configured (a CLI command's level filter drops info events before
    ``capture_logs`` sees them) ends with the test, so log assertions never depend on order."""
    yield
    structlog.reset_defaults()


settings.register_profile(
    "ember", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("ci", parent=settings.get_profile("ember"), max_examples=200)
settings.load_profile("ci" if os.environ.get("CI") else "ember")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A mosquitto of our own on a free loopback port, stopped after the test (pass or fail)."""
    broker = MosquittoProcess(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoProcess]]:
    """Start brokers with custom settings (``max_packet_size``, ``extra_config``, ...)."""
    brokers: list[MosquittoProcess] = []

    def start(**options: Any) -> MosquittoProcess:
        broker = MosquittoProcess(tmp_path / f"mosquitto-{len(brokers)}", **options)
        brokers.append(broker)
        return broker.start()

    try:
        yield start
    finally:
        for broker in brokers:
            broker.stop()


@pytest.fixture
def topics(request: pytest.FixtureRequest) -> Topics:
    """A topic prefix no other test uses, derived from the test's name."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return Topics(prefix=f"ember-test/{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def amqtt_url() -> AsyncIterator[str]:
    """An amqtt broker (what ``ember serve`` embeds; MQTT 3.1.1 only) on a free loopback port,
    anonymous clients allowed; its URL. Shut down after the test."""
    from amqtt.broker import Broker

    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        await broker.shutdown()

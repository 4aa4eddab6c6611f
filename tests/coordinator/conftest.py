"""Fixtures for the coordinator: fake agents that are nothing but the retained documents a real
agent publishes (real MQTT, no mocks), and an in-process coordinator core."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import Message, Topics, decode_message
from agent.protocol.bundle import RoleBundle, key_id, verify_bundle
from agent.protocol.codec import encode_tensors
from agent.protocol.messages import AssignRole, CancelRole
from agent.transport import BrokerConfig, Subscription, Transport
from coordinator.dispatcher import Dispatcher, Timings
from coordinator.mosquitto import MosquittoProcess
from coordinator.registry import Registry
from coordinator.store import Store

FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 3.0}
TEST_TIMINGS = Timings(settle=0.2, tick=0.1, dispatch_timeout=1.0, max_attempts=2)


def broker_config(url: str, **options: Any) -> BrokerConfig:
    return BrokerConfig(urls=(url,), **{**FAST, **options})


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait for a condition driven by real messages, polling briefly; never a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached in {timeout} s: {what}")
        await asyncio.sleep(0.02)


def agent_info(
    agent: str,
    *,
    datasets: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    arch: str = "aarch64",
    memory_mb: int = 4096,
) -> dict[str, Any]:
    """An info document shaped like agent.presence.build_info's."""
    return {
        "v": 1,
        "agent": agent,
        "ts": time.time(),
        "version": "0.1.0",
        "hostname": agent,
        "os": {"system": "Linux", "release": "6.6", "distro": "Debian GNU/Linux 12"},
        "arch": arch,
        "cpu": {"model": "Cortex-A76", "cores": 4, "threads": 4},
        "memory": {"total": memory_mb * 1024 * 1024},
        "accelerators": [],
        "runtimes": {
            "onnxruntime": {"version": "1.17.0", "providers": ["CPUExecutionProvider"]},
            "torch": None,
        },
        "allow_code": False,
        "labels": labels or {},
        "datasets": datasets or [],
    }


@dataclass
class FakeAgent:
    """An agent played by the test: retained status/info/roles and a real inbox subscription."""

    id: str
    transport: Transport
    topics: Topics
    info: dict[str, Any]
    inbox: Subscription | None = None
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    session: int = 0

    async def start(self, *, online: bool = True) -> FakeAgent:
        self.inbox = await self.transport.subscribe(self.topics.agent_inbox(self.id))
        await self.publish_info()
        if online:
            await self.go_online()
        return self

    async def publish_info(self) -> None:
        await self.transport.publish(
            self.topics.agent_info(self.id), json.dumps(self.info), retain=True
        )

    async def go_online(self) -> None:
        self.session += 1
        await self._status("online")

    async def go_offline(self, reason: str = "connection lost") -> None:
        await self._status("offline", reason)

    async def _status(self, state: str, reason: str = "") -> None:
        doc = {
            "v": 1,
            "type": "agent_status",
            "id": f"s{self.session}{state}",
            "agent": self.id,
            "state": state,
            "session": self.session,
            "ts": time.time(),
            "reason": reason,
        }
        await self.transport.publish(
            self.topics.agent_status(self.id), json.dumps(doc), retain=True
        )

    async def set_role(
        self, job: str, role: str, state: str, *, bundle: str | None = None, reason: str = ""
    ) -> None:
        self.roles[f"{job}/{role}"] = {
            "job": job,
            "role": role,
            "state": state,
            "reason": reason,
            "bundle": bundle,
            "since": time.time(),
        }
        await self.publish_roles()

    async def forget_roles(self) -> None:
        self.roles.clear()
        await self.publish_roles()

    async def publish_roles(self) -> None:
        doc = {"v": 1, "agent": self.id, "ts": time.time(), "roles": self.roles}
        await self.transport.publish(self.topics.agent_roles(self.id), json.dumps(doc), retain=True)

    def idle(self) -> bool:
        """Nothing arrived in the inbox (yet)."""
        return self.inbox is not None and self.inbox.get_nowait() is None

    async def command(self, timeout: float = 10.0) -> Message:
        assert self.inbox is not None
        message = await self.inbox.get(timeout)
        return decode_message(message.payload, expect=(AssignRole, CancelRole))

    async def assignment(
        self, key: Ed25519PrivateKey, timeout: float = 10.0
    ) -> tuple[AssignRole, RoleBundle]:
        while True:
            command = await self.command(timeout)
            if isinstance(command, AssignRole):
                public = key.public_key()
                bundle = verify_bundle(command.bundle, {key_id(public): public}, allow_code=False)
                return command, bundle

    async def accept(self, key: Ed25519PrivateKey, timeout: float = 10.0) -> RoleBundle:
        """Take the next assignment and report its role running, as a real agent would."""
        _, bundle = await self.assignment(key, timeout)
        await self.set_role(bundle.job, bundle.role, "running", bundle=bundle.digest)
        return bundle

    async def cancellation(self, timeout: float = 10.0, *, job: str | None = None) -> CancelRole:
        """The next cancel (of ``job``, when given: the end of an earlier job may cancel its
        roles again, e.g. while this fake still reports them running, and arrive late)."""
        while True:
            command = await self.command(timeout)
            if isinstance(command, CancelRole) and job in (None, command.job):
                return command


def artifacts(size: int = 1000) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "train_step.onnx": b"train-step graph" + bytes(size),
        "eval.onnx": b"eval graph",
        "inference.onnx": b"inference graph",
        "initial.tensors": encode_tensors({"w": rng.standard_normal(10).astype(np.float32)}),
    }


@dataclass
class Core:
    """An in-process coordinator core (store, registry, dispatcher) on a real broker."""

    transport: Transport
    topics: Topics
    store: Store
    registry: Registry
    dispatcher: Dispatcher
    key: Ed25519PrivateKey

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.registry.stop()
        await self.transport.close()
        await self.store.close()


async def start_core(
    url: str, topics: Topics, state_dir: Path, key: Ed25519PrivateKey, **timings: Any
) -> Core:
    store = await Store.open(state_dir)
    transport = Transport(broker_config(url), name="coordinator-test")
    transport.start()
    await transport.wait_connected(5)
    registry = Registry(transport, topics)
    await registry.start()
    dispatcher = Dispatcher(
        transport=transport,
        topics=topics,
        store=store,
        registry=registry,
        key=key,
        timings=Timings(**{**vars(TEST_TIMINGS), **timings}),
    )
    await dispatcher.start()
    return Core(transport, topics, store, registry, dispatcher, key)


@pytest.fixture
def coordinator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def agents_transport(mosquitto: MosquittoProcess) -> AsyncIterator[Transport]:
    async with Transport(broker_config(mosquitto.url), name="fake-agents") as transport:
        await transport.wait_connected(5)
        yield transport

"""The role runtime with real signed bundles, a real broker and small test-only roles."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from agent.config import DatasetConfig
from agent.datasets import Dataset
from agent.protocol.bundle import RoleBundle, SignedBundle, public_key_to_text, sign_bundle
from agent.protocol.messages import AssignRole, CancelRole, Ping, Pong, decode_message
from agent.protocol.topics import Topics
from agent.roles.base import Role
from agent.runtime import RoleRuntime
from agent.transport import BrokerConfig, Subscription, Transport
from coordinator.mosquitto import MosquittoProcess
from tests.agent.conftest import FAST_BROKER, make_npz, next_json

AGENT = "pi-rt"


class Finishes(Role):
    kind: ClassVar[str] = "trainer"
    started: ClassVar[int] = 0

    async def run(self) -> None:
        type(self).started += 1
        await self.ctx.report({"step": 1, "loss": 0.5, "bad": float("nan")})
        assert self.ctx.state_dir.is_dir()
        assert self.ctx.datasets["digits"].x.shape == (30, 8)


class Raises(Role):
    kind: ClassVar[str] = "trainer"

    async def run(self) -> None:
        raise RuntimeError("boom: the model diverged")


class RunsUntilCancelled(Role):
    kind: ClassVar[str] = "trainer"
    cancelled: ClassVar[list[str]] = []

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            type(self).cancelled.append(self.ctx.bundle.digest)
            raise


def spin(seconds: float) -> int:
    """Pure-Python CPU work (holds the GIL between switch intervals): the worst case."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


class Busy(Role):
    kind: ClassVar[str] = "trainer"
    result: ClassVar[list[int]] = []

    async def run(self) -> None:
        type(self).result.append(await self.ctx.run_cpu(spin, 1.5))


@dataclass
class Rig:
    """An agent-side runtime and a coordinator-side client on one broker."""

    topics: Topics
    agent: Transport
    coordinator: Transport
    key: Ed25519PrivateKey
    state_dir: Path
    datasets: Mapping[str, Dataset]
    runtimes: list[RoleRuntime] = field(default_factory=list)

    async def runtime(
        self, role_types: Mapping[str, type[Role]], *, allow_code: bool = False, keys: Any = None
    ) -> RoleRuntime:
        runtime = RoleRuntime(
            agent_id=AGENT,
            topics=self.topics,
            transport=self.agent,
            state_dir=self.state_dir,
            datasets=self.datasets,
            trusted_keys=[public_key_to_text(self.key.public_key())] if keys is None else keys,
            allow_code=allow_code,
            role_types=role_types,
        )
        await runtime.start()
        self.runtimes.append(runtime)
        return runtime

    def bundle(self, job: str = "j1", role: str = "trainer", **options: Any) -> bytes:
        options.setdefault("dataset", {"name": "digits"})
        signer = options.pop("signer", self.key)
        content = RoleBundle(job=job, role=role, prefix=self.topics.prefix, **options)
        return sign_bundle(content, signer).to_bytes()

    async def send(self, command: AssignRole | CancelRole | Ping | bytes) -> None:
        payload = command if isinstance(command, bytes) else command.to_msgpack()
        await self.coordinator.publish(self.topics.agent_inbox(AGENT), payload)

    async def assign(self, bundle: bytes, job: str = "j1", role: str = "trainer") -> AssignRole:
        command = AssignRole(job=job, role=role, bundle=bundle)
        await self.send(command)
        return command

    async def ping_rtt(self, replies: Subscription) -> float:
        ping = Ping(reply_to=self.topics.rpc_replies("rig"))
        start = time.perf_counter()
        await self.send(ping)
        while True:
            pong = decode_message((await replies.get(timeout=10)).payload, expect=Pong)
            if pong.ping_id == ping.id:
                return time.perf_counter() - start


@pytest.fixture
async def rig(mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path) -> AsyncIterator[Rig]:
    config = BrokerConfig(urls=(mosquitto.url,), **FAST_BROKER)
    data = make_npz(tmp_path / "digits.npz", samples=30)
    datasets = {"digits": Dataset(DatasetConfig(name="digits", path=data))}
    async with Transport(config) as agent, Transport(config) as coordinator:
        await agent.wait_connected(5)
        await coordinator.wait_connected(5)
        rig = Rig(
            topics, agent, coordinator, Ed25519PrivateKey.generate(), tmp_path / "state", datasets
        )
        try:
            yield rig
        finally:
            for runtime in rig.runtimes:
                await runtime.stop(grace=2)


async def roles_until(
    sub: Subscription, done: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """The first retained roles document whose ``roles`` satisfy ``done``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        document = await next_json(sub, max(0.01, deadline - loop.time()), agent=AGENT)
        roles: dict[str, Any] = document["roles"]
        if done(roles):
            return roles


async def role_state(
    sub: Subscription, key: str, state: str, timeout: float = 10
) -> dict[str, Any]:
    roles = await roles_until(sub, lambda r: r.get(key, {}).get("state") == state, timeout)
    entry: dict[str, Any] = roles[key]
    return entry


async def test_a_role_runs_reports_and_finishes(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    metrics = await rig.coordinator.subscribe(rig.topics.job_metrics("j1", AGENT))
    await rig.runtime({"trainer": Finishes})
    bundle = rig.bundle()
    await rig.assign(bundle)
    entry = await role_state(roles, "j1/trainer", "finished")
    assert entry["job"] == "j1"
    assert entry["role"] == "trainer"
    assert len(entry["bundle"]) == 64
    event = await next_json(metrics, 5, job="j1")
    assert event == {**event, "agent": AGENT, "role": "trainer", "step": 1, "bad": None}
    assert (rig.state_dir / "roles" / "j1" / "trainer").is_dir()


async def test_a_crashing_role_is_reported_failed_and_the_runtime_goes_on(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    replies = await rig.coordinator.subscribe(rig.topics.rpc_replies("rig"))
    with capture_logs() as logs:
        await rig.runtime({"trainer": Raises})
        await rig.assign(rig.bundle())
        entry = await role_state(roles, "j1/trainer", "failed")
    assert entry["reason"] == "RuntimeError: boom: the model diverged"
    crash = [e for e in logs if e["event"] == "role_crashed"]
    assert crash
    assert crash[0]["exc_info"]
    assert await rig.ping_rtt(replies) < 5


async def test_cancel_stops_a_running_role(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    runtime = await rig.runtime({"trainer": RunsUntilCancelled})
    bundle = rig.bundle(job="j2")
    await rig.assign(bundle, job="j2")
    await role_state(roles, "j2/trainer", "running")
    assert runtime.running() == ["j2/trainer"]
    await rig.send(CancelRole(job="j2", role="trainer", reason="job stopped by operator"))
    entry = await role_state(roles, "j2/trainer", "cancelled")
    assert entry["reason"] == "job stopped by operator"
    assert RunsUntilCancelled.cancelled
    assert runtime.running() == []


async def test_cpu_work_runs_in_a_worker_and_the_loop_keeps_answering(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    replies = await rig.coordinator.subscribe(rig.topics.rpc_replies("rig"))
    runtime = await rig.runtime({"trainer": Busy})
    await rig.assign(rig.bundle(job="busy"), job="busy")
    await role_state(roles, "busy/trainer", "running")
    await asyncio.sleep(0.05)
    rtts = []
    while runtime.cpu_busy:
        rtts.append(await rig.ping_rtt(replies))
    await role_state(roles, "busy/trainer", "finished")
    assert len(rtts) >= 3, rtts  # several round trips fitted into 1.5 s of CPU work
    assert max(rtts) < 0.5, rtts
    assert Busy.result
    assert Busy.result[0] > 0


async def test_refusals_are_recorded_with_their_reason(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    await rig.runtime({"trainer": Finishes})
    started = Finishes.started
    stranger = Ed25519PrivateKey.generate()
    await rig.assign(rig.bundle(job="a", signer=stranger), job="a")
    await rig.assign(rig.bundle(job="b", code={"model.py": "import os"}), job="b")
    await rig.assign(rig.bundle(job="c", role="aggregator"), job="c", role="aggregator")
    await rig.assign(rig.bundle(job="d", dataset={"name": "cifar"}), job="d")
    await rig.assign(rig.bundle(job="e"), job="other")
    await rig.assign(b"\x93not a bundle", job="f")
    signed = SignedBundle.from_bytes(rig.bundle(job="g"))
    forged = RoleBundle(job="g", role="trainer", prefix=rig.topics.prefix, config={"lr": 99})
    tampered = SignedBundle(forged.to_bytes(), signed.key_id, signed.signature)
    with capture_logs() as logs:
        await rig.assign(tampered.to_bytes(), job="g")
        expected = {
            "a/trainer": "signed by untrusted key",
            "b/trainer": "carries Python code (model.py) and this agent does not allow code",
            "c/aggregator": "role 'aggregator' is not available on this agent (available: trainer)",
            "d/trainer": "dataset 'cifar' is not on this agent (datasets: digits)",
            "other/trainer": "bundle is for e/trainer, but the command assigns other/trainer",
            "f/trainer": "signed bundle",
            "g/trainer": "signature does not verify",
        }
        document = await roles_until(roles, lambda r: expected.keys() <= r.keys())
    for key, reason in expected.items():
        assert document[key]["state"] == "refused"
        assert reason in document[key]["reason"], (key, document[key])
    assert Finishes.started == started  # nothing ran
    logged = [e for e in logs if e["event"] == "role_refused" and e["job"] == "g"]
    assert "signature does not verify" in logged[0]["reason"]


async def test_code_bundles_run_where_allowed(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    await rig.runtime({"trainer": Finishes}, allow_code=True)
    await rig.assign(rig.bundle(code={"model.py": "x = 1"}))
    await role_state(roles, "j1/trainer", "finished")


async def test_assign_is_idempotent_and_a_new_bundle_replaces_the_old(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    runtime = await rig.runtime({"trainer": RunsUntilCancelled})
    RunsUntilCancelled.cancelled.clear()
    first = rig.bundle(job="j3", config={"lr": 0.1})
    command = await rig.assign(first, job="j3")
    running = await role_state(roles, "j3/trainer", "running")
    with capture_logs() as logs:
        await rig.send(command)  # a QoS 1 redelivery: same message id
        await rig.assign(first, job="j3")  # the same bundle again, new message id
        await asyncio.sleep(0.3)
    events = [e["event"] for e in logs]
    assert "inbox_duplicate" in events
    assert "assign_duplicate" in events
    assert RunsUntilCancelled.cancelled == []
    assert runtime.records["j3/trainer"].bundle == running["bundle"]

    await rig.assign(rig.bundle(job="j3", config={"lr": 0.01}), job="j3")
    replaced = await role_state(roles, "j3/trainer", "running")
    assert replaced["bundle"] != running["bundle"]
    assert RunsUntilCancelled.cancelled == [running["bundle"]]


async def test_malformed_commands_are_logged_and_dropped(rig: Rig) -> None:
    replies = await rig.coordinator.subscribe(rig.topics.rpc_replies("rig"))
    runtime = await rig.runtime({})
    with capture_logs() as logs:
        await rig.send(b"\xc1garbage")
        await rig.send(Pong(ping_id="x", agent="y"))
        await rig.send(b'{"v": 1, "type": "cancel_role", "id": "abc", "job": "j/1", "role": "t"}')
        assert await rig.ping_rtt(replies) < 5
    reasons = [e["reason"] for e in logs if e["event"] == "inbox_rejected"]
    assert len(reasons) == 3
    assert "neither a JSON object nor a msgpack map" in reasons[0]
    assert "expected a assign_role or cancel_role or ping message, got pong" in reasons[1]
    assert "cancel_role.job" in reasons[2]
    assert runtime.rejected == 3


async def test_stop_cancels_running_roles(rig: Rig) -> None:
    roles = await rig.coordinator.subscribe(rig.topics.agent_roles(AGENT))
    runtime = await rig.runtime({"trainer": RunsUntilCancelled})
    await rig.assign(rig.bundle(job="j4"), job="j4")
    await role_state(roles, "j4/trainer", "running")
    await runtime.stop()
    record = runtime.records["j4/trainer"]
    assert (record.state, record.reason) == ("cancelled", "agent stopping")


class Progresses(Role):
    kind: ClassVar[str] = "trainer"
    release: ClassVar[asyncio.Event]

    calls: ClassVar[int] = 0

    async def run(self) -> None:
        self.ctx.progress({"state": "training", "updates_sent": 1, "model_version": 3})
        self.ctx.progress({"updates_sent": 2, "expensive": self.expensive})
        await type(self).release.wait()

    @classmethod
    def expensive(cls) -> dict[str, float]:
        cls.calls += 1
        return {"calls": cls.calls, "nan": math.nan}


async def test_role_progress_is_retained_per_job_and_agent(rig: Rig) -> None:
    Progresses.release = asyncio.Event()
    topic = rig.topics.job_progress("j1", AGENT)
    progress = await rig.coordinator.subscribe(topic)
    runtime = await rig.runtime({"trainer": Progresses})
    await rig.assign(rig.bundle())
    while True:
        document = await next_json(progress, 10, agent=AGENT)
        entry = document["roles"].get("trainer", {})
        if entry.get("updates_sent") == 2:
            break
    assert document["job"] == "j1"
    assert entry["state"] == "training"
    assert entry["model_version"] == 3
    assert isinstance(entry["since"], float)
    # A field given as a function is computed when the document goes out, not when reported.
    assert entry["expensive"]["calls"] >= 1
    assert entry["expensive"]["nan"] is None
    assert runtime.updates_sent == 2
    Progresses.release.set()
    while entry.get("state") != "finished":
        entry = (await next_json(progress, 10, agent=AGENT))["roles"]["trainer"]
    # A late subscriber (another client) gets the last document at once: it is retained.
    late = await rig.agent.subscribe(topic)
    assert (await next_json(late, 5, agent=AGENT))["roles"]["trainer"]["state"] == "finished"

"""Ember on a clustered broker: three NATS nodes with MQTT, agents spread over them, one node
killed mid-job (tests/nats_cluster.py starts the cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.roles.checkpoints import Checkpoints
from agent.roles.delivery import read_ledger
from agent.spool import Spool
from agent.transport import BrokerConfig, Transport
from coordinator.demo.run import Demo, DemoOptions, Progress
from tests.nats_cluster import NatsCluster, nats_cluster, nats_factory

__all__ = ["nats_cluster", "nats_factory"]  # the fixtures, imported for pytest


async def connected(url: str) -> Transport:
    transport = Transport(BrokerConfig(urls=(url,), backoff_initial=0.1))
    transport.start()
    await transport.wait_connected(20)
    return transport


async def test_messages_cross_the_cluster_chunked_and_retained(nats_cluster: NatsCluster) -> None:
    """What Ember needs of the broker, between clients of different nodes: MQTT 3.1.1 (NATS
    refuses MQTT 5; the transport falls back), a 3 MB model version in chunks under NATS's
    1 MB payload limit, retained JSON documents (stored in JetStream)."""
    a, b = await connected(nats_cluster.urls[0]), await connected(nats_cluster.urls[2])
    try:
        assert a.protocol_in_use == b.protocol_in_use == "3.1.1"
        sub = await a.subscribe("ember-test/cluster/#")
        big = os.urandom(3_000_000)
        # A subscription made on one node reaches the others through the routes shortly after.
        deadline = time.monotonic() + 10
        while True:
            await b.publish("ember-test/cluster/ping", b"ping")
            try:
                if (await sub.get(timeout=0.5)).payload == b"ping":
                    break
            except asyncio.TimeoutError:
                assert time.monotonic() < deadline, "subscription never reached node 2"
        await b.publish("ember-test/cluster/model", big)
        message = await sub.get(timeout=30)
        while message.topic.endswith("/ping"):
            message = await sub.get(timeout=30)
        assert message.payload == big
        await b.publish("ember-test/cluster/state", b'{"phase": "running"}', retain=True)
        late = await connected(nats_cluster.urls[1])
        try:
            retained = await late.subscribe("ember-test/cluster/state")
            assert (await retained.get(timeout=10)).payload == b'{"phase": "running"}'
        finally:
            await late.close()
    finally:
        await a.close()
        await b.close()


def users(deny: str = "") -> str:
    """nats.conf authorization: user ``rx``, denied subscribing to ``deny`` if given."""
    permissions = f", permissions: {{ subscribe: {{ deny: [{deny!r}] }} }}" if deny else ""
    return f"authorization {{ users: [ {{ user: rx, password: rx{permissions} }} ] }}"


async def test_a_refused_subscription_is_retried_until_the_broker_grants_it(
    nats_factory: Callable[..., NatsCluster],
) -> None:
    """NATS answers SUBACK 0x80 when it cannot back a QoS 1 subscription with a JetStream
    consumer (for seconds after a node died) or when the user may not subscribe. The transport
    logs it and retries instead of taking it for a subscription: here the permission is
    granted by a configuration reload, and messages arrive on the same connection."""
    node = nats_factory(nodes=1, extra_config=users(deny="t.closed.>"))
    config = BrokerConfig(
        urls=node.urls, username="rx", password="rx", backoff_initial=0.1, backoff_max=0.5
    )
    async with Transport(config) as rx, Transport(config) as tx:
        await rx.wait_connected(20)
        await tx.wait_connected(20)
        with capture_logs() as logs:
            sub = await rx.subscribe("t/closed/#")
        assert [e["code"] for e in logs if e["event"] == "subscribe_refused"] == [0x80]
        node.reload(users())
        deadline = time.monotonic() + 20
        while True:
            await tx.publish("t/closed/x", b"through")
            with contextlib.suppress(asyncio.TimeoutError):
                if (await sub.get(timeout=0.3)).payload == b"through":
                    break
            assert time.monotonic() < deadline, "the subscription was never retried"
        assert rx.session == 1  # granted on the connection that was refused


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "killed",
    [
        pytest.param(1, id="an-agents-node"),
        pytest.param(
            0,
            id="the-coordinators-node",
            # Known open defect, seen in 1 of 4 runs: the coordinator, back from its dead node,
            # reads an agent's stale retained "offline" (the agent had already failed over and
            # said online), replaces that trainer, and never takes it back after it cancels
            # (its spooled updates stay on disk: none lost, but it stops contributing). Not
            # strict: it passes when the race does not happen.
            marks=pytest.mark.xfail(
                strict=False,
                reason="stale retained status after a NATS node death: a replaced trainer "
                "is not taken back",
            ),
        ),
    ],
)
async def test_a_job_completes_when_a_node_dies_and_no_update_is_lost(
    nats_cluster: NatsCluster, tmp_path: Path, killed: int
) -> None:
    """Six trainers spread over the three nodes (agent i on node i mod 3 first), the coordinator
    and its aggregator on node 0. Once the job has made a few versions one node is killed
    (SIGKILL): an agents' node, or the coordinator's own. Its clients fail over to the next
    node, the job reaches its target, and every update a trainer spooled is accounted for:
    acknowledged by the aggregator (its ledger says so), discarded because the job had ended,
    or still in the trainer's spool on disk when the job ended (sent again, were it to go on).
    """
    work = tmp_path / "work"
    options = DemoOptions(
        agents=6,
        cluster=nats_cluster.urls,
        out=tmp_path / "out",
        work_dir=work,
        target_accuracy=0.95,
        max_seconds=300,
        # A least time per update (a local run of the demo's model takes milliseconds, so a
        # slowdown factor alone ended the job in 20 s, before a dead node's clients are back:
        # NATS failover takes 10–45 s). At 0.8 s an update the job lasts about a minute, so
        # the trainers of the dead node must come back and contribute before it can end.
        min_update_seconds=0.8,
    )
    midway = asyncio.Event()

    def progress(seen: Progress) -> None:
        if seen.version >= 3:
            midway.set()

    demo = asyncio.create_task(Demo(options, progress).run())
    await asyncio.wait({demo, asyncio.create_task(midway.wait())}, return_when="FIRST_COMPLETED")
    assert not demo.done(), "the job ended before a node could be killed"
    killed_at = time.time()
    await asyncio.to_thread(nats_cluster.kill, killed)
    summary = await asyncio.wait_for(demo, 300)

    assert summary.phase == "completed", summary.reason
    # The aggregator's own record (its last checkpoint) says what the job reached. The
    # coordinator's may lag: when its own node died it was away ~40 s and missed the metric
    # events of the last versions, so it may learn of the end only from the aggregator's
    # retained roles document ("the aggregator finished").
    (checkpoints,) = work.glob("coordinator/embedded-agent/roles/*/aggregator/checkpoints")
    saved = Checkpoints(checkpoints).load_latest()
    assert saved is not None
    last = saved[1]["last_version"]
    assert last["accuracy"] >= 0.95
    assert "target_accuracy reached" in summary.reason or (
        killed == 0 and summary.reason == "the aggregator finished"
    )
    applied = int(last["updates_applied"])
    ledgers = sorted(work.glob("agent-*/state/**/updates.jsonl"))
    assert len(ledgers) == 6
    acked: set[str] = set()
    discarded: set[str] = set()
    pending: set[str] = set()
    moved_on = 0
    for ledger in ledgers:
        rows = read_ledger(ledger)
        spooled = {r["id"] for r in rows if r["event"] == "spooled"}
        mine_acked = {r["id"] for r in rows if r["event"] == "acked"}
        mine_discarded = {r["id"] for r in rows if r["event"] == "discarded"}
        mine_pending = {e.id for e in Spool(ledger.with_name("spool")).load()}
        assert all(r["reason"] == "the job ended" for r in rows if r["event"] == "discarded")
        assert spooled == mine_acked | mine_discarded | mine_pending, f"{ledger}: updates lost"
        acked |= mine_acked
        discarded |= mine_discarded
        pending |= mine_pending
        moved_on += any(r["event"] == "acked" and r["ts"] > killed_at for r in rows)
    # A receipt says the aggregator took its decision on the update: applied (at most once, it
    # keeps the applied ids), or refused as too stale. Nothing is applied that was not sent
    # once, and staleness refusals are rare: the updates applied by the last version are
    # nearly all the receipts.
    print(
        f"spooled {len(acked | discarded | pending)}, acked {len(acked)}, discarded at the end "
        f"{len(discarded)}, still spooled at the end {len(pending)}, "
        f"applied {applied}"
    )
    assert applied <= len(acked | discarded | pending)
    assert applied >= 0.9 * len(acked)
    # Every trainer, those of the dead node included, had updates acknowledged after the kill.
    assert moved_on == 6

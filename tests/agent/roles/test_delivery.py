"""A trainer's update delivery: spooled on disk, sent through a real mosquitto, sent again until
the receiver acknowledges it, across a broker that is away and a process that restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.protocol import Topics
from agent.protocol.bundle import RoleBundle
from agent.roles.base import RoleContext
from agent.roles.delivery import Delivery, read_ledger
from agent.spool import Spool
from agent.transport import BrokerConfig, Inbound, Subscription, Transport
from coordinator.mosquitto import MosquittoProcess

FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 3.0}


def context(transport: Transport, topics: Topics, state: Path) -> RoleContext:
    return RoleContext(
        agent_id="pi",
        bundle=RoleBundle(job="j", role="trainer"),
        transport=transport,
        topics=topics,
        state_dir=state,
        datasets={},
        run_cpu=asyncio.to_thread,
        report=lambda _event: asyncio.sleep(0),
    )


@pytest.fixture
async def receiver(mosquitto: MosquittoProcess, topics: Topics) -> AsyncIterator[Subscription]:
    """The aggregator's side: a subscription to every update topic of job ``j``."""
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST)) as transport:
        await transport.wait_connected(5)
        yield await transport.subscribe(topics.all_job_updates("j"))


async def next_payload(sub: Subscription, timeout: float = 15) -> bytes:
    message: Inbound = await sub.get(timeout)
    return bytes(message.payload)


async def test_an_update_is_resent_until_acknowledged_then_forgotten(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, receiver: Subscription
) -> None:
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST)) as transport:
        await transport.wait_connected(5)
        delivery = Delivery(
            context(transport, topics, tmp_path), Spool(tmp_path / "spool"), ack_timeout=0.3
        )
        assert await delivery.start() == (0, 0)
        topic = topics.job_updates("j", "pi")
        await delivery.put("u1", topic, b"delta-1", base_version=3)
        assert await next_payload(receiver) == b"delta-1"
        # No receipt: the same bytes come again, then again (the timeout doubles).
        assert await next_payload(receiver) == b"delta-1"
        assert delivery.resends >= 1
        delivery.acknowledged("u1")
        assert await delivery.wait(lambda: len(delivery.spool) == 0, 5)
        await delivery.put("u2", topic, b"delta-2", base_version=4)
        while (payload := await next_payload(receiver)) == b"delta-1":
            pass  # a resend of u1 may have been on its way
        assert payload == b"delta-2"
        delivery.acknowledged("u2")
        assert await delivery.wait(lambda: len(delivery.spool) == 0, 5)
        await delivery.close()
    events = [(row["event"], row["id"]) for row in read_ledger(tmp_path / "updates.jsonl")]
    assert events == [("spooled", "u1"), ("acked", "u1"), ("spooled", "u2"), ("acked", "u2")]
    assert not list((tmp_path / "spool").iterdir())


async def test_updates_spooled_while_the_broker_is_away_go_out_when_it_is_back(
    mosquitto_factory: Callable[..., MosquittoProcess], topics: Topics, tmp_path: Path
) -> None:
    broker = mosquitto_factory()
    broker.kill()
    async with Transport(BrokerConfig(urls=(broker.url,), **FAST)) as transport:
        delivery = Delivery(context(transport, topics, tmp_path), Spool(tmp_path / "spool"))
        await delivery.start()
        topic = topics.job_updates("j", "pi")
        for i in range(3):  # training goes on: each put returns once the update is on disk
            await asyncio.wait_for(delivery.put(f"u{i}", topic, b"d%d" % i, base_version=i), 5)
        assert len(delivery.spool) == 3
        broker.start()
        async with Transport(BrokerConfig(urls=(broker.url,), **FAST)) as listener:
            await listener.wait_connected(5)
            sub = await listener.subscribe(topics.all_job_updates("j"))
            got = []
            while len(got) < 3:
                payload = await next_payload(sub, 30)
                if not got or payload != got[-1]:  # a resend before the receipt is fine
                    got.append(payload)
                    delivery.acknowledged(f"u{len(got) - 1}")
            assert got == [b"d0", b"d1", b"d2"]  # oldest first, one at a time
        assert await delivery.wait(lambda: len(delivery.spool) == 0, 10)
        await delivery.close()


async def test_a_restarted_process_sends_what_its_spool_kept(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, receiver: Subscription
) -> None:
    topic = topics.job_updates("j", "pi")
    spool = Spool(tmp_path / "spool")
    spool.put("left-over", topic, b"from the last run")  # spooled, then the process died
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST)) as transport:
        await transport.wait_connected(5)
        delivery = Delivery(context(transport, topics, tmp_path), Spool(tmp_path / "spool"))
        assert await delivery.start() == (1, 1)
        assert await next_payload(receiver) == b"from the last run"
        delivery.acknowledged("left-over")
        assert await delivery.wait(lambda: len(delivery.spool) == 0, 5)
        await delivery.close()
    rows = read_ledger(tmp_path / "updates.jsonl")
    assert [(r["event"], r.get("recovered")) for r in rows] == [("spooled", True), ("acked", None)]


async def test_a_full_spool_pauses_the_trainer(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, receiver: Subscription
) -> None:
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST)) as transport:
        await transport.wait_connected(5)
        delivery = Delivery(
            context(transport, topics, tmp_path), Spool(tmp_path / "spool", max_entries=2)
        )
        await delivery.start()
        topic = topics.job_updates("j", "pi")
        await delivery.put("a", topic, b"a", base_version=0)
        await delivery.put("b", topic, b"b", base_version=0)
        third = asyncio.create_task(delivery.put("c", topic, b"c", base_version=0))
        await asyncio.sleep(0.3)
        assert not third.done()  # waiting for room
        assert await next_payload(receiver) == b"a"
        delivery.acknowledged("a")
        await asyncio.wait_for(third, 5)
        assert [e.id for e in delivery.spool.entries()] == ["b", "c"]
        await delivery.close()


async def test_an_update_the_transport_cannot_carry_is_recorded_and_skipped(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path, receiver: Subscription
) -> None:
    config = BrokerConfig(urls=(mosquitto.url,), max_message_bytes=4096, **FAST)
    async with Transport(config) as transport:
        await transport.wait_connected(5)
        delivery = Delivery(context(transport, topics, tmp_path), Spool(tmp_path / "spool"))
        await delivery.start()
        topic = topics.job_updates("j", "pi")
        await delivery.put("huge", topic, b"x" * 10_000, base_version=0)
        await delivery.put("small", topic, b"ok", base_version=0)
        assert await next_payload(receiver) == b"ok"
        delivery.acknowledged("small")
        assert await delivery.wait(lambda: len(delivery.spool) == 0, 5)
        await delivery.close()
    rows = read_ledger(tmp_path / "updates.jsonl")
    assert [(r["event"], r["id"]) for r in rows if r["event"] != "spooled"] == [
        ("undeliverable", "huge"),
        ("acked", "small"),
    ]
    [undeliverable] = [r for r in rows if r["event"] == "undeliverable"]
    assert "above the limit of 4096" in undeliverable["reason"]


async def test_an_update_in_parts_goes_out_whole_and_is_acknowledged_once(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    # A sharded aggregator's trainer: one part per shard, each on its shard's topic.
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST)) as transport:
        await transport.wait_connected(5)
        shards = [await transport.subscribe(topics.all_shard_updates("j", s)) for s in (0, 1)]
        delivery = Delivery(
            context(transport, topics, tmp_path), Spool(tmp_path / "spool"), ack_timeout=0.3
        )
        await delivery.start()
        parts = [(topics.shard_updates("j", s, "pi"), f"part-{s}".encode()) for s in (0, 1)]
        await delivery.put_parts("u1", parts, base_version=2)
        assert [await next_payload(sub) for sub in shards] == [b"part-0", b"part-1"]
        assert not delivery.is_acked("u1")
        # Unacknowledged, both parts are sent again.
        assert [await next_payload(sub) for sub in shards] == [b"part-0", b"part-1"]
        delivery.acknowledged("u1")
        assert await delivery.wait(lambda: len(delivery.spool) == 0, 5)
        assert delivery.is_acked("u1")
        await delivery.close()
    events = [(row["event"], row["id"]) for row in read_ledger(tmp_path / "updates.jsonl")]
    assert events == [("spooled", "u1"), ("acked", "u1")]


async def test_a_restart_drops_an_update_whose_parts_were_not_all_spooled(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    for s in (0, 1):
        spool.put(f"whole--{s}-2", topics.shard_updates("j", s, "pi"), f"whole-{s}".encode())
    spool.put("torn--0-2", topics.shard_updates("j", 0, "pi"), b"torn-0")  # then the crash
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST)) as transport:
        await transport.wait_connected(5)
        shards = [await transport.subscribe(topics.all_shard_updates("j", s)) for s in (0, 1)]
        delivery = Delivery(context(transport, topics, tmp_path), Spool(tmp_path / "spool"))
        assert await delivery.start() == (1, 1)
        assert [await next_payload(sub) for sub in shards] == [b"whole-0", b"whole-1"]
        delivery.acknowledged("whole")
        assert await delivery.wait(lambda: len(delivery.spool) == 0, 5)
        await delivery.close()
    rows = read_ledger(tmp_path / "updates.jsonl")
    assert [(r["event"], r["id"]) for r in rows] == [
        ("discarded", "torn"),
        ("spooled", "whole"),
        ("acked", "whole"),
    ]

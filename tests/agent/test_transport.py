"""The MQTT adapter against real brokers: mosquitto (MQTT 5) and the embedded amqtt (3.1.1)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import numpy as np
import pytest
from structlog.testing import capture_logs

from agent.protocol import ModelUpdate, PayloadTooLarge, Topics, decode_message, split
from agent.protocol.chunking import (
    DEFAULT_CHUNK_SIZE,
    MQTT5_CHUNK_SIZE,
    build_frame,
    chunk_count,
)
from agent.transport import (
    BrokerConfig,
    BrokerEndpoint,
    Inbound,
    NotConnectedError,
    Transport,
    WillMessage,
)
from coordinator.mosquitto import MosquittoProcess, free_port
from tests.agent.conftest import eventually

FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 3.0}


def config(*urls: str, **options: Any) -> BrokerConfig:
    return BrokerConfig(urls=urls, **{**FAST, **options})


@pytest.fixture
async def pair(mosquitto: MosquittoProcess) -> AsyncIterator[tuple[Transport, Transport]]:
    async with Transport(config(mosquitto.url)) as a, Transport(config(mosquitto.url)) as b:
        await a.wait_connected(5)
        await b.wait_connected(5)
        yield a, b


async def collect(client: aiomqtt.Client, seconds: float) -> list[Any]:
    """Every payload a raw client receives within ``seconds``."""
    received: list[Any] = []

    async def drain() -> None:
        async for message in client.messages:
            received.append(message.payload)

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), seconds)
    return received


def model(parameters: int) -> ModelUpdate:
    rng = np.random.default_rng(0)
    return ModelUpdate(
        job="j",
        agent="a",
        base_version=1,
        num_samples=10,
        tensors={"w": rng.standard_normal(parameters).astype(np.float32)},
    )


async def test_round_trip_over_mqtt5(pair: tuple[Transport, Transport], topics: Topics) -> None:
    publisher, subscriber = pair
    sub = await subscriber.subscribe(topics.all_job_updates("j"))
    sent = model(1000)
    await publisher.publish(topics.job_updates("j", "a"), sent.to_msgpack())
    got = await sub.get(timeout=5)
    assert got.topic == topics.job_updates("j", "a")
    update = decode_message(got.payload, expect=ModelUpdate)
    assert update.id == sent.id
    np.testing.assert_array_equal(update.tensors["w"], sent.tensors["w"])
    assert publisher.protocol_in_use == "5"
    assert publisher.stats.frames_out == 1


async def test_nagle_is_off_on_the_broker_socket(pair: tuple[Transport, Transport]) -> None:
    # With Nagle's algorithm a small publish waits for the ACK of the previous segment, which
    # the broker delays up to 40 ms: every FedBuff receipt and model version paid that.
    a, _ = pair
    assert a._client is not None
    sock = a._client._client.socket()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_large_message_fits_a_small_broker_limit_by_chunking(
    mosquitto_factory: Callable[..., MosquittoProcess], topics: Topics
) -> None:
    """mosquitto advertises max_packet_size in its MQTT 5 CONNACK; the chunk size follows it."""
    broker = mosquitto_factory(max_packet_size=64 * 1024)
    async with Transport(config(broker.url)) as pub, Transport(config(broker.url)) as sub_side:
        await pub.wait_connected(5)
        await sub_side.wait_connected(5)
        sub = await sub_side.subscribe(topics.job_model("j"))
        sent = model(750_000)  # 3 MB
        payload = sent.to_msgpack()
        await pub.publish(topics.job_model("j"), payload, timeout=30)
        got = await sub.get(timeout=30)
        assert bytes(got.payload) == payload
        assert pub.chunk_size(topics.job_model("j")) < 64 * 1024
        assert pub.stats.frames_out > len(payload) // (64 * 1024)
        assert pub.stats.resent_after_reconnect == 0


async def test_without_chunking_the_same_message_is_refused_by_the_broker(
    mosquitto_factory: Callable[..., MosquittoProcess], topics: Topics
) -> None:
    """The limit is real: one raw 3 MB publish gets the client disconnected, nothing arrives."""
    broker = mosquitto_factory(max_packet_size=64 * 1024)
    payload = model(750_000).to_msgpack()
    async with aiomqtt.Client(broker.host, broker.port) as watcher:
        await watcher.subscribe(topics.job_model("j"), 1)
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, timeout=3) as raw:
                await raw.publish(topics.job_model("j"), payload, qos=1)
        received = await collect(watcher, seconds=1.0)
    assert received == []


async def test_default_frames_fit_a_one_megabyte_limit_nobody_announces(
    mosquitto_factory: Callable[..., MosquittoProcess], topics: Topics
) -> None:
    """EMQX and NATS cap packets at 1 MB, and over MQTT 3.1.1 no broker can say so: the default
    chunk size, with each frame's header, topic and MQTT framing, stays under 1,000,000 bytes
    (mosquitto disconnects a client whose packet is larger)."""
    broker = mosquitto_factory(max_packet_size=1_000_000)
    opts = {"protocol": "3.1.1"}
    async with (
        Transport(config(broker.url, **opts)) as pub,
        Transport(config(broker.url, **opts)) as rx,
    ):
        await pub.wait_connected(5)
        await rx.wait_connected(5)
        sub = await rx.subscribe(topics.all_job_updates("j"))
        payload = model(1_000_000).to_msgpack()  # the 1M update of bench/aggregate
        topic = topics.job_updates("j", "a-trainer-with-a-long-agent-id-" + "x" * 64)
        await pub.publish(topic, payload, timeout=30)
        got = await sub.get(timeout=30)
        assert bytes(got.payload) == payload
        assert pub.chunk_size(topic) == DEFAULT_CHUNK_SIZE
        assert pub.stats.frames_out == chunk_count(len(payload), DEFAULT_CHUNK_SIZE) == 5
        assert pub.stats.resent_after_reconnect == 0


async def test_over_mqtt5_frames_are_as_large_as_the_broker_says_it_takes(
    mosquitto_factory: Callable[..., MosquittoProcess], topics: Topics
) -> None:
    """An MQTT 5 broker states its packet limit in its CONNACK, or that it has none by leaving
    it out: the 1M update of bench/aggregate is then one frame (up to MQTT5_CHUNK_SIZE), or as
    few as a 2 MB limit allows (mosquitto 2.1's default); ``chunk_size`` set is kept to. A
    message above DEFAULT_CHUNK_SIZE is a chunk frame even when it fits one."""
    payload = model(1_000_000).to_msgpack()
    topic = topics.job_updates("j", "a")
    for limit, chunk_size, frames in (
        (None, None, 1),
        (2_000_000, None, 3),
        (None, 512 * 1024, chunk_count(len(payload), 512 * 1024)),
    ):
        broker = mosquitto_factory(max_packet_size=limit)
        async with (
            Transport(config(broker.url, chunk_size=chunk_size)) as pub,
            Transport(config(broker.url)) as rx,
        ):
            await pub.wait_connected(5)
            await rx.wait_connected(5)
            assert pub.protocol_in_use == "5"
            sub = await rx.subscribe(topics.all_job_updates("j"))
            await pub.publish(topic, payload, timeout=30)
            got = await sub.get(timeout=30)
            assert bytes(got.payload) == payload
            assert pub.stats.frames_out == frames, (limit, chunk_size)
            if limit is None and chunk_size is None:
                assert pub.chunk_size(topic) == MQTT5_CHUNK_SIZE
                # Still a chunk frame, not a whole message: received in place, not copied.
                assert rx._reassembler.stats.placed == 1
        broker.stop()


async def test_mqtt311_with_explicit_chunk_size(
    mosquitto_factory: Callable[..., MosquittoProcess], topics: Topics
) -> None:
    broker = mosquitto_factory(max_packet_size=64 * 1024)
    opts = {"protocol": "3.1.1", "chunk_size": 32 * 1024}
    async with (
        Transport(config(broker.url, **opts)) as pub,
        Transport(config(broker.url, **opts)) as rx,
    ):
        await pub.wait_connected(5)
        await rx.wait_connected(5)
        assert pub.protocol_in_use == "3.1.1"
        sub = await rx.subscribe(topics.job_model("j"))
        payload = model(200_000).to_msgpack()
        await pub.publish(topics.job_model("j"), payload, timeout=30)
        assert bytes((await sub.get(timeout=30)).payload) == payload


async def test_subscriptions_survive_a_broker_restart(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    sessions: list[int] = []
    async with Transport(config(mosquitto.url)) as rx, Transport(config(mosquitto.url)) as tx:

        async def hook(session: int) -> None:
            sessions.append(session)

        rx.on_connect(hook)
        await rx.wait_connected(5)
        await tx.wait_connected(5)
        sub = await rx.subscribe(topics.all_agents("status"))
        mosquitto.restart()
        await eventually(lambda: rx.session == 2 and rx.connected and tx.connected)
        await tx.publish(topics.agent_status("pi"), b'{"state":"online"}')
        got = await sub.get(timeout=5)
        assert got.payload == b'{"state":"online"}'
        assert sessions == [1, 2]
        assert rx.stats.connections == 2


async def test_messages_that_came_while_the_hooks_ran_are_routed_first_and_in_order(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    """Until its connect hooks have run, a transport leaves what arrives in aiomqtt's queue;
    then it routes that, and from then on paho hands it every message directly. Nothing is
    lost or reordered across the switch, whole or chunked."""
    topic = topics.agent_status("pi")
    hold = asyncio.Event()
    rx = Transport(config(mosquitto.url))

    async def slow_hook(_session: int) -> None:
        await hold.wait()

    rx.on_connect(slow_hook)
    sub = await rx.subscribe(topic, max_messages=1000)
    big = bytes(range(256)) * 400  # chunked at the chunk size below
    sent = [b"early %d" % i for i in range(30)] + [big] + [b"late %d" % i for i in range(30)]
    async with rx, Transport(config(mosquitto.url, chunk_size=40_000)) as tx:
        await tx.wait_connected(5)
        await eventually(lambda: rx._client is not None)
        for payload in sent[:31]:
            await tx.publish(topic, payload)
        assert rx._client is not None
        frames = 30 + chunk_count(len(big), 40_000)
        await eventually(lambda: len(rx._client.messages) == frames)  # type: ignore[union-attr]
        assert len(sub) == 0  # not routed while the hooks run
        hold.set()
        await eventually(lambda: getattr(rx._client._client, "deliver", None) is not None)  # type: ignore[union-attr]
        for payload in sent[31:]:
            await tx.publish(topic, payload)
        got = [bytes((await sub.get(timeout=5)).payload) for _ in sent]
    assert got == sent
    assert len(sub) == 0


async def test_a_connection_paho_lost_without_telling_aiomqtt_is_reconnected(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    """Fault injection: paho's socket closed under it (as a NATS node's reset did, measured in
    tests/coordinator/test_clustered_broker.py) leaves aiomqtt's message loop waiting while
    every publish fails. The first publish that fails tells the connection loop, which
    reconnects, and the message goes out."""
    async with Transport(config(mosquitto.url)) as rx, Transport(config(mosquitto.url)) as tx:
        await rx.wait_connected(5)
        await tx.wait_connected(5)
        sub = await rx.subscribe(topics.all_agents("status"))
        assert tx._client is not None
        tx._client._client._sock_close()  # paho forgets its socket; nobody is told
        with capture_logs() as logs:
            await asyncio.wait_for(tx.publish(topics.agent_status("pi"), b"after"), 20)
        assert any(e["event"] == "mqtt_connection_stalled" for e in logs)
        assert (await sub.get(timeout=5)).payload == b"after"
        assert tx.session == 2


async def test_publish_during_an_outage_is_delivered_after_reconnect(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    async with Transport(config(mosquitto.url)) as tx:
        await tx.wait_connected(5)
        mosquitto.stop()
        await eventually(lambda: not tx.connected)
        pending = asyncio.ensure_future(
            tx.publish(topics.job_updates("j", "a"), model(300_000).to_msgpack())
        )
        await asyncio.sleep(0.3)
        assert not pending.done()  # waiting for the broker, not failing
        mosquitto.start()
        async with Transport(config(mosquitto.url)) as rx:
            sub = await rx.subscribe(topics.all_job_updates("j"))
            await rx.wait_connected(5)
            # The publish may have gone out before rx subscribed; a second one is certainly seen.
            await asyncio.wait_for(pending, 10)
            await tx.publish(topics.job_updates("j", "a"), b"{}")
            got = await sub.get(timeout=5)
            assert got.topic == topics.job_updates("j", "a")


WILL_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from agent.logs import configure_logging
    from agent.transport import BrokerConfig, Transport, WillMessage

    async def main() -> None:
        configure_logging("warning")
        will = WillMessage(sys.argv[2], b'{"state":"offline"}', retain=True)
        async with Transport(BrokerConfig(urls=(sys.argv[1],), keepalive=2), will=will) as t:
            await t.wait_connected(10)
            await t.publish(sys.argv[2], b'{"state":"online"}', retain=True)
            print("up", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_will_marks_a_killed_process_offline(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    status = topics.agent_status("victim")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WILL_SCRIPT, mosquitto.url, status, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 20) == b"up\n"
        async with Transport(config(mosquitto.url)) as watcher:
            sub = await watcher.subscribe(status)
            assert (await sub.get(timeout=5)).payload == b'{"state":"online"}'
            child.kill()
            got = await sub.get(timeout=3)  # 1.5 × keepalive
            assert got.payload == b'{"state":"offline"}'
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


async def test_clean_close_sends_final_messages_and_no_will(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    status = topics.agent_status("polite")
    will = WillMessage(status, b"will", retain=True)
    async with Transport(config(mosquitto.url)) as watcher:
        sub = await watcher.subscribe(status)
        await watcher.wait_connected(5)
        leaving = Transport(config(mosquitto.url), will=will)
        leaving.start()
        await leaving.wait_connected(5)
        await leaving.close(final=[(status, b"bye", True)])
        assert (await sub.get(timeout=5)).payload == b"bye"
        with pytest.raises(asyncio.TimeoutError):
            await sub.get(timeout=0.5)


async def test_fails_over_to_the_next_broker(mosquitto: MosquittoProcess) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    async with Transport(config(dead, mosquitto.url)) as t:
        await t.wait_connected(10)
        assert t.endpoint_in_use == BrokerEndpoint.parse(mosquitto.url)
        assert t.stats.connection_failures >= 1


async def test_frames_cut_for_one_broker_are_cut_again_for_the_next(
    mosquitto_factory: Callable[..., MosquittoProcess], topics: Topics
) -> None:
    """A message cut into 4 MiB frames for an MQTT 5 broker that states no limit, then sent
    after failing over to one that takes 1 MB: cut again to fit it, and delivered whole (sent
    as it was, each attempt would cost the connection until the publish gave up)."""
    roomy = mosquitto_factory()
    strict = mosquitto_factory(max_packet_size=1_000_000)
    topic = topics.job_updates("j", "a")
    payload = model(1_000_000).to_msgpack()
    async with Transport(config(strict.url)) as rx:
        await rx.wait_connected(5)
        sub = await rx.subscribe(topics.all_job_updates("j"))
        async with Transport(config(roomy.url, strict.url)) as pub:
            await pub.wait_connected(5)
            assert pub.chunk_size(topic) == MQTT5_CHUNK_SIZE
            roomy.stop()
            await eventually(lambda: not pub.connected)
            with capture_logs() as logs:
                await pub.publish(topic, payload, timeout=30)
            got = await sub.get(timeout=30)
            assert bytes(got.payload) == payload
            assert pub.endpoint_in_use == BrokerEndpoint.parse(strict.url)
            assert [e["frames"] for e in logs if e["event"] == "publish_recut"] == [5]


@pytest.mark.parametrize(
    "identity",
    [{}, {"client_id": "ember-agent-pi", "will": True}],
    ids=["anonymous", "client-id-and-will"],
)
async def test_falls_back_to_mqtt311_on_the_embedded_broker(
    topics: Topics, identity: dict[str, Any], amqtt_url: str
) -> None:
    """amqtt refuses a plain MQTT 5 CONNECT, and never answers one with a Will and a client
    id: both must end on 3.1.1."""
    url = amqtt_url
    will = WillMessage(topics.agent_status("pi"), b"{}") if identity.get("will") else None
    tx = Transport(config(url, client_id=identity.get("client_id"), connect_timeout=2.0), will=will)
    async with tx, Transport(config(url)) as rx:
        await tx.wait_connected(10)
        await rx.wait_connected(10)
        assert tx.protocol_in_use == "3.1.1"
        sub = await rx.subscribe(topics.job_model("j"))
        payload = model(400_000).to_msgpack()  # 1.6 MB: four chunks
        await tx.publish(topics.job_model("j"), payload, timeout=30)
        assert bytes((await sub.get(timeout=30)).payload) == payload


async def test_a_full_queue_drops_are_counted_and_logged(
    pair: tuple[Transport, Transport], topics: Topics
) -> None:
    publisher, subscriber = pair
    sub = await subscriber.subscribe(topics.job_metrics("j", "a"), max_messages=3)
    with capture_logs() as logs:
        for i in range(10):
            await publisher.publish(topics.job_metrics("j", "a"), f'{{"i":{i}}}')
        await eventually(lambda: subscriber.stats.messages_in == 10)
    assert len(sub) == 3
    assert sub.dropped == 7
    assert subscriber.stats.dropped_full_queue == 7
    drops = [e for e in logs if e["event"] == "subscription_queue_full"]
    assert len(drops) == 7
    assert drops[-1]["dropped_total"] == 7
    assert [m.payload for m in [sub.get_nowait(), sub.get_nowait(), sub.get_nowait()] if m] == [
        b'{"i":0}',
        b'{"i":1}',
        b'{"i":2}',
    ]


async def test_queue_bound_by_bytes(pair: tuple[Transport, Transport], topics: Topics) -> None:
    publisher, subscriber = pair
    sub = await subscriber.subscribe(topics.job_metrics("j", "a"), max_bytes=2500)
    for _ in range(4):
        await publisher.publish(topics.job_metrics("j", "a"), b"x" * 1000)
    await eventually(lambda: subscriber.stats.messages_in == 4)
    assert (len(sub), sub.dropped) == (2, 2)


async def test_get_waits_times_out_and_a_cancelled_get_leaves_the_message(
    pair: tuple[Transport, Transport], topics: Topics
) -> None:
    publisher, subscriber = pair
    topic = topics.job_metrics("j", "a")
    sub = await subscriber.subscribe(topic)
    with pytest.raises(asyncio.TimeoutError):
        await sub.get(0.05)
    reader = asyncio.create_task(sub.get(10))
    await asyncio.sleep(0.01)
    await publisher.publish(topic, b"first")
    assert (await reader).payload == b"first"
    # Told to stop just as a message comes: the reader stops (Python 3.10/3.11's wait_for
    # would return the message instead, gh-86296) and the message stays queued.
    reader = asyncio.create_task(sub.get(10))
    await asyncio.sleep(0.01)
    sub.offer(Inbound(topic, b"second", False, 1))
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert len(sub) == 1
    assert (await sub.get(0)).payload == b"second"


async def test_corrupt_chunks_are_rejected_and_good_ones_still_arrive(
    pair: tuple[Transport, Transport], mosquitto: MosquittoProcess, topics: Topics
) -> None:
    _, subscriber = pair
    sub = await subscriber.subscribe(topics.job_model("j"))
    payload = bytes(range(256)) * 400
    frames = split(payload, 10_000)
    bad = bytearray(frames[1])
    bad[-1] ^= 0x55
    with capture_logs() as logs:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as raw:
            await raw.publish(topics.job_model("j"), bytes(bad), qos=1)
            await raw.publish(topics.job_model("j"), frames[1][:50], qos=1)
            for frame in frames:
                await raw.publish(topics.job_model("j"), frame, qos=1)
        got = await sub.get(timeout=5)
    assert bytes(got.payload) == payload
    assert subscriber.stats.chunks_rejected == 2
    reasons = [e["reason"] for e in logs if e["event"] == "chunk_rejected"]
    assert any("check mismatch" in r for r in reasons)
    assert any("shorter than its 76-byte header" in r for r in reasons)


async def test_a_chunk_claiming_a_huge_message_does_not_end_the_connection(
    pair: tuple[Transport, Transport], mosquitto: MosquittoProcess, topics: Topics
) -> None:
    """Regression (hostile-input fuzzing): a 76-byte frame declaring a message above
    max_message_bytes raised PayloadTooLarge out of the receive loop, which ended the
    transport's connection task for good: the agent went deaf."""
    _, subscriber = pair
    sub = await subscriber.subscribe(topics.job_model("j"))
    total = subscriber.config.max_message_bytes + 1
    forged = build_frame(
        b"\x07" * 16, 0, chunk_count(total, 1024), total, 1024, bytes(32), bytes(1024)
    )
    with capture_logs() as logs:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as raw:
            await raw.publish(topics.job_model("j"), forged, qos=1)
            await raw.publish(topics.job_model("j"), b"still listening", qos=1)
        got = await sub.get(timeout=5)
    assert bytes(got.payload) == b"still listening"
    assert subscriber.connected
    assert subscriber.stats.chunks_rejected == 1
    [rejected] = [e for e in logs if e["event"] == "chunk_rejected"]
    assert "is above the limit of" in rejected["reason"]


async def test_qos0_while_offline_is_dropped_and_counted() -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    async with Transport(config(dead)) as t:
        await t.publish("ember/v1/agents/x/telemetry", b"{}", qos=0)
        assert t.stats.dropped_qos0_offline == 1


async def test_no_broker_gives_a_clear_error_in_time() -> None:
    port = free_port()
    async with Transport(config(f"mqtt://127.0.0.1:{port}")) as t:
        with pytest.raises(
            NotConnectedError,
            match=f"no broker reachable within 0.3 s \\(tried mqtt://127.0.0.1:{port}\\)",
        ):
            await t.wait_connected(0.3)
        with pytest.raises(NotConnectedError, match=r"no broker connection within 0\.2 s"):
            await t.publish("ember/v1/x", b"{}", timeout=0.2)


async def test_size_checks_happen_before_sending(pair: tuple[Transport, Transport]) -> None:
    publisher, _ = pair
    small = Transport(config("mqtt://127.0.0.1:1", max_message_bytes=1000))
    with pytest.raises(PayloadTooLarge, match="1001 bytes"):
        await small.publish("ember/v1/x", b"x" * 1001)
    with pytest.raises(ValueError, match="retained message must fit one chunk"):
        await publisher.publish("ember/v1/x", b"x" * (DEFAULT_CHUNK_SIZE + 1), retain=True)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local", BrokerEndpoint("broker.local", 1883, tls=False)),
        ("mqtts://broker.local", BrokerEndpoint("broker.local", 8883, tls=True)),
        ("10.0.0.2:1884", BrokerEndpoint("10.0.0.2", 1884, tls=False)),
        (
            "mqtt://pi%40x:s%3Acret@h:1",
            BrokerEndpoint("h", 1, tls=False, username="pi@x", password="s:cret"),
        ),
    ],
)
def test_broker_urls(url: str, expected: BrokerEndpoint) -> None:
    assert BrokerEndpoint.parse(url) == expected


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"urls": ("http://x",)}, "scheme must be mqtt:// or mqtts://"),
        ({"urls": ()}, "at least one url"),
        ({"chunk_size": 10}, "chunk_size: must be ≥ 1024, got 10"),
        ({"session_expiry": 60}, "needs a client_id"),
        ({"urls": ("mqtt://h:99999",)}, "bad port"),
    ],
)
def test_bad_broker_config_is_refused(options: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        BrokerConfig(**options)


def test_room_for_incomplete_messages_grows_to_at_most_half_the_memory() -> None:
    import psutil

    transport = Transport(BrokerConfig(urls=("mqtt://127.0.0.1:1",), reassembly_bytes=1 << 30))
    half = psutil.virtual_memory().total // 2
    assert transport.make_room(1 << 20) == 1 << 30  # never lowered
    assert transport.make_room(min(half, 3 << 30)) == min(half, 3 << 30)
    assert transport.make_room(1 << 50) == half


def test_the_room_made_for_incomplete_messages_is_ordinary_memory() -> None:
    """An aggregator makes room for one update from each trainer: those many messages in
    flight are reassembled in ordinary memory, not memory maps (a page fault per page and no
    receiving in place), however many of them arrive interleaved."""
    from agent.protocol.chunking import split

    trainers, size = 64, 3 << 20
    transport = Transport(BrokerConfig(urls=("mqtt://127.0.0.1:1",)))
    reassembler = transport._reassembler
    assert reassembler.eager_bytes < trainers * size  # the default would map some of them
    transport.make_room(trainers * size)
    first = split(bytes(size), 1 << 20)[0]
    for trainer in range(trainers):
        assert reassembler.add(f"jobs/j/updates/t{trainer}", first) is None
    assert reassembler._eager_pending == trainers * size
    assert all(partial.eager for partial in reassembler._partial.values())

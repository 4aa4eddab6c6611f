"""Request/response between the CLI and the coordinator over real brokers (MQTT 5 and 3.1.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from agent.protocol import RpcRequest, RpcResponse, Topics, decode_message
from agent.transport import BrokerConfig, Transport
from coordinator.mosquitto import MosquittoProcess
from coordinator.rpc import CoordinatorNotRunning, RpcClient, RpcError, RpcServer
from tests.coordinator.conftest import eventually

FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 3.0}


def config(url: str, **options: Any) -> BrokerConfig:
    return BrokerConfig(urls=(url,), **{**FAST, **options})


class Calls:
    def __init__(self) -> None:
        self.count = 0


def server_with_methods(transport: Transport, topics: Topics, calls: Calls) -> RpcServer:
    server = RpcServer(transport, topics)

    async def echo(params: Mapping[str, Any], request: RpcRequest) -> Any:
        calls.count += 1
        return {"echo": dict(params), "blob": b"\x00\x01" * 4}

    async def boom(params: Mapping[str, Any], request: RpcRequest) -> Any:
        raise RpcError("no job 'x'\nsecond line")

    async def crash(params: Mapping[str, Any], request: RpcRequest) -> Any:
        raise RuntimeError("bug")

    async def slow(params: Mapping[str, Any], request: RpcRequest) -> Any:
        await asyncio.sleep(0.3)
        return "slow"

    server.register("echo", echo)
    server.register("boom", boom)
    server.register("crash", crash)
    server.register("slow", slow)
    return server


@pytest.fixture
async def transports(mosquitto: MosquittoProcess) -> AsyncIterator[tuple[Transport, Transport]]:
    async with Transport(config(mosquitto.url)) as a, Transport(config(mosquitto.url)) as b:
        await a.wait_connected(5)
        await b.wait_connected(5)
        yield a, b


async def test_request_and_answer(transports: tuple[Transport, Transport], topics: Topics) -> None:
    server_side, client_side = transports
    calls = Calls()
    server = server_with_methods(server_side, topics, calls)
    await server.start()
    try:
        async with RpcClient(client_side, topics) as client:
            result = await client.call("echo", {"a": [1, 2], "b": b"bytes"})
            assert result == {"echo": {"a": [1, 2], "b": b"bytes"}, "blob": b"\x00\x01" * 4}
            with pytest.raises(RpcError, match=r"^no job 'x' second line$"):
                await client.call("boom")
            with pytest.raises(RpcError, match=r"^internal error in crash: bug$"):
                await client.call("crash")
            with pytest.raises(RpcError, match=r"^unknown method 'nope'$"):
                await client.call("nope")
            # Concurrent calls are answered independently and matched by correlation id.
            got = await asyncio.gather(client.call("slow"), client.call("echo", {"n": 1}))
            assert got[0] == "slow"
            assert got[1]["echo"] == {"n": 1}
    finally:
        await server.stop()


async def test_not_running_is_a_clear_error(
    transports: tuple[Transport, Transport], topics: Topics, mosquitto: MosquittoProcess
) -> None:
    _, client_side = transports
    loop = asyncio.get_running_loop()
    async with RpcClient(client_side, topics, broker=mosquitto.url) as client:
        started = loop.time()
        with pytest.raises(CoordinatorNotRunning) as caught:
            await client.call("ping", timeout=0.5)
    assert str(caught.value) == (
        f"no answer from the coordinator on {mosquitto.url} within 0.5 s "
        "— is 'ember serve' running?"
    )
    assert loop.time() - started < 2


async def test_a_redelivered_request_runs_once(
    transports: tuple[Transport, Transport], topics: Topics
) -> None:
    server_side, client_side = transports
    calls = Calls()
    server = server_with_methods(server_side, topics, calls)
    await server.start()
    try:
        replies = await client_side.subscribe(topics.rpc_replies("me"))
        request = RpcRequest(method="echo", reply_to=topics.rpc_replies("me"), params={"x": 1})
        for _ in range(3):  # what a QoS 1 redelivery looks like
            await client_side.publish(topics.rpc_requests(), request.to_msgpack())
        answers = [
            decode_message((await replies.get(5)).payload, expect=RpcResponse) for _ in range(3)
        ]
        assert {a.correlation_id for a in answers} == {request.id}
        assert all(a.ok and a.result["echo"] == {"x": 1} for a in answers)
        assert calls.count == 1
    finally:
        await server.stop()


async def test_answers_go_only_to_reply_topics(
    transports: tuple[Transport, Transport], topics: Topics
) -> None:
    server_side, client_side = transports
    calls = Calls()
    server = server_with_methods(server_side, topics, calls)
    await server.start()
    try:
        inbox = await client_side.subscribe(topics.agent_inbox("victim"))
        replies = await client_side.subscribe(topics.rpc_replies("ok"))
        bad = RpcRequest(method="echo", reply_to=topics.agent_inbox("victim"))
        await client_side.publish(topics.rpc_requests(), bad.to_msgpack())
        await client_side.publish(topics.rpc_requests(), b"not a request")
        good = RpcRequest(method="echo", reply_to=topics.rpc_replies("ok"))
        await client_side.publish(topics.rpc_requests(), good.to_msgpack())
        await replies.get(5)  # requests are handled in order of arrival
        assert calls.count == 1
        assert inbox.get_nowait() is None
    finally:
        await server.stop()


async def test_works_on_an_mqtt311_only_broker(topics: Topics, amqtt_url: str) -> None:
    url = amqtt_url
    async with Transport(config(url)) as server_side, Transport(config(url)) as client_side:
        await server_side.wait_connected(10)
        await client_side.wait_connected(10)
        assert server_side.protocol_in_use == client_side.protocol_in_use == "3.1.1"
        calls = Calls()
        server = server_with_methods(server_side, topics, calls)
        await server.start()
        try:
            async with RpcClient(client_side, topics) as client:
                big = b"x" * 1_500_000  # chunked both ways
                result = await client.call("echo", {"big": big}, timeout=30)
                assert result["echo"]["big"] == big
        finally:
            await server.stop()


async def test_a_flood_of_requests_is_bounded_and_a_replayed_id_gets_only_its_own_answer(
    transports: tuple[Transport, Transport], topics: Topics
) -> None:
    """Whoever may publish on the requests topic cannot make the server run without bound:
    beyond the concurrency and rate bounds requests are refused (logged, counted); and a
    request id replayed with another reply topic is answered there afresh, never with the
    first client's cached answer."""
    server_side, client_side = transports
    calls = Calls()
    server = server_with_methods(server_side, topics, calls)
    await server.start()
    try:
        flood = [
            RpcRequest(method="echo", reply_to=topics.rpc_replies("flood")).to_msgpack()
            for _ in range(600)
        ]
        for payload in flood:
            await client_side.publish(topics.rpc_requests(), payload, qos=0)
        await eventually(lambda: server.refused + calls.count >= 600, what="flood handled")
        assert server.refused > 0
        assert calls.count < 600
        # Replaying another client's request id from a new reply topic runs it for the new
        # client (the cache is per reply topic), and the server still answers after the flood.
        replies = await client_side.subscribe(topics.rpc_replies("thief"))
        await asyncio.sleep(1.0)  # the token bucket refills
        before = calls.count
        first = RpcRequest(method="echo", reply_to=topics.rpc_replies("owner"), params={"s": 1})
        await client_side.publish(topics.rpc_requests(), first.to_msgpack())
        await eventually(lambda: calls.count == before + 1)
        thief = RpcRequest(id=first.id, method="echo", reply_to=topics.rpc_replies("thief"))
        await client_side.publish(topics.rpc_requests(), thief.to_msgpack())
        answer = decode_message((await replies.get(10)).payload, expect=RpcResponse)
        assert answer.result["echo"] == {}  # its own params, not the owner's
        assert calls.count == before + 2
    finally:
        await server.stop()

"""The demo's in-process broker carries retained status and chunked models over MQTT 3.1.1."""

from __future__ import annotations

import numpy as np

from agent.protocol import ModelVersion, Topics, decode_message
from agent.transport import BrokerConfig, Transport
from coordinator.embedded_broker import EmbeddedBroker


async def test_embedded_broker_carries_retained_and_chunked_messages(topics: Topics) -> None:
    async with EmbeddedBroker() as broker:
        cfg = BrokerConfig(urls=(broker.url,), backoff_initial=0.05)
        async with Transport(cfg) as tx:
            await tx.wait_connected(10)
            assert tx.protocol_in_use == "3.1.1"
            await tx.publish(topics.agent_status("pi"), b'{"state":"online"}', retain=True)
            model = ModelVersion(job="j", version=1, tensors={"w": np.ones(300_000, np.float32)})
            async with Transport(cfg) as rx:
                status = await rx.subscribe(topics.agent_status("pi"))
                models = await rx.subscribe(topics.job_model("j"))
                await rx.wait_connected(10)
                got = await status.get(timeout=5)
                assert (got.payload, got.retain) == (b'{"state":"online"}', True)
                await tx.publish(topics.job_model("j"), model.to_msgpack(), timeout=30)
                received = decode_message(
                    (await models.get(timeout=30)).payload, expect=ModelVersion
                )
                np.testing.assert_array_equal(received.tensors["w"], model.tensors["w"])

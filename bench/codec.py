"""Codec and chunking throughput, each beside its baseline measured in the same run.

1. Encode and decode of a model update of 1 M and 11 M float32 parameters against
   ``numpy.copyto`` of the same bytes into a buffer that is already paged in (the fastest a
   decode that copies could ever be). Decode includes full validation (finite values).
2. An 11 M-parameter model (44 MB) through a mosquitto of our own on loopback: Ember's
   transport, chunked as it chooses by default (4 MiB frames over MQTT 5 to a broker that states
   no packet limit) and reassembled on the far side, against one raw
   publish of the same bytes with aiomqtt, publisher and subscriber in one process for both.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np

from agent.logs import configure_logging
from agent.protocol import ModelUpdate, decode_message
from agent.transport import BrokerConfig, Transport
from bench.common import best_of, median, show, write_results
from coordinator.mosquitto import MosquittoProcess

MB = 1e6
SIZES = {"1m": 1_000_000, "11m": 11_000_000}
TRANSFERS = 5


def layered_model(parameters: int) -> dict[str, np.ndarray]:
    """A model split into layers the way a small CNN is: a few big matrices and biases."""
    rng = np.random.default_rng(0)
    shares = [0.6, 0.3, 0.0999, 0.0001]
    sizes = [int(parameters * s) for s in shares]
    sizes[0] += parameters - sum(sizes)
    return {
        f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)
    }


def codec_figures(label: str, parameters: int) -> dict[str, float]:
    tensors = layered_model(parameters)
    nbytes = sum(t.nbytes for t in tensors.values())
    update = ModelUpdate(job="bench", agent="a", base_version=0, num_samples=1, tensors=tensors)
    payload = update.to_msgpack()
    flat = np.concatenate(list(tensors.values()))
    dst = np.empty_like(flat)
    np.copyto(dst, flat)  # page the destination in
    copy_s = best_of(lambda: np.copyto(dst, flat), 7)
    encode_s = best_of(update.to_msgpack, 7)
    decode_s = best_of(lambda: decode_message(payload, expect=ModelUpdate), 7)
    decoded = decode_message(payload, expect=ModelUpdate)
    assert all(np.array_equal(decoded.tensors[k], v) for k, v in tensors.items())
    return {
        f"copy_{label}_mb_s": nbytes / copy_s / MB,
        f"encode_{label}_mb_s": nbytes / encode_s / MB,
        f"decode_{label}_mb_s": nbytes / decode_s / MB,
        f"decode_vs_copy_{label}": copy_s / decode_s,
        f"encode_vs_copy_{label}": copy_s / encode_s,
    }


async def raw_transfer(broker: MosquittoProcess, topic: str, payload: bytes) -> float:
    async with (
        aiomqtt.Client(broker.host, broker.port, timeout=120) as rx,
        aiomqtt.Client(broker.host, broker.port, timeout=120) as tx,
    ):
        await rx.subscribe(topic, 1)
        start = time.perf_counter()
        await tx.publish(topic, payload, qos=1, timeout=120)
        async for message in rx.messages:
            assert len(message.payload) == len(payload)  # type: ignore[arg-type]
            return time.perf_counter() - start
    raise RuntimeError("no message")


async def chunked_transfer(broker: MosquittoProcess, topic: str, payload: bytes) -> float:
    cfg = BrokerConfig(urls=(broker.url,))
    async with Transport(cfg) as rx, Transport(cfg) as tx:
        await rx.wait_connected(10)
        await tx.wait_connected(10)
        sub = await rx.subscribe(topic)
        start = time.perf_counter()
        await tx.publish(topic, payload, timeout=120)
        got = await sub.get(timeout=120)
        elapsed = time.perf_counter() - start
        assert len(got.payload) == len(payload)
        return elapsed


async def transfer_figures() -> dict[str, float]:
    tensors = layered_model(SIZES["11m"])
    payload = ModelUpdate(
        job="bench", agent="a", base_version=0, num_samples=1, tensors=tensors
    ).to_msgpack()
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp)) as broker:
        raw, chunked = [], []
        for i in range(TRANSFERS):  # interleaved, so both see the same machine
            raw.append(await raw_transfer(broker, f"bench/raw/{i}", payload))
            chunked.append(await chunked_transfer(broker, f"bench/chunked/{i}", payload))
    raw_mb_s = len(payload) / median(raw) / MB
    chunked_mb_s = len(payload) / median(chunked) / MB
    return {
        "transfer_payload_mb": len(payload) / MB,
        "transfer_raw_mb_s": raw_mb_s,
        "transfer_chunked_mb_s": chunked_mb_s,
        "transfer_chunked_vs_raw": chunked_mb_s / raw_mb_s,
        "transfer_runs": TRANSFERS,
    }


def main() -> None:
    configure_logging("warning")
    figures: dict[str, float] = {}
    for label, parameters in SIZES.items():
        figures.update(codec_figures(label, parameters))
    figures.update(asyncio.run(transfer_figures()))
    rows = [
        [
            f"{label} float32",
            figures[f"copy_{label}_mb_s"],
            figures[f"encode_{label}_mb_s"],
            figures[f"decode_{label}_mb_s"],
            f"{figures[f'decode_vs_copy_{label}']:.2f}×",
        ]
        for label in SIZES
    ]
    show(
        "codec (MB/s)", ["model", "numpy.copyto", "encode", "decode+validate", "decode/copy"], rows
    )
    show(
        f"44 MB model through mosquitto, median of {TRANSFERS} (MB/s)",
        ["path", "MB/s", "vs raw"],
        [
            ["aiomqtt, one raw publish", figures["transfer_raw_mb_s"], "1.00×"],
            [
                "Ember transport, default chunks",
                figures["transfer_chunked_mb_s"],
                f"{figures['transfer_chunked_vs_raw']:.2f}×",
            ],
        ],
    )
    print(f"wrote {write_results('codec', figures)}")


if __name__ == "__main__":
    main()

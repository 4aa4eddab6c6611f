"""The broker's ceiling: how much mosquitto on loopback moves with the client library Ember uses.

Publishers in a child process (``bench.flood``, aiomqtt, QoS 1, one message in flight each,
payloads sent whole) flood one topic tree; one aiomqtt subscriber in this process receives,
with Ember's packet reader and PUBLISH decoder (no payload copies) and allocator settings, as
Ember's own processes run, so the ceiling is the best this client library does here.
Throughput is what the subscriber receives per second in the window after a warm-up: a broker
can accept faster than anyone can read, so only delivered bytes count. The publishers stay at
most :data:`WINDOW_BYTES` ahead of the subscriber, which grants them more as it receives (as
Ember's trainers wait for their receipts): unbounded, mosquitto's queue for the subscriber grew
until mosquitto spent a whole core on it, and 4 MB runs landed anywhere from 390 to 1,320 MB/s;
with the window, 1,140 to 1,510. Each payload is measured in :data:`TRIALS` runs, each on a
broker of its own, and the ceiling is the best: what the broker can do.
Payloads: 1 KB, 1 MB, 44 MB (an 11 M-parameter float32 update) and the other update sizes
:mod:`bench.aggregate` sends. That part also measures the ceiling of its own update sizes,
alternating with its ingest runs, and divides by those (:func:`measure` is the same run).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiomqtt

from agent.logs import configure_logging
from agent.transport import adopt
from bench.common import Flood, best_run, scaled, show, write_results

MB = 1e6
PAYLOADS = {"1kb": 1_000, "1mb": 1_000_000, "44mb": 44_000_000}
PUBLISHERS = 8
TRIALS = 3
WINDOW_BYTES = 16_000_000
"""How far the publishers together may run ahead of the subscriber (at least two messages):
four 4 MB messages. With 64 MB mosquitto still spent a core on its queue (630-760 MB/s)."""


def update_payload_bytes(parameters: int) -> int:
    """The raw payload standing for a float32 update of ``parameters`` (with its framing)."""
    return 4 * parameters + 600


def model_payloads() -> dict[str, int]:
    """The update sizes of :mod:`bench.aggregate`'s models (float32, with a little framing)
    that no standard payload is within 10 % of (the 11 M update is the 44 MB one)."""
    from bench.aggregate import MODELS
    from bench.models import parameter_count

    sizes = {
        f"update_{label}": update_payload_bytes(parameter_count(parameters))
        for label, parameters in MODELS.items()
    }
    return {
        label: size
        for label, size in sizes.items()
        if all(abs(size - standard) > 0.1 * standard for standard in PAYLOADS.values())
    }


LAST_MESSAGE_WAIT = 10.0
"""Seconds past the window a run waits for a message that ends it (a 44 MB one takes about
0.1 s here)."""


async def measure(host: str, port: int, label: str, size: int, seconds: float) -> dict[str, Any]:
    if size >= 10_000_000:
        seconds *= 1.5  # a few messages a second: a longer window for more samples
    warmup = min(1.0, seconds / 4)
    arrivals: list[tuple[float, int]] = []
    topic = f"bench/ceiling/{label}"
    # The client library as Ember runs it (agent.transport.adopt): payloads handed over without
    # copies, so the receiver's cost is the ceiling's too.
    subscriber = adopt(aiomqtt.Client(host, port, timeout=600, max_queued_incoming_messages=0))
    async with subscriber as rx:
        await rx.subscribe(f"{topic}/#", qos=1)
        config = {
            "mode": "raw",
            "host": host,
            "port": port,
            "topic": topic,
            "payload_bytes": size,
            "publishers": PUBLISHERS,
            "seconds": seconds,
            "window": max(2, WINDOW_BYTES // size),
        }
        async with Flood(config) as flood:
            started = time.perf_counter()  # before "go": the flood's clock starts after this
            end = started + seconds
            flood.go()

            async def receive() -> None:
                async for message in rx.messages:
                    now = time.perf_counter()
                    arrivals.append((now, len(message.payload)))  # type: ignore[arg-type]
                    flood.credit()
                    if now >= end:
                        return

            # The flood stops by its own clock. Were it to start before this one, the last
            # message could come before the window ends and none after it: started after
            # "go", that happened once in a dozen runs on a loaded machine and the wait (then
            # 120 s) ran out. Arrivals after the window do not count: past it, wait briefly.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(receive(), seconds + LAST_MESSAGE_WAIT)
            sent = await flood.result()
    window = [(t, n) for t, n in arrivals if started + warmup <= t <= end]
    span = (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
    messages = len(window) - 1 if len(window) > 1 else 0
    received_bytes = sum(n for _, n in window[1:])
    return {
        f"{label}_payload_bytes": size,
        f"{label}_msgs_s": messages / span if span else 0.0,
        f"{label}_mb_s": received_bytes / span / MB if span else 0.0,
        f"{label}_published": sent["messages"],
        f"{label}_received": len(arrivals),
    }


async def run() -> dict[str, Any]:
    seconds = scaled(8.0, 0.5)
    payloads = scaled({**PAYLOADS, **model_payloads()}, {"1kb": 1_000, "40kb": 40_000})
    trials = scaled(TRIALS, 1)
    figures: dict[str, Any] = {
        "publishers": PUBLISHERS,
        "seconds": seconds,
        "trials": trials,
        "window_bytes": WINDOW_BYTES,
    }
    for label, size in payloads.items():
        figures.update(
            await best_run(
                trials,
                label,
                lambda broker, _workdir, label=label, size=size: measure(
                    broker.host, broker.port, label, size, seconds
                ),
            )
        )
    figures["labels"] = list(payloads)
    return figures


def main() -> None:
    configure_logging("warning")
    figures = asyncio.run(run())
    rows = [
        [
            label,
            figures[f"{label}_payload_bytes"],
            figures[f"{label}_msgs_s"],
            figures[f"{label}_mb_s"],
        ]
        for label in figures["labels"]
    ]
    show(
        f"broker ceiling: mosquitto on loopback, aiomqtt, {PUBLISHERS} publishers → 1 subscriber",
        ["payload", "bytes", "msgs/s", "MB/s"],
        rows,
    )
    print(f"wrote {write_results('ceiling', figures)}")


def summary(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"mosquitto on loopback, aiomqtt (Ember's client library, with Ember's PUBLISH decoder "
        f"and allocator settings), {figures['publishers']} publishers at QoS 1 → one "
        "subscriber; delivered messages per second after a warm-up; the best of "
        f"{figures.get('trials', 1)} runs, each on a broker of its own. The publishers stay at "
        f"most {figures.get('window_bytes', WINDOW_BYTES) / 1e6:g} MB (at least two messages) "
        "ahead of the subscriber, as Ember's trainers wait for their receipts: unbounded, "
        "mosquitto's queue for the subscriber grew until it took a core, and 4 MB runs landed "
        "anywhere from 390 to 1,320 MB/s.",
        "",
        "| payload | bytes | msgs/s | MB/s | runs (MB/s) |",
        "|---|---:|---:|---:|---|",
    ]
    for label in figures["labels"]:
        runs = figures.get(f"{label}_runs_mb_s", [])
        lines.append(
            f"| {label} | {figures[f'{label}_payload_bytes']:,} | "
            f"{figures[f'{label}_msgs_s']:,.1f} | {figures[f'{label}_mb_s']:,.1f} | "
            + ", ".join(f"{r:,.0f}" for r in runs)
            + " |"
        )
    return lines


if __name__ == "__main__":
    main()

"""One coordinator and a fleet of thousands: registry cost, planning and dispatch.

A real ``ember serve`` (its own process, no embedded agent, zeroconf off) and one mosquitto of
the benchmark's own, with its connection limits lifted. The fleet is ``bench.swarm``: simulated
agents in a child process, each with its own MQTT connection, retained status and info
documents and telemetry every 10 s (the agent's default), answering role assignments as an
agent does. One more agent holds the held-out set and takes the aggregator role.

* held: seconds from starting the fleet to the coordinator listing every agent online
  (``agents.ls`` over RPC), then the coordinator's RSS and CPU over a window of heart-beats;
* ``jobs plan`` (the RPC the CLI calls) of the digits job over the whole fleet, median of three;
* dispatch: ``jobs submit`` of the digits FedBuff job with concurrency equal to the fleet, to
  the last trainer receiving its assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from agent.logs import configure_logging
from agent.protocol import Topics
from agent.transport import BrokerConfig, Transport
from bench.common import (
    REPO,
    bench_broker,
    cpu_seconds,
    median,
    raise_open_files,
    scaled,
    show,
    write_results,
)
from coordinator.rpc import RpcClient

FLEETS = (1_000, 10_000)
DISPATCH_FLEET = 1_000
TELEMETRY_INTERVAL = 10.0


def digits_job(trainers: int) -> tuple[dict[str, Any], dict[str, bytes], dict[str, str]]:
    """The demo's FedBuff job for ``trainers`` agents, as ``ember jobs submit`` sends it."""
    from coordinator.bundles import model_artifacts
    from coordinator.demo.run import DemoOptions, job_spec
    from coordinator.spec import parse_spec

    spec = parse_spec(job_spec(DemoOptions(agents=trainers)))
    built = model_artifacts(spec, None)
    return spec.to_dict(), built.artifacts, built.code


class Swarm:
    """``bench.swarm`` in a child process."""

    def __init__(self, config: dict[str, Any], work: Path) -> None:
        self.path = work / f"swarm-{secrets.token_hex(3)}.json"
        self.path.write_text(json.dumps(config))
        self.process: asyncio.subprocess.Process | None = None
        self.assigned: dict[str, float] = {}
        self.expected = 0
        self.all_assigned = asyncio.Event()

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.swarm",
            str(self.path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=str(REPO),
            limit=1 << 20,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 600)
        if line.strip() != b"ready":
            raise RuntimeError(f"bench.swarm did not start: {line!r}")
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            event = json.loads(line)
            if event.get("role") == "trainer":
                self.assigned.setdefault(event["assigned"], float(event["t"]))
                if self.expected and len(self.assigned) >= self.expected:
                    self.all_assigned.set()

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.write(b"stop\n")
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.reader.cancel()


async def start_coordinator(url: str, prefix: str, work: Path) -> asyncio.subprocess.Process:
    work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240  a directory entry, once
    log = open(work / "coordinator.log", "wb")  # noqa: ASYNC230, SIM115  the child keeps it
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator.cli",
        "--broker",
        url,
        "--prefix",
        prefix,
        "serve",
        "--state-dir",
        str(work / "state"),
        "--no-embedded-agent",
        "--no-zeroconf",
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
    )


async def wait_online(client: RpcClient, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        agents = await client.call("agents.ls", timeout=120)
        online = sum(1 for a in agents if a.get("online"))
        if online >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {online} of {count} agents online after {timeout} s")
        await asyncio.sleep(2.0)


async def fleet_case(
    size: int, work: Path, window: float, *, plan: bool, dispatch: bool
) -> dict[str, Any]:
    prefix = f"bench-fleet/{secrets.token_hex(3)}"
    broker = bench_broker(work / f"broker-{size}", connections=size + 100)
    coordinator: asyncio.subprocess.Process | None = None
    swarm: Swarm | None = None
    figures: dict[str, Any] = {}
    try:
        coordinator = await start_coordinator(broker.url, prefix, work / f"coordinator-{size}")
        config = BrokerConfig(urls=(broker.url,), backoff_initial=0.1)
        async with Transport(config) as transport:
            await transport.wait_connected(30)
            client = RpcClient(transport, Topics(prefix))
            for _ in range(120):  # until ember serve answers
                try:
                    await client.call("ping", timeout=1.0)
                    break
                except Exception:  # not up yet
                    continue
            swarm = Swarm(
                {
                    "host": broker.host,
                    "port": broker.port,
                    "prefix": prefix,
                    "count": size,
                    "id_prefix": "pi-",
                    "interval": TELEMETRY_INTERVAL,
                    "common": {
                        "datasets": [{"name": "digits", "tags": ["vision"], "samples": 180}]
                    },
                    "extra": [
                        {
                            "id": "gateway",
                            "labels": {"role": "aggregator"},
                            "datasets": [{"name": "digits-holdout", "tags": [], "samples": 360}],
                        }
                    ],
                },
                work,
            )
            started = time.monotonic()
            await swarm.start()
            await wait_online(client, size + 1, timeout=600)
            figures[f"held_{size}_s"] = time.monotonic() - started
            process = psutil.Process(coordinator.pid)
            await asyncio.sleep(min(window, 5.0))  # the first telemetry of every agent
            before = cpu_seconds(process)
            mark = time.monotonic()
            await asyncio.sleep(window)
            busy = cpu_seconds(process) - before
            figures[f"coordinator_{size}_cpu_percent"] = 100 * busy / (time.monotonic() - mark)
            figures[f"coordinator_{size}_rss_mb"] = process.memory_info().rss / 1e6
            figures[f"held_{size}"] = coordinator.returncode is None
            spec, artifacts, code = await asyncio.to_thread(digits_job, size)
            if plan:
                times = []
                for _ in range(3):
                    began = time.perf_counter()
                    result = await client.call("jobs.plan", {"spec": spec}, timeout=300)
                    times.append(time.perf_counter() - began)
                figures[f"plan_{size}_s"] = median(times)
                figures[f"plan_{size}_trainers"] = sum(
                    1 for s in result["selected"] if s["role"] == "trainer"
                )
                if result["problems"]:
                    raise RuntimeError(f"the fleet cannot take the job: {result['problems']}")
            if dispatch:
                swarm.expected = size
                began_wall = time.time()
                await client.call(
                    "jobs.submit",
                    {"spec": spec, "artifacts": artifacts, "code": code},
                    timeout=300,
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(swarm.all_assigned.wait(), 600)
                arrived = sorted(swarm.assigned.values())
                figures[f"dispatch_{size}_trainers"] = len(arrived)
                if arrived:
                    figures[f"dispatch_{size}_first_s"] = arrived[0] - began_wall
                    figures[f"dispatch_{size}_s"] = arrived[-1] - began_wall
            await client.close()
    finally:
        if swarm is not None:
            await swarm.stop()
        if coordinator is not None and coordinator.returncode is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(coordinator.wait(), 30)
            except asyncio.TimeoutError:
                coordinator.kill()
                await coordinator.wait()
        broker.stop()
    return figures


async def run() -> dict[str, Any]:
    fleets = scaled(FLEETS, (20,))
    dispatch_fleet = scaled(DISPATCH_FLEET, 20)
    window = scaled(30.0, 2.0)
    raise_open_files(max(fleets) + 1000)
    figures: dict[str, Any] = {
        "fleets": list(fleets),
        "dispatch_fleet": dispatch_fleet,
        "telemetry_interval_s": TELEMETRY_INTERVAL,
        "window_s": window,
    }
    with tempfile.TemporaryDirectory(prefix="ember-fleet-") as tmp:
        for size in fleets:
            figures.update(
                await fleet_case(
                    size,
                    Path(tmp),
                    window,
                    plan=size == max(fleets),
                    dispatch=size == dispatch_fleet,
                )
            )
    largest = max(fleets)
    figures["held_10000"] = bool(figures.get(f"held_{largest}")) and largest >= 10_000
    return figures


def main() -> None:
    configure_logging("warning")
    figures = asyncio.run(run())
    rows = [
        [
            f"{size:,} agents",
            figures[f"held_{size}_s"],
            figures[f"coordinator_{size}_rss_mb"],
            figures[f"coordinator_{size}_cpu_percent"],
        ]
        for size in figures["fleets"]
    ]
    show(
        f"one coordinator, telemetry every {TELEMETRY_INTERVAL:g} s",
        ["fleet", "all online after s", "RSS MB", "CPU %"],
        rows,
    )
    largest, dispatched = max(figures["fleets"]), figures["dispatch_fleet"]
    print(
        f"jobs plan over {largest:,} agents: {figures[f'plan_{largest}_s']:.2f} s; "
        f"dispatch to {dispatched:,} trainers: {figures.get(f'dispatch_{dispatched}_s', 'n/a')} s"
    )
    print(f"wrote {write_results('fleet', figures)}")


def summary(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"One `ember serve` and one mosquitto; simulated agents (own MQTT connection each) with "
        f"telemetry every {figures['telemetry_interval_s']:g} s. CPU is % of one core over "
        f"{figures['window_s']:g} s of heart-beats. Bar: 10,000 agents held.",
        "",
        "| fleet | all online after (s) | coordinator RSS (MB) | coordinator CPU (%) |",
        "|---:|---:|---:|---:|",
    ]
    for size in figures["fleets"]:
        lines.append(
            f"| {size:,} | {figures[f'held_{size}_s']:.1f} | "
            f"{figures[f'coordinator_{size}_rss_mb']:.1f} | "
            f"{figures[f'coordinator_{size}_cpu_percent']:.1f} |"
        )
    largest, dispatched = max(figures["fleets"]), figures["dispatch_fleet"]
    lines += [
        "",
        "| operation | seconds |",
        "|---|---:|",
        f"| `jobs plan` over {largest:,} agents ({figures.get(f'plan_{largest}_trainers', '?')} "
        f"trainers selected), median of 3 | {figures.get(f'plan_{largest}_s', float('nan')):.3f} |",
        f"| submit → first of {dispatched:,} trainers assigned | "
        f"{figures.get(f'dispatch_{dispatched}_first_s', float('nan')):.3f} |",
        f"| submit → all {figures.get(f'dispatch_{dispatched}_trainers', 0):,} trainers assigned "
        f"| {figures.get(f'dispatch_{dispatched}_s', float('nan')):.3f} |",
    ]
    return lines


if __name__ == "__main__":
    main()

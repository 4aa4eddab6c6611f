"""The aggregator's ingest: updates per second it takes in, against the broker's ceiling.

Ember's real aggregator role (FedBuff) runs in this process on a mosquitto of the benchmark's
own; 8 to 64 simulated trainers in a child process (``bench.flood``, one Ember transport each)
send real model updates of 10 K, 1 M and 11 M float32 parameters as fast as the protocol lets
them: each sends its next update once the aggregator's receipt for the previous one arrives.
Ingest is the aggregator's ``received`` counter (decoded, validated, staleness-weighted into the
buffer, checkpointed before the receipt) over a window after a warm-up; the best of
:data:`TRIALS` runs, as the ceiling is the best of its runs.

The ceiling each ratio divides by is measured here too, alternating with Ember's runs: before
each trial of a model, one :mod:`bench.ceiling` run of the update's size (best of the trials).
This machine's speed drifted by a quarter between sittings (the 4 MB ceiling measured 1,370
and 1,713 MB/s on one day), and a ceiling measured minutes before the ingest moved the ratio
with it: 0.48 in a run where one sitting's alternating runs gave 0.61.

The buffer size K is set above what the window can fill, so no model version is made during
it: ingest is the receive path alone. The cost of a version (server optimizer, encode, publish
to every trainer) is what :mod:`bench.latency` measures. The ratio compares the ingest in MB/s
with :mod:`bench.ceiling`'s delivered MB/s for the payload size closest to the update's.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

import psutil

from agent.logs import configure_logging
from bench import ceiling
from bench.common import (
    Flood,
    best_mb_s,
    cpu_seconds,
    own_broker_run,
    scaled,
    show,
    write_results,
)
from bench.cpu_profile import Profile, py_spy
from bench.harness import job_config, start_aggregator, stop_aggregator
from bench.models import mlp, parameter_count, tensor_layout

MB = 1e6
TRIALS = 2
"""Runs of each measurement, each on a broker of its own; the best counts, as the ceiling's best
of its runs does (runs of the same code here differ by up to a tenth)."""
MODELS = {"10k": 10_000, "1m": 1_000_000, "11m": 11_000_000}
BAR_MODELS = ("1m", "11m")
BAR_RATIO = 0.80
"""Issue 7's ingest bar: these models' ingest at least this fraction of the ceiling. 10K
updates are too small for the broker's bytes to be what bounds them."""
TRAINERS = {"10k": (8, 64), "1m": (8, 64), "11m": (8, 16)}
"""Simulated trainers per model. 16 trainers of the 11 M model have 700 MB in flight; 32 had
1.4 GB, more than the bench broker's queue for one client (1 GiB, as a deployment would bound
it), so mosquitto dropped the chunks past it and the simulated trainers, which do not resend,
stalled (a real trainer's spool sends again; upload credits from the aggregator would keep
what is in flight within what the broker and the aggregator hold)."""


class ProcessCpu:
    """Cores used since creation by this process (the aggregator), the broker and the
    simulated trainers' process (its children, told apart by their command lines)."""

    def __init__(self) -> None:
        me = psutil.Process()
        self.processes = {"aggregator": me}
        for child in me.children():
            with contextlib.suppress(psutil.Error):
                kind = "broker" if "mosquitto" in " ".join(child.cmdline()) else "trainers"
                self.processes[kind] = child
        self.started = time.perf_counter()
        self.cpu = {kind: cpu_seconds(p) for kind, p in self.processes.items()}

    def cores(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        used = {}
        for kind, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                used[kind] = round((cpu_seconds(process) - self.cpu[kind]) / elapsed, 2)
        return used


async def measure(
    url: str,
    root: Path,
    label: str,
    parameters: int,
    trainers: int,
    warmup: float,
    window: float,
    profile: bool = False,
) -> dict[str, Any]:
    """One ingest run; with ``profile``, py-spy samples the aggregator during the window (it
    takes a few percent of the two cores, so profiled runs give the profile, not the figures)."""
    model = await asyncio.to_thread(mlp, parameters)
    job = f"ingest-{label}-{trainers}-{secrets.token_hex(2)}"
    config = job_config("ingest", mode="async", buffer_size=1 << 30, concurrency=trainers)
    host, aggregator, task = await start_aggregator(url, root, job, config, model)
    topics = host.topics
    try:
        flood = {
            "mode": "trainers",
            "url": url,
            "prefix": topics.prefix,
            "job": job,
            "agent_prefix": "trainer-",
            "tensors": tensor_layout(model),
            "publishers": trainers,
            "seconds": warmup + window + 1.0,
            "ack_timeout": 30.0,
        }
        async with Flood(flood) as load:
            load.go()
            await asyncio.sleep(warmup)
            first = aggregator.algo.counters.received
            started = time.perf_counter()
            cpu = ProcessCpu()
            async with Profile(window, enabled=profile) as sampled:
                await asyncio.sleep(window)
                received = aggregator.algo.counters.received - first
                elapsed = time.perf_counter() - started
            cores = cpu.cores()
            sent = await load.result()
        counters = aggregator.algo.counters.as_dict()
    finally:
        await stop_aggregator(host, task)
    update_bytes = sent["bytes"] / max(1, sent["messages"])
    key = f"{label}_{trainers}"
    return {
        f"{key}_updates_s": received / elapsed,
        f"{key}_cores": cores,
        f"{key}_mb_s": received * update_bytes / elapsed / MB,
        f"{key}_update_bytes": round(update_bytes),
        f"{key}_unacknowledged": sent["unacknowledged"],
        f"{key}_applied": counters["applied"],
        f"{key}_rejected": counters["rejected"],
        f"{key}_profile": sampled.shares,
    }


async def run() -> dict[str, Any]:
    models = scaled(MODELS, {"10k": 10_000})
    trainer_counts = scaled(TRAINERS, {"10k": (2,)})
    warmup, window = scaled((2.0, 8.0), (0.5, 1.0))
    figures: dict[str, Any] = {
        "models": {label: parameter_count(p) for label, p in models.items()},
        "trainer_counts": {label: list(trainer_counts[label]) for label in models},
        "window_s": window,
    }
    trials = scaled(TRIALS, 1)
    figures["trials"] = trials
    ceiling_seconds = scaled(8.0, 0.5)  # as bench.ceiling's own runs
    for label, parameters in models.items():
        counts = trainer_counts[label]
        paired: list[dict[str, Any]] = []
        runs: dict[int, list[dict[str, Any]]] = {trainers: [] for trainers in counts}
        for _ in range(trials):
            paired.append(
                await own_broker_run(
                    lambda broker, _workdir, m=label, p=parameters: ceiling.measure(
                        broker.host,
                        broker.port,
                        f"{m}_paired_ceiling",
                        ceiling.update_payload_bytes(p),
                        ceiling_seconds,
                    )
                )
            )
            for trainers in counts:
                runs[trainers].append(
                    await own_broker_run(
                        lambda broker, workdir, m=label, p=parameters, n=trainers: measure(
                            broker.url, workdir, m, p, n, warmup, window
                        )
                    )
                )
        figures.update(best_mb_s(paired, f"{label}_paired_ceiling"))
        for trainers in counts:
            figures.update(best_mb_s(runs[trainers], f"{label}_{trainers}"))
        for trainers in counts if py_spy() else ():  # runs of their own, after the measured ones
            key = f"{label}_{trainers}"
            profiled = await own_broker_run(
                lambda broker, workdir, m=label, p=parameters, n=trainers: measure(
                    broker.url, workdir, m, p, n, warmup, window, profile=True
                )
            )
            figures[f"{key}_profile"] = profiled[f"{key}_profile"]
    return with_ceiling(figures)


def with_ceiling(figures: dict[str, Any]) -> dict[str, Any]:
    """Add the ratio to the broker's ceiling, measured in this part alternating with the
    ingest runs, for every measurement."""
    for label in figures["models"]:
        paired = figures[f"{label}_paired_ceiling_mb_s"]
        for trainers in figures["trainer_counts"][label]:
            key = f"{label}_{trainers}"
            if paired:
                figures[f"{key}_ceiling_mb_s"] = paired
                figures[f"{key}_vs_ceiling"] = figures[f"{key}_mb_s"] / paired
    return figures


def main() -> None:
    configure_logging("warning")
    figures = asyncio.run(run())
    rows = []
    for label in figures["models"]:
        for trainers in figures["trainer_counts"][label]:
            key = f"{label}_{trainers}"
            ratio = figures.get(f"{key}_vs_ceiling")
            rows.append(
                [
                    label,
                    trainers,
                    figures[f"{key}_updates_s"],
                    figures[f"{key}_mb_s"],
                    figures.get(f"{key}_ceiling_mb_s", "n/a"),
                    "n/a" if ratio is None else f"{ratio:.2f}",
                    figures[f"{key}_unacknowledged"],
                ]
            )
    show(
        "aggregator ingest (FedBuff, no version in the window)",
        ["model", "trainers", "updates/s", "MB/s", "ceiling MB/s", "vs ceiling", "unacked"],
        rows,
    )
    print(f"wrote {write_results('aggregate', figures)}")


def summary(figures: dict[str, Any]) -> list[str]:
    lines = [
        "Ember's aggregator role (FedBuff) in one process; simulated trainers in another send "
        "real updates, each waiting for the aggregator's receipt before the next. "
        f"Window {figures['window_s']:g} s after a warm-up; the best of "
        f"{figures.get('trials', 1)} runs, each on a broker of its own. The ceiling column is "
        "measured in this part, alternating with the ingest runs: before each trial of a "
        "model, a raw run of the update's size (as the ceiling part measures it), best of "
        f"{figures.get('trials', 1)}; the ceiling part's own figure for that size, measured "
        f"minutes apart, is in its table. Bar: ≥ {BAR_RATIO:.2f} of the ceiling for 1M and 11M.",
        "",
        "| model | parameters | trainers | updates/s | MB/s | every run, MB/s | ceiling MB/s | "
        "ceiling, every run | vs ceiling | unacknowledged | cores: aggregator, broker, trainers |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---|",
    ]
    for label, parameters in figures["models"].items():
        for trainers in figures["trainer_counts"][label]:
            key = f"{label}_{trainers}"
            ratio = figures.get(f"{key}_vs_ceiling")
            ceiling = figures.get(f"{key}_ceiling_mb_s")
            lines.append(
                f"| {label} | {parameters:,} | {trainers} | {figures[f'{key}_updates_s']:,.1f} | "
                f"{figures[f'{key}_mb_s']:,.1f} | "
                f"{_runs(figures.get(f'{key}_runs_mb_s', []))} | "
                f"{'n/a' if ceiling is None else f'{ceiling:,.1f}'} | "
                f"{_runs(figures.get(f'{label}_paired_ceiling_runs_mb_s', []))} | "
                f"{'n/a' if ratio is None else f'{ratio:.2f}'} | "
                f"{figures[f'{key}_unacknowledged']} | {_cores(figures.get(f'{key}_cores'))} |"
            )
    lines += profile_table(figures)
    short = [
        key
        for label in BAR_MODELS
        for trainers in figures["trainer_counts"].get(label, [])
        if figures.get(f"{(key := f'{label}_{trainers}')}_vs_ceiling", 1.0) < BAR_RATIO
        or figures[f"{key}_unacknowledged"]
    ]
    if short:
        lines += ["", *SHORTFALL]
    return lines


def _runs(runs: list[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in runs)


def _cores(cores: dict[str, float] | None) -> str:
    if not cores:
        return "n/a"
    return ", ".join(f"{cores.get(kind, 0.0):.2f}" for kind in ("aggregator", "broker", "trainers"))


SHORTFALL = (
    "**Below the bar, and why.** The 1M ratio is bound by the CPU each update costs, on two "
    "cores that carry the simulated trainers, mosquitto and the aggregator together. Measured "
    "2026-12-07 with 8 trainers (240 updates/s): aggregator 2.8 ms of CPU per update, mosquitto "
    "1.9, trainers 1.7, 6.4 ms in all; the raw path of the ceiling (350 messages/s): subscriber "
    "1.5, mosquitto 1.8, publishers 1.2, 4.4 ms. Both ran the machine at the same load (vmstat: "
    "16-24 % idle in each), so the ratio settles near 4.4 / 6.4. Per update the aggregator "
    "spends about 0.9 ms receiving 4 MB from its socket (as the subscriber does), 0.3 ms on the "
    "XXH3 frame check, 0.2 ms on the norm and finiteness check, 0.3 ms on FedBuff's weighted "
    "add and 0.35 ms writing and syncing the checkpoint its receipt waits for (py-spy). More "
    "updates in flight help only a little: 16 trainers 0.69, 32 0.73, 64 0.74-0.79 in that "
    "sitting (0.87-0.99 the sitting before, against a ceiling as high), and two updates in "
    "flight per trainer (an experiment) +5 % over one. The full run above, an hour later, met "
    "a ceiling up to 1,630 MB/s (1,400 before) with Ember's ingest where it was (900-1,020): "
    "the raw path and Ember's do not drift together. Without the frame check on either side (an "
    "experiment) 8 trainers gave 0.72-0.74 against 0.64-0.66 with it. So the bar is not "
    "reachable here without dropping work Ember owes every update: the integrity check, the "
    "refusal of non-finite or oversized deltas, and a receipt only once the update is on disk. "
    "What would move it: trainers on devices of their own, as deployed (here they take 1.7 ms "
    "of the 6.4); receipts for flow control at once and durability marks per checkpoint "
    "instead of a sync per commit (about 5 %, a protocol change). Tried and not kept, as "
    "alternating runs showed no gain: checking each received piece of a frame while it is "
    "still in the CPU's cache, receipts on a topic of each trainer's own, commit spacing, "
    "group commits that do not wait for queued updates, and a copy without the GIL.",
)


def profile_table(figures: dict[str, Any]) -> list[str]:
    """Where the aggregator's process spent its CPU, per measurement (py-spy, if it ran)."""
    keys = [
        f"{label}_{trainers}"
        for label in figures["models"]
        for trainers in figures["trainer_counts"][label]
        if figures.get(f"{label}_{trainers}_profile")
    ]
    if not keys:
        return []
    layers = sorted(
        {layer for key in keys for layer in figures[f"{key}_profile"]},
        key=lambda layer: -max(figures[f"{key}_profile"].get(layer, 0.0) for key in keys),
    )
    lines = [
        "",
        "Where the aggregator's process spends its CPU during the window (py-spy samples of "
        "every thread, filed under the innermost Ember or library layer), in a run of its own "
        "after the measured ones (sampling took about 2 % of the ingest):",
        "",
        "| layer | " + " | ".join(k.replace("_", " × ") for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for layer in layers:
        cells = [f"{figures[f'{key}_profile'].get(layer, 0.0):.0%}" for key in keys]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()

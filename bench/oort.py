"""Time to 0.93 held-out accuracy with stragglers: Oort against random client selection.

Synchronous FedAvg rounds over the digits demo (``ember demo``: real agent processes, a
coordinator, signed bundles, onnxruntime) with eight clients holding Dirichlet(α = 0.5) shards,
the first quarter ten times slower (``[simulation] slowdown``), and four clients sampled per
round: uniformly at random (McMahan et al. 2017), or by Oort (Lai et al., OSDI 2021), which
learns from the trainers' per-sample losses and durations to prefer useful fast clients. Both
runs share the mosquitto, shards, model, initial weights and local work (100 SGD steps of 32,
lr 0.1); time is from the job's submission to the first version at the target.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from agent.logs import configure_logging
from bench.common import bench_broker, scaled, show, time_to_target, write_results

AGENTS = 8
PER_ROUND = 4
STRAGGLERS = 0.25
SLOWDOWN = 10.0
TARGET = 0.93
LOCAL_STEPS = 100
"""Enough local work that a slow device's round costs more than the broker's round trips (with
the demo's 20 steps a local run takes ~10 ms here, and ten times that hides in the overhead)."""
SELECTIONS = ("random", "oort")
REPEATS = scaled(3, 1)
"""Runs of each selection, on the shards of seeds 0, 1, 2 (Dirichlet splits differ by seed)."""


async def ember(
    selection: str, seed: int, url: str, work: Path, max_seconds: float
) -> dict[str, Any]:
    from coordinator.demo.run import Demo, DemoOptions

    options = DemoOptions(
        agents=AGENTS,
        algorithm="fedavg",
        selection=selection,  # type: ignore[arg-type]
        clients_per_round=PER_ROUND,
        broker=url,
        out=work / f"{selection}-{seed}",
        seed=seed,
        target_accuracy=TARGET,
        max_seconds=max_seconds,
        stragglers=STRAGGLERS,
        slowdown=SLOWDOWN,
        local_steps=LOCAL_STEPS,
    )
    summary = await Demo(options).run()
    return {
        "s": summary.time_to_target,
        "final_accuracy": summary.final_accuracy,
        "versions": summary.model_versions,
    }


async def run() -> dict[str, Any]:
    max_seconds = scaled(300.0, 20.0)
    figures: dict[str, Any] = {
        "agents": AGENTS,
        "per_round": PER_ROUND,
        "stragglers": round(AGENTS * STRAGGLERS),
        "slowdown": SLOWDOWN,
        "target": TARGET,
        "max_seconds": max_seconds,
        "repeats": REPEATS,
    }
    with tempfile.TemporaryDirectory(prefix="ember-oort-") as tmp:
        work = Path(tmp)
        broker = bench_broker(work / "broker", connections=100)
        try:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SELECTIONS}
            for seed in range(REPEATS):  # both selections on the same shards, turn by turn
                for selection in SELECTIONS:
                    runs[selection].append(
                        await ember(selection, seed, broker.url, work, max_seconds)
                    )
        finally:
            broker.stop()
    for selection, results in runs.items():
        times = [r["s"] for r in results]
        figures[f"{selection}_runs_s"] = times
        reached = [t for t in times if t is not None]
        # The median over the seeds; a run that missed the target counts as the slowest.
        figures[f"{selection}_s"] = (
            statistics.median([t if t is not None else math.inf for t in times])
            if len(reached) * 2 > len(times)
            else None
        )
        figures[f"{selection}_versions"] = statistics.median(r["versions"] for r in results)
        figures[f"{selection}_final_accuracy"] = statistics.median(
            r["final_accuracy"] for r in results
        )
    oort, random = figures["oort_s"], figures["random_s"]
    if oort and random:
        figures["oort_speedup_vs_random"] = random / oort
    return figures


def main() -> None:
    configure_logging("warning")
    figures = asyncio.run(run())
    rows = [
        [
            selection,
            time_to_target(figures[f"{selection}_s"]),
            figures[f"{selection}_versions"],
            figures[f"{selection}_final_accuracy"],
        ]
        for selection in SELECTIONS
    ]
    show(
        f"sync FedAvg, {PER_ROUND} of {AGENTS} clients a round, {figures['stragglers']} of them "
        f"{SLOWDOWN:g}× slower: time to {TARGET} accuracy (s)",
        ["selection", "seconds", "rounds", "final accuracy"],
        rows,
    )
    print(f"wrote {write_results('oort', figures)}")


def summary(figures: dict[str, Any]) -> list[str]:
    lines = [
        f"Digits, sync FedAvg, {figures['per_round']} of {figures['agents']} clients sampled a "
        f"round, {figures['stragglers']} of them {figures['slowdown']:g}× slower; time to "
        f"{figures['target']} held-out accuracy (limit {figures['max_seconds']:g} s), both "
        f"selections in the same run, medians over {figures.get('repeats', 1)} data splits "
        "(seeds). Bar (issue 11): Oort beats random selection.",
        "",
        "| selection | seconds (median) | each run (s) | rounds | final accuracy |",
        "|---|---:|---|---:|---:|",
    ]
    for selection in SELECTIONS:
        accuracy = figures.get(f"{selection}_final_accuracy")
        lines.append(
            f"| {selection} | {time_to_target(figures.get(f'{selection}_s'))} | "
            f"{', '.join(time_to_target(t) for t in figures.get(f'{selection}_runs_s', []))} | "
            f"{figures.get(f'{selection}_versions')} | "
            f"{'n/a' if accuracy is None else f'{accuracy:.4f}'} |"
        )
    speedup = figures.get("oort_speedup_vs_random")
    if speedup:
        lines += ["", f"Oort reaches the target {speedup:.2f}× as fast as random selection."]
    return lines


if __name__ == "__main__":
    main()

"""Stragglers: FedBuff against synchronous FedAvg when a quarter of the agents are ten times slower.

Runs `ember demo` twice on this machine (8 agents, 2 of them slowed down 10×, same data split),
prints both times to the target accuracy and saves both accuracy curves in one plot.

    python examples/stragglers/run.py [--agents 8] [--target 0.93] [--out stragglers]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordinator.plots import save_curves


def run(algorithm: str, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / algorithm
    command = [
        sys.executable, "-m", "coordinator.cli", "demo", "--json",
        "--algorithm", algorithm,
        "--agents", str(args.agents),
        "--stragglers", str(args.stragglers),
        "--slowdown", str(args.slowdown),
        "--target-accuracy", str(args.target),
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--stragglers", type=float, default=0.25)
    parser.add_argument("--slowdown", type=float, default=10.0)
    parser.add_argument("--target", type=float, default=0.93)
    parser.add_argument("--out", default="stragglers")
    args = parser.parse_args()
    results = {name: run(name, args) for name in ("fedbuff", "fedavg")}
    for name, summary in results.items():
        reached = summary["time_to_target"]
        shown = "not reached" if reached is None else f"{reached:.1f} s"
        print(f"{name:8s} time to {args.target}: {shown}  (final {summary['final_accuracy']})")
    path = save_curves(
        Path(args.out) / "stragglers.png",
        {name: summary["history"] for name, summary in results.items()},
        xlabel="seconds since the job started",
        ylabel="held-out accuracy",
        title=(
            f"{round(args.agents * args.stragglers)} of {args.agents} agents "
            f"{args.slowdown:g}× slower"
        ),
        target=args.target,
        ylim=(0, 1),
    )
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

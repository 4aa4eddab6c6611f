"""FedProx against FedAvg on Synthetic(1, 1) with stragglers, on real local agents.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020): 30 devices hold
Synthetic(1, 1) data (data.py), 10 are sampled per round, each runs 20 local epochs of SGD
(lr 0.01, batch 10) on a multinomial logistic regression (model.py). Half the devices are
stragglers (``[simulation] partial_work``): each round they stop after a random share of their
local work. FedProx (fedprox.yaml: μ = 1) aggregates that partial work; FedAvg (fedavg.yaml:
μ = 0) drops it, as the paper runs it. Both jobs run on the same fleet, data and seeds through
``ember demo``'s runner: an embedded broker, a coordinator and 30 ``ember-agent`` processes.

    python examples/synthetic_fedprox/run.py [--seed 0] [--rounds 40] [--out synthetic_fedprox]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository: examples.* and a source checkout

from coordinator.demo.run import (  # noqa: E402
    Demo,
    DemoOptions,
    DemoSummary,
    Federation,
    LocalAgent,
    Scenario,
)
from coordinator.plots import save_curves  # noqa: E402
from coordinator.spec import load_yaml  # noqa: E402
from examples.synthetic_fedprox.data import Device, synthetic  # noqa: E402

JOBS = {"fedprox": HERE / "fedprox.yaml", "fedavg": HERE / "fedavg.yaml"}


def scenario(job: dict[str, Any], label: str, args: argparse.Namespace) -> Scenario:
    """Synthetic(α, β) devices as agents; a seeded ``--stragglers`` share of them cut their
    local work short; the aggregator evaluates on every device's test split."""

    def write(data: Path) -> Federation:
        devices = synthetic(args.alpha, args.beta, devices=args.devices, seed=args.seed)
        order = np.random.default_rng(args.seed).permutation(args.devices)
        slow = {int(k) for k in order[: round(args.stragglers * args.devices)]}
        agents = []
        for k, device in enumerate(devices):
            path = data / f"device-{k}.npz"
            np.savez(path, x=device.x_train, y=device.y_train)
            agents.append(
                LocalAgent(
                    agent_id=f"device-{k:02d}",
                    dataset=path,
                    dataset_name="synthetic",
                    tags=("synthetic",),
                    labels={"example": "synthetic_fedprox"},
                    simulation={"partial_work": k in slow},
                )
            )
        holdout = data / "synthetic-test.npz"
        np.savez(
            holdout,
            x=np.concatenate([d.x_test for d in devices]),
            y=np.concatenate([d.y_test for d in devices]),
        )
        return Federation(
            agents=tuple(agents),
            holdout=holdout,
            holdout_name="synthetic-test",
            job=job,
            algorithm=label,
            title=f"{label} on Synthetic({args.alpha:g},{args.beta:g}), seed {args.seed}",
            base_dir=HERE,
        )

    return write


def job_for(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The example's job file, with the fleet size and the number of rounds asked for."""
    job: dict[str, Any] = copy.deepcopy(load_yaml(JOBS[name].read_text(encoding="utf-8")))
    job["algorithm"]["concurrency"] = args.devices
    job["algorithm"]["min_trainers"] = args.devices
    job["algorithm"]["clients_per_round"] = min(args.clients_per_round, args.devices)
    job["stop"] = {"max_versions": args.rounds}
    return job


def run(name: str, args: argparse.Namespace) -> DemoSummary:
    options = DemoOptions(
        agents=args.devices,
        broker=args.broker,
        out=Path(args.out) / name,
        target_accuracy=None,
        max_seconds=args.max_seconds,
        agents_per_process=args.agents_per_process,
    )
    label = {"fedprox": "FedProx (μ = 1)", "fedavg": "FedAvg"}[name]
    began = time.monotonic()
    print(f"{name}: {args.devices} agents, {args.rounds} rounds ...", file=sys.stderr, flush=True)
    summary = asyncio.run(Demo(options, scenario=scenario(job_for(name, args), label, args)).run())
    print(f"{name}: done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    return summary


def per_device_accuracy(summary: DemoSummary, devices: list[Device]) -> float:
    """The final model's accuracy on each device's test split, averaged over devices
    (unweighted: the pooled accuracy above weighs devices by their size)."""
    import onnxruntime as ort

    if summary.model is None:
        return float("nan")
    session = ort.InferenceSession(summary.model, providers=["CPUExecutionProvider"])
    scores = []
    for device in devices:
        (logits,) = session.run(["logits"], {"x": device.x_test})
        scores.append(float(np.mean(np.argmax(logits, axis=1) == device.y_test)))
    return float(np.mean(scores))


def plot(results: dict[str, DemoSummary], path: Path, args: argparse.Namespace) -> Path:
    return save_curves(
        path,
        {
            summary.algorithm: [(i, a) for i, (_, a) in enumerate(summary.history)]
            for summary in results.values()
        },
        xlabel="round",
        ylabel="test accuracy (all devices' test splits)",
        title=(
            f"Synthetic({args.alpha:g},{args.beta:g}), {args.devices} devices, "
            f"{args.stragglers:.0%} stragglers, seed {args.seed}"
        ),
        ylim=(0, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="data, stragglers and sampling")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--stragglers", type=float, default=0.5, help="share of the devices")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--broker", default=None, help="an MQTT broker URL (default: embedded)")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument(
        "--agents-per-process",
        type=int,
        default=6,
        help="agents each ember-agent process hosts (each its own identity and connection)",
    )
    parser.add_argument("--out", default="synthetic_fedprox")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    results = {name: run(name, args) for name in JOBS}
    devices = synthetic(args.alpha, args.beta, devices=args.devices, seed=args.seed)
    for name, summary in results.items():
        accuracy = [a for _, a in summary.history]
        print(
            f"{name:8s} final accuracy {summary.final_accuracy:.4f}  "
            f"(last 10 rounds {np.mean(accuracy[-10:]):.4f}, "
            f"per-device mean {per_device_accuracy(summary, devices):.4f}, "
            f"{summary.model_versions} rounds, {summary.job_seconds:.0f} s)"
        )
    gap = results["fedprox"].final_accuracy - results["fedavg"].final_accuracy
    print(f"FedProx ahead of FedAvg by {gap:+.4f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"plot: {plot(results, Path(args.out) / 'fedprox_vs_fedavg.png', args)}")


if __name__ == "__main__":
    main()

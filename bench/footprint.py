"""What a device pays: Ember's agent against Flower's SuperNode, idle, and the agent training.

* Ember, idle: ``ember-agent run`` with the digits dataset on a mosquitto of our own
  (:func:`bench.agent_footprint.measure`): RSS after the idle window, CPU over it. The agent
  runs as a device installs it, Ember with its base dependencies only, from
  ``bench/.agent-venv`` (made once): in the development environment structlog also imports
  rich and pygments, which no device has and which would count in the agent's memory.
* Flower, idle: one ``flower-supernode --insecure`` connected to a ``flower-superlink`` on
  loopback, and the SuperExec it starts to run ClientApps: RSS of both processes together and
  their CPU over the same window. (Each training message then starts a ClientApp process as
  well; idle, there is none.)
* Ember, training: ``ember demo`` with two agents (FedBuff, onnxruntime, continuous local
  training against an unreachable target accuracy), one agent process sampled while it trains.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from agent.logs import configure_logging
from bench.agent_footprint import measure as agent_idle
from bench.common import FLOWER, REPO, cpu_seconds, scaled, show, write_results

MB = 1e6
AGENT_VENV = Path(__file__).resolve().parent / ".agent-venv"


def agent_python() -> tuple[str, str]:
    """The interpreter of a base install of Ember (made if missing) and what it is; the
    benchmark's own interpreter if the install fails."""
    python = AGENT_VENV / "bin" / "python"
    done = AGENT_VENV / "installed"
    if not done.exists():
        print(f"installing Ember with its base dependencies into {AGENT_VENV} (once)", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(AGENT_VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO)], check=True)
        except subprocess.CalledProcessError:
            return sys.executable, "development environment"
    return str(python), "base install"


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            total += cpu_seconds(process)
        except psutil.Error:
            continue
    return total


def _rss(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / MB


async def flower_idle(work: Path, idle_from: float, idle_until: float) -> dict[str, Any]:
    from bench.flower import FlowerFederation

    with FlowerFederation(work / "flower", [{"partition-id": 0}]) as fed:
        started = time.monotonic()
        await asyncio.sleep(idle_from)
        processes = fed.node_processes(0)
        before = _cpu_seconds(processes)
        mark = time.monotonic()
        await asyncio.sleep(idle_until - idle_from)
        busy = _cpu_seconds(processes) - before
        window = time.monotonic() - mark
        names = sorted(p.name() for p in processes)
        rss = _rss(processes)
        supernode_rss = _rss(processes[:1])
    return {
        "flower_idle_rss_mb": round(rss, 1),
        "flower_supernode_rss_mb": round(supernode_rss, 1),
        "flower_superexec_rss_mb": round(rss - supernode_rss, 1),
        "flower_idle_cpu_percent": round(100 * busy / window, 3),
        "flower_processes": ", ".join(names),
        "flower_after_s": round(time.monotonic() - started, 1),
    }


async def agent_training(work: Path, warmup: float, window: float) -> dict[str, Any]:
    from coordinator.demo.run import Demo, DemoOptions

    options = DemoOptions(
        agents=2,
        out=work / "demo",
        target_accuracy=1.0,
        max_seconds=warmup + window + 5,
    )
    demo = Demo(options)
    runner = asyncio.create_task(demo.run())
    try:
        while demo.progress.updates < 1:  # the trainers are at work
            if runner.done():
                runner.result()
                raise RuntimeError("the demo ended before it trained")
            await asyncio.sleep(0.1)
        trainer = [
            p
            for p in psutil.Process().children(recursive=True)
            if any(part.endswith("agent-0/agent.toml") for part in _cmdline(p))
        ]
        if not trainer:
            raise RuntimeError("no trainer agent process found")
        await asyncio.sleep(warmup)
        before = _cpu_seconds(trainer)
        mark = time.monotonic()
        peak = 0.0
        while time.monotonic() - mark < window:
            peak = max(peak, _rss(trainer))
            await asyncio.sleep(0.5)
        busy = _cpu_seconds(trainer) - before
        elapsed = time.monotonic() - mark
        updates = demo.progress.updates
    finally:
        summary = await runner
    return {
        "agent_training_rss_mb": round(peak, 1),
        "agent_training_cpu_percent": round(100 * busy / elapsed, 1),
        "training_updates_applied": summary.updates_applied or updates,
    }


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


async def run() -> dict[str, Any]:
    idle_from, idle_until = scaled((30.0, 60.0), (3.0, 5.0))
    figures: dict[str, Any] = {"idle_window_s": [idle_from, idle_until]}
    with tempfile.TemporaryDirectory(prefix="ember-footprint-") as tmp:
        work = Path(tmp)
        (work / "agent").mkdir()
        python, installed = await asyncio.to_thread(agent_python)
        figures["agent_installed_as"] = installed
        agent = await agent_idle(work / "agent", idle_from, idle_until, python)
        figures.update({f"agent_{k}": v for k, v in agent.items()})
        if FLOWER:
            figures.update(await flower_idle(work, idle_from, idle_until))
            figures["agent_vs_flower_rss"] = (
                figures["agent_idle_rss_mb"] / figures["flower_idle_rss_mb"]
            )
        figures.update(await agent_training(work, *scaled((5.0, 20.0), (1.0, 3.0))))
    return figures


def main() -> None:
    configure_logging("warning")
    figures = asyncio.run(run())
    rows = [
        ["Ember agent, idle", figures["agent_idle_rss_mb"], figures["agent_idle_cpu_percent"]],
        [
            "Ember agent, training (FedBuff, onnxruntime)",
            figures["agent_training_rss_mb"],
            figures["agent_training_cpu_percent"],
        ],
    ]
    if "flower_idle_rss_mb" in figures:
        rows.insert(
            1,
            [
                "Flower SuperNode + SuperExec, idle",
                figures["flower_idle_rss_mb"],
                figures["flower_idle_cpu_percent"],
            ],
        )
    show("device footprint", ["process", "RSS MB", "CPU % of one core"], rows)
    print(f"wrote {write_results('footprint', figures)}")


def summary(figures: dict[str, Any]) -> list[str]:
    idle_from, idle_until = figures["idle_window_s"]
    lines = [
        f"RSS at the end of the idle window, CPU over it ({idle_from:g}–{idle_until:g} s after "
        f"start); the agent as a {figures.get('agent_installed_as', 'development environment')}"
        ". Bar: idle agent RSS ≤ 1/5 of SuperNode + SuperExec.",
        "",
        "| process | RSS (MB) | CPU (% of one core) | vs Flower RSS |",
        "|---|---:|---:|---:|",
    ]
    ratio = figures.get("agent_vs_flower_rss")
    lines.append(
        f"| Ember agent, idle | {figures['agent_idle_rss_mb']:.1f} | "
        f"{figures['agent_idle_cpu_percent']:.2f} | "
        f"{'n/a' if ratio is None else f'{ratio:.2f}'} |"
    )
    if "flower_idle_rss_mb" in figures:
        lines.append(
            f"| Flower SuperNode ({figures['flower_supernode_rss_mb']:.1f}) + SuperExec "
            f"({figures['flower_superexec_rss_mb']:.1f}), idle | "
            f"{figures['flower_idle_rss_mb']:.1f} | {figures['flower_idle_cpu_percent']:.2f} | "
            "1.00 |"
        )
    lines.append(
        f"| Ember agent, training (FedBuff, onnxruntime, digits) | "
        f"{figures['agent_training_rss_mb']:.1f} | {figures['agent_training_cpu_percent']:.1f} "
        "| |"
    )
    return lines


if __name__ == "__main__":
    main()

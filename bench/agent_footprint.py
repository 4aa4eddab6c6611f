"""What the agent costs a device when it has nothing to do.

A fresh state directory (as on a new install), the issue's example configuration (the digits
dataset, default telemetry every 10 s, zeroconf on every interface) and a mosquitto of our own
on loopback. Measured on the ``ember-agent run`` process itself, child processes excluded (the
one-off runtime probe is a child that exits within seconds):

* start to retained online: from spawning the process to a subscriber receiving the retained
  ``online`` status (imports, config, dataset check, connect, publish);
* resident memory (RSS, and USS: the pages only this process holds) after 60 s;
* CPU over the idle window from 30 s to 60 s, as a percentage of one core.

Targets (issue 3): RSS ≤ 60 MB, idle CPU ≤ 1 %, start to online ≤ 2 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from agent.logs import configure_logging
from agent.transport import BrokerConfig, Transport
from bench.common import show, write_results
from coordinator.mosquitto import MosquittoProcess

REPO = Path(__file__).resolve().parent.parent
IDLE_FROM = 30.0
IDLE_UNTIL = 60.0


def digits(path: Path) -> Path:
    try:
        from sklearn.datasets import load_digits

        data = load_digits()
        x, y = data.data.astype(np.float32), data.target
    except ImportError:  # the same shape without scikit-learn
        rng = np.random.default_rng(0)
        x = rng.integers(0, 17, (1797, 64)).astype(np.float32)
        y = np.arange(1797) % 10
    np.savez(path, x=x, y=y)
    return path


async def measure(
    work: Path,
    idle_from: float = IDLE_FROM,
    idle_until: float = IDLE_UNTIL,
    python: str = sys.executable,
) -> dict[str, float | int | str]:
    broker = MosquittoProcess(work / "mosquitto").start()
    try:
        config = work / "agent.toml"
        config.write_text(
            f"""
[agent]
id = "pi-kitchen"
state_dir = "{work / "state"}"
labels = {{ site = "kitchen" }}
[broker]
url = "{broker.url}"
[[datasets]]
name = "digits"
path = "{digits(work / "digits.npz")}"
tags = ["vision"]
"""
        )
        status_topic = "ember/v1/agents/pi-kitchen/status"
        async with Transport(BrokerConfig(urls=(broker.url,))) as watcher:
            await watcher.wait_connected(5)
            status = await watcher.subscribe(status_topic)
            info = await watcher.subscribe("ember/v1/agents/pi-kitchen/info")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            started = time.perf_counter()
            child = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "agent.cli",
                "run",
                "--config",
                str(config),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
            )
            try:
                while True:
                    message = await status.get(timeout=30)
                    if json.loads(bytes(message.payload))["state"] == "online":
                        break
                to_online = time.perf_counter() - started
                document = json.loads(bytes((await info.get(timeout=60)).payload))
                to_info = time.perf_counter() - started
                process = psutil.Process(child.pid)
                await asyncio.sleep(max(0.0, idle_from - (time.perf_counter() - started)))
                cpu_from = process.cpu_times()
                mark = time.perf_counter()
                await asyncio.sleep(idle_until - idle_from)
                cpu_until = process.cpu_times()
                window = time.perf_counter() - mark
                memory = process.memory_full_info()
                threads = process.num_threads()
                busy = (cpu_until.user - cpu_from.user) + (cpu_until.system - cpu_from.system)
                stop_at = time.perf_counter()
                child.send_signal(signal.SIGTERM)
                exit_code = await asyncio.wait_for(child.wait(), 20)
                to_stop = time.perf_counter() - stop_at
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        samples = document["datasets"][0]["samples"]
        return {
            "start_to_online_s": round(to_online, 3),
            "start_to_info_s": round(to_info, 3),
            "idle_rss_mb": round(memory.rss / 1e6, 1),
            "idle_uss_mb": round(memory.uss / 1e6, 1),
            "idle_cpu_percent": round(100 * busy / window, 3),
            "threads": threads,
            "stop_s": round(to_stop, 3),
            "exit_code": exit_code,
            "dataset_samples": samples,
            "cores": psutil.cpu_count() or 1,
        }
    finally:
        broker.stop()


def main() -> None:
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="ember-footprint-") as tmp:
        figures = asyncio.run(measure(Path(tmp)))
    checks = {
        "start_to_online_s": 2.0,
        "idle_rss_mb": 60.0,
        "idle_cpu_percent": 1.0,
    }
    rows = []
    for name, value in figures.items():
        limit = checks.get(name)
        verdict = "" if limit is None else ("ok" if float(value) <= limit else "OVER")
        rows.append([name, value, "" if limit is None else f"≤ {limit:g}", verdict])
    show("Agent footprint (idle, 60 s)", ["figure", "value", "target", ""], rows)
    write_results("agent_footprint", figures)


if __name__ == "__main__":
    main()

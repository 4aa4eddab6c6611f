"""What every benchmark shares: timing, scale, a broker of its own, results files and tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from coordinator.mosquitto import MosquittoProcess

RESULTS = Path(os.environ.get("EMBER_BENCH_RESULTS") or Path(__file__).parent / "results")
CACHE = Path(__file__).parent / ".cache"
"""Exported models and the like, rebuilt when missing (git-ignored)."""
REPO = Path(__file__).resolve().parent.parent
console = Console()

QUICK = os.environ.get("EMBER_BENCH_QUICK") == "1"
"""Tiny sizes and short windows (``bench/run.py --quick``, the smoke test): the parts run end to
end in seconds, and their figures mean nothing."""


FLOWER = os.environ.get("EMBER_BENCH_NO_FLOWER") != "1"
"""Measure the Flower side too (``--no-flower`` skips it)."""


def scaled(full: Any, quick: Any) -> Any:
    """``quick`` under ``--quick``, else ``full``."""
    return quick if QUICK else full


def best_of(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Fastest wall time of ``repeat`` calls, in seconds (the least disturbed run)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation; ``nan`` for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine_load() -> dict[str, Any]:
    """How busy the machine was when a figure was taken (the figures are only as good as this)."""
    load1, load5, _ = os.getloadavg()
    return {
        "cores": psutil.cpu_count() or 1,
        "load_1min": round(load1, 2),
        "load_5min": round(load5, 2),
        "memory_available_mb": round(psutil.virtual_memory().available / 1e6),
    }


def write_results(name: str, figures: Mapping[str, Any]) -> Path:
    """``bench/results/<name>.json``: the figures, the scale they ran at and their provenance."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        **figures,
        "quick": QUICK,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{f"machine_{k}": v for k, v in machine_load().items()},
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def read_results(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def show(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


Measure = Callable[[MosquittoProcess, Path], Awaitable[dict[str, Any]]]
"""One run of a measurement, given a broker of its own and a working directory."""


async def best_run(trials: int, key: str, measure: Measure) -> dict[str, Any]:
    """``measure(broker, workdir)`` run ``trials`` times, each on a broker of its own (nothing
    queued from the last run): see :func:`best_mb_s`. Runs of the same code here differ by up to
    a tenth."""
    return best_mb_s([await own_broker_run(measure) for _ in range(trials)], key)


async def own_broker_run(measure: Measure) -> dict[str, Any]:
    """``measure(broker, workdir)`` once, on a broker of its own in a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        broker = bench_broker(Path(tmp) / "broker")
        try:
            return await measure(broker, Path(tmp))
        finally:
            broker.stop()


def best_mb_s(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The figures of the run with the most ``<key>_mb_s``, and every run's under
    ``<key>_runs_mb_s``."""
    best = dict(max(runs, key=lambda run: run[f"{key}_mb_s"]))
    best[f"{key}_runs_mb_s"] = [round(run[f"{key}_mb_s"], 1) for run in runs]
    return best


def bench_broker(workdir: Path, *, connections: int = 0) -> MosquittoProcess:
    """A mosquitto of the benchmark's own on loopback, started.

    No per-client queue limit in messages (chunks are messages), a bound in bytes instead so a
    slow subscriber cannot eat the machine's memory; ``connections`` raises the open-files limit
    the broker inherits (it needs one descriptor per client).
    """
    if connections:
        raise_open_files(connections + 1000)
    extra = "\n".join(
        [
            "max_connections -1",
            "max_queued_messages 0",
            f"max_queued_bytes {1 << 30}",
            "max_inflight_messages 0",
            "set_tcp_nodelay true",
        ]
    )
    # The allocator thresholds Ember's processes set for themselves (agent.memory), for the
    # broker that both the ceiling and every Ember figure go through: without them it page-
    # faults on every chunk it stores (mosquitto allocates each message's payload afresh).
    from agent.memory import MMAP_THRESHOLD, trim_threshold

    memory = psutil.virtual_memory().total
    malloc = {
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(trim_threshold(memory)),
    }
    broker = MosquittoProcess(workdir, extra_config=extra, environment=malloc)
    return broker.start()


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time (user and system) ``process`` has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft open-files limit towards ``wanted`` (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class Flood:
    """``bench.flood`` in a child process: start it, wait until every publisher is connected,
    let them all go at once, collect what they sent."""

    def __init__(self, config: Mapping[str, Any], module: str = "bench.flood") -> None:
        self.config = dict(config)
        self.module = module
        """The child's module: ``bench.flood``, or another that speaks the same ready/go/result
        lines (``bench.shard_host``)."""
        self.process: Any = None

    async def __aenter__(self) -> Flood:
        import asyncio
        import sys

        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            json.dumps(self.config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=str(REPO),
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 300)
        if line.strip() != b"ready":
            await self.process.wait()
            raise RuntimeError(f"{self.module} did not start: {line!r}")
        return self

    def go(self) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")

    def credit(self, messages: int = 1) -> None:
        """A line after ``go`` for a raw flood with a ``window``: its publishers may send
        ``messages`` more (the receiver has taken that many)."""
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(b"%d\n" % messages)

    def stop(self) -> None:
        """The second line: a child that runs until told (``bench.shard_host``) ends."""
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(b"stop\n")

    async def result(self) -> dict[str, Any]:
        import asyncio

        assert self.process is not None
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 600)
        await self.process.wait()
        if not line.strip():
            raise RuntimeError(f"{self.module} exited with {self.process.returncode}")
        loaded: dict[str, Any] = json.loads(line)
        return loaded

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def time_to_target(value: Any) -> str:
    """A time-to-accuracy figure for a table: seconds, or "not reached"."""
    return "not reached" if value is None else f"{value:.1f}"

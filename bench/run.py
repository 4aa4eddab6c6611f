"""Ember's benchmarks: ``python bench/run.py all`` or parts by name (``ceiling``, ...).

Each part prints a table and writes ``bench/results/<name>.json``; after every run
``bench/results/SUMMARY.md`` is written again from all the JSON files there, so the summary
holds exactly what was measured. Every figure that claims a speed is a ratio against a
baseline measured on the same machine: the broker's ceiling, Flower, or Ember's own other mode.

``--quick`` runs every part with tiny sizes and short windows (seconds each; the figures mean
nothing) and writes to a scratch directory unless ``--results`` says otherwise. ``all`` takes
about 30 minutes on a 2-core machine; Flower is installed into ``bench/.flower-venv`` the first
time a part needs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = {
    "ceiling": "bench.ceiling",
    "aggregate": "bench.aggregate",
    "sharded": "bench.sharded",
    "latency": "bench.latency",
    "footprint": "bench.footprint",
    "time_to_accuracy": "bench.time_to_accuracy",
    "oort": "bench.oort",
    "fleet": "bench.fleet",
    "codec": "bench.codec",
    "agent_footprint": "bench.agent_footprint",
    "train_step": "bench.train_step",
}
"""In the order ``all`` runs them (aggregate reads the ceiling measured before it)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=[*PARTS, "all", "summary"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the parts run")
    parser.add_argument("--results", type=Path, help="where the JSON files and SUMMARY.md go")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower side")
    args = parser.parse_args()
    if args.quick:
        os.environ["EMBER_BENCH_QUICK"] = "1"
    if args.no_flower:
        os.environ["EMBER_BENCH_NO_FLOWER"] = "1"
    results = args.results or (
        Path(tempfile.mkdtemp(prefix="ember-bench-")) if args.quick else None
    )
    if results is not None:
        os.environ["EMBER_BENCH_RESULTS"] = str(results)
    names = list(PARTS) if "all" in args.parts else [p for p in args.parts if p != "summary"]
    from agent.memory import tune_allocator
    from bench import summary

    tune_allocator()  # as ember-agent run does (this process hosts aggregators and receivers)

    failed = []
    for name in names:
        began = time.monotonic()
        try:
            importlib.import_module(PARTS[name]).main()
        except Exception as exc:  # one broken part must not lose the others' figures
            failed.append(name)
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            import traceback

            traceback.print_exc()
        print(f"{name}: {time.monotonic() - began:.0f} s", flush=True)
    print(f"wrote {summary.write()}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

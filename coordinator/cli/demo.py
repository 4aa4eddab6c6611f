"""``ember demo``: the quick start's one command."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.cli._common import fail
from coordinator.demo.run import Demo, DemoError, DemoOptions, DemoSummary, Progress, demo_available


@click.command()
@click.option(
    "--agents",
    default=6,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Local agent processes (trainers).",
)
@click.option(
    "--algorithm",
    default="fedbuff",
    show_default=True,
    type=click.Choice(["fedbuff", "fedavg"]),
    help="FedBuff (async) or synchronous FedAvg rounds.",
)
@click.option(
    "--backend",
    default="onnxruntime",
    show_default=True,
    type=click.Choice(["onnxruntime", "torch", "auto"]),
    help="How agents train; torch needs the torch extra. auto: every other agent allows code "
    "and trains with torch, the others with onnxruntime, in one job.",
)
@click.option(
    "--broker",
    "broker_url",
    default=None,
    metavar="URL",
    help="Use this MQTT broker instead of the embedded one.",
)
@click.option(
    "--out",
    default="ember-demo",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the plot, the model and the summary go.",
)
@click.option(
    "--target-accuracy",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Stop when the held-out accuracy reaches this.",
)
@click.option(
    "--max-seconds",
    default=100.0,
    show_default=True,
    type=click.FloatRange(5),
    help="Stop training after this long.",
)
@click.option(
    "--stragglers",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of the agents that play slow devices.",
)
@click.option(
    "--slowdown",
    default=10.0,
    show_default=True,
    type=click.FloatRange(1),
    help="How many times slower the stragglers train.",
)
@click.option(
    "--topology",
    default="two_tier",
    show_default=True,
    type=click.Choice(["two_tier", "hierarchical", "hybrid"]),
    help="hierarchical: a middle aggregator per site; hybrid: ring all-reduce per site.",
)
@click.option(
    "--sites",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="With --topology hierarchical or hybrid: how many sites the agents are spread over.",
)
@click.option(
    "--shards",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="With --algorithm fedbuff: split the aggregator into this many shards, one process each.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the data split.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line.")
def demo(
    agents: int,
    algorithm: str,
    backend: str,
    broker_url: str | None,
    out: Path,
    target_accuracy: float,
    max_seconds: float,
    seed: int,
    stragglers: float,
    slowdown: float,
    topology: str,
    sites: int,
    shards: int,
    as_json: bool,
) -> None:
    """Train a model on scikit-learn's digits across local agents, end to end.

    Starts an embedded MQTT broker (unless --broker), a coordinator and --agents agent
    processes holding Dirichlet(0.5) non-IID shards, runs a federated job, then prints a
    summary and writes accuracy.png, model.onnx and summary.json to --out.
    """
    problem = demo_available()
    if problem:
        fail(problem)
    if shards > 1 and (algorithm != "fedbuff" or topology != "two_tier"):
        fail("--shards: sharded aggregation runs with --algorithm fedbuff and --topology two_tier")
    if backend in ("torch", "auto"):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            fail(f"--backend {backend} needs torch: pip install 'ember-fl[torch]'")
    options = DemoOptions(
        agents=agents,
        algorithm=algorithm,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        broker=broker_url,
        out=out,
        target_accuracy=target_accuracy,
        max_seconds=max_seconds,
        seed=seed,
        stragglers=stragglers,
        slowdown=slowdown,
        topology=topology,  # type: ignore[arg-type]
        sites=sites,
        shards=shards,
    )
    logging.getLogger().setLevel(logging.ERROR)
    console = Console(stderr=as_json)
    try:
        summary = asyncio.run(_run(options, console))
    except DemoError as exc:
        fail(str(exc))
    console.print(_summary_table(summary))
    if as_json:
        click.echo(json.dumps(summary.to_dict()))


async def _run(options: DemoOptions, console: Console) -> DemoSummary:
    with Live(
        _status(Progress(), options), console=console, refresh_per_second=8, transient=True
    ) as live:

        def show(progress: Progress) -> None:
            live.update(_status(progress, options))

        return await Demo(options, show).run()


def _status(progress: Progress, options: DemoOptions) -> Table:
    table = Table.grid(padding=(0, 2))
    accuracy = "–" if progress.accuracy is None else f"{progress.accuracy:.3f}"
    bar_width = 30
    target = options.target_accuracy or 1.0
    filled = (
        0 if progress.accuracy is None else int(bar_width * min(1.0, progress.accuracy / target))
    )
    table.add_row(
        f"[bold]{progress.phase}[/bold]",
        f"agents online {progress.agents_online}/{options.agents + options.shards}",
        f"model version {progress.version}",
        f"updates {progress.updates}",
        f"accuracy {accuracy} [green]{'█' * filled}[/green]"
        f"[dim]{'░' * (bar_width - filled)}[/dim] target {target}",
    )
    return table


def _by_backend(backends: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for backend in backends.values():
        counts[backend] = counts.get(backend, 0) + 1
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "–"


def _summary_table(summary: DemoSummary) -> Table:
    table = Table(title="ember demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("outcome", f"{summary.phase}: {summary.reason}"),
        ("final accuracy (held-out)", f"{summary.final_accuracy:.4f}"),
        ("model versions", str(summary.model_versions)),
        ("updates applied", str(summary.updates_applied)),
        (
            "agents",
            f"{summary.agents} trainers + 1 aggregator"
            + (f" ({summary.stragglers} slow)" if summary.stragglers else ""),
        ),
        ("algorithm / backend", f"{summary.algorithm} / {summary.backend}"),
        ("trainers by backend", _by_backend(summary.backends)),
        ("training time", f"{summary.job_seconds:.1f} s (all in {summary.seconds:.1f} s)"),
        (
            "time to target",
            "–" if summary.time_to_target is None else f"{summary.time_to_target:.1f} s",
        ),
        ("accuracy plot", summary.plot or "–"),
        ("final model (ONNX)", summary.model or "–"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table

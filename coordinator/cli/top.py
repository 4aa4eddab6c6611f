"""``ember top``: the fleet and its jobs, live in the terminal, read straight from the broker.

It subscribes to the retained agent documents (status, info, roles), the agents' telemetry and
the retained job states and metric events (see docs/topics.md), folds them with the
coordinator's own :class:`~coordinator.registry.Registry` and a
:class:`~coordinator.jobboard.JobBoard`, and redraws with rich's ``Live``. No coordinator RPC:
it works wherever a subscriber may read the topics, with or without ``ember serve`` running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from coordinator.cli._common import (
    Connection,
    broker_transport,
    connection,
    connection_options,
    console,
)
from coordinator.cli.jobs import PHASE_STYLE

SPARKS = "▁▂▃▄▅▆▇█"


# -- small pieces of text ------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """The last ``width`` values as block characters, scaled between their minimum and
    maximum (a flat series sits in the middle)."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    low, high = min(tail), max(tail)
    if high - low < 1e-12:
        return SPARKS[len(SPARKS) // 2 - 1] * len(tail)
    top = len(SPARKS) - 1
    return "".join(SPARKS[round((v - low) / (high - low) * top)] for v in tail)


def bar(fraction: float, width: int = 20) -> str:
    """A progress bar that reads without colour: ``█████░░░░░``."""
    filled = round(min(1.0, max(0.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


def age(seconds: float | None) -> str:
    """A duration in its largest unit: ``42s``, ``3m``, ``2h``, ``1d``."""
    if seconds is None:
        return ""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stop_rules(stop: Any) -> str:
    """The job's stop rules in a few words: ``acc ≥ 0.95 · 50 versions · 10 min``."""
    if not isinstance(stop, Mapping):
        return ""
    parts = []
    if _num(stop.get("target_accuracy")) is not None:
        parts.append(f"acc ≥ {stop['target_accuracy']:g}")
    if _num(stop.get("max_versions")) is not None:
        parts.append(f"{stop['max_versions']:g} versions")
    if _num(stop.get("max_updates")) is not None:
        parts.append(f"{stop['max_updates']:g} updates")
    if _num(stop.get("max_minutes")) is not None:
        parts.append(f"{stop['max_minutes']:g} min")
    return " · ".join(parts)


def _percent(value: Any) -> str:
    number = _num(value)
    return "" if number is None else f"{number:.0f}%"


def _temperature(telemetry: Mapping[str, Any]) -> str:
    hottest = _num(telemetry.get("temperature_max"))
    if hottest is not None:
        return f"{hottest:.0f}°C"
    readings = telemetry.get("temperature")
    values = (
        [v for v in (_num(x) for x in readings.values()) if v is not None]
        if isinstance(readings, Mapping)
        else []
    )
    return f"{max(values):.0f}°C" if values else ""


def _trainers(counts: Any, stragglers: Any = None) -> str:
    if not isinstance(counts, Mapping):
        return ""
    numbers = {k: v for k, v in counts.items() if isinstance(v, int)}
    total = sum(v for k, v in numbers.items() if k != "standby")
    text = f"{numbers.get('running', 0)}/{total}" if total else "0"
    lagging = len(stragglers) if isinstance(stragglers, list) else 0
    return f"{text} · {lagging} lagging" if lagging else text


# -- the frame -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """What one redraw shows: the agents, the jobs and where they were read from."""

    agents: Sequence[Any]
    """:class:`coordinator.registry.AgentView` snapshots."""
    jobs: Sequence[Any]
    """:class:`coordinator.jobboard.JobView` snapshots."""
    source: str
    now: float
    connected: bool = True
    role_progress: Callable[[str, str, str], Mapping[str, Any] | None] = lambda *_: None
    """``(job, agent, role)`` → what that role last reported (its ``state``: training, ...)."""


def render(frame: Frame) -> Any:
    """The whole screen as one rich renderable."""
    from rich.console import Group
    from rich.text import Text

    online = sum(1 for a in frame.agents if a.online)
    running = sum(1 for j in frame.jobs if j.phase == "running")
    clock = time.strftime("%H:%M:%S", time.localtime(frame.now))
    link = "" if frame.connected else "  [bold red]broker unreachable, retrying[/]"
    header = Text.from_markup(
        f"[bold]ember top[/]  {frame.source}  "
        f"agents [bold]{online}[/]/{len(frame.agents)} online  "
        f"jobs [bold]{running}[/] running/{len(frame.jobs)}  {clock}{link}"
    )
    return Group(header, agents_table(frame), jobs_table(frame))


def agents_table(frame: Frame) -> Any:
    from rich.table import Table

    table = Table(title="Agents", title_justify="left", box=None, pad_edge=False, expand=False)
    numbers = ("CPU", "MEM", "TEMP", "LOAD", "UPDATES", "SAMPLED")
    for column in ("AGENT", "STATE", "CPU", "MEM", "TEMP", "LOAD", "UPDATES", "ROLES", "SAMPLED"):
        table.add_column(
            column,
            justify="right" if column in numbers else "left",
            overflow="fold" if column == "ROLES" else "ellipsis",
        )
    if not frame.agents:
        table.add_row("[dim]no agents on this prefix yet[/]")
    for a in frame.agents:
        telemetry: Mapping[str, Any] = a.telemetry or {}
        memory = telemetry.get("memory")
        load = telemetry.get("load")
        if a.online:
            state = "[green]online[/]"
        else:
            reason = f" ({a.offline_reason})" if a.offline_reason else ""
            state = f"[red]offline{reason}[/]"
        roles = []
        for key, r in sorted(a.roles.items()):
            if r.state not in ("running", "starting", "failed", "refused"):
                continue
            live = frame.role_progress(r.job, a.id, r.role) if r.state == "running" else None
            doing = live.get("state") if live else r.state
            roles.append(f"{key} [dim]{doing}[/]" if isinstance(doing, str) else key)
        sent = _num(telemetry.get("updates_sent"))
        table.add_row(
            a.id,
            state,
            _percent(telemetry.get("cpu_percent")),
            _percent(memory.get("percent") if isinstance(memory, Mapping) else None),
            _temperature(telemetry),
            f"{load[0]:.2f}" if isinstance(load, list) and load and _num(load[0]) else "",
            "" if sent is None else f"{sent:.0f}",
            ", ".join(roles),
            age(frame.now - sampled) if (sampled := _num(telemetry.get("ts"))) else "",
        )
    return table


def jobs_table(frame: Frame) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Jobs", title_justify="left", box=None, pad_edge=False, expand=False)
    for column in ("JOB", "PHASE", "PROGRESS", "", "VERSION", "UPDATES", "ACCURACY", "CURVE"):
        table.add_column(
            column, justify="right" if column in ("", "VERSION", "UPDATES", "ACCURACY") else "left"
        )
    for column in ("TRAINERS", "STOP RULES", "AGE"):
        table.add_column(column, justify="right" if column != "STOP RULES" else "left")
    if not frame.jobs:
        table.add_row("[dim]no jobs on this prefix yet[/]")
    for job in frame.jobs:
        state = job.state
        done = job.progress(frame.now)
        style = PHASE_STYLE.get(job.phase, "")
        metrics = state.get("metrics") if isinstance(state.get("metrics"), Mapping) else {}
        accuracy = _num(metrics.get("accuracy"))
        curve = [a for _, a in job.curve()]
        started = _num(state.get("started"))
        finished = _num(state.get("finished"))
        table.add_row(
            job.id,
            Text(job.phase, style=style),
            Text(bar(done), style=style),
            f"{done * 100:.0f}%",
            str(state.get("model_version", "")),
            str(state.get("updates_applied", "")),
            "" if accuracy is None else f"{accuracy:.4f}",
            Text(sparkline(curve), style="cyan"),
            _trainers(state.get("trainers"), state.get("stragglers")),
            stop_rules(state.get("stop")),
            age((finished or frame.now) - started) if started is not None else "",
        )
    return table


# -- reading the broker --------------------------------------------------------------------------


@dataclass
class Watch:
    """The registry and the job board, fed by one MQTT connection."""

    registry: Any
    board: Any
    transport: Any

    def frame(self, source: str) -> Frame:
        return Frame(
            agents=self.registry.snapshot(),
            jobs=self.board.snapshot(),
            source=source,
            now=time.time(),
            connected=self.transport.connected,
            role_progress=self.board.role_progress,
        )

    async def settle(self, quiet: float, limit: float) -> None:
        """Wait until the retained documents have stopped arriving (no change for ``quiet``
        seconds), at most ``limit`` seconds: MQTT has no end-of-retained marker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        seen = -1
        while loop.time() < deadline:
            count = self.transport.stats.messages_in
            if count == seen:
                return
            seen = count
            await asyncio.sleep(min(quiet, max(0.0, deadline - loop.time())))


@contextlib.asynccontextmanager
async def watching(conn: Connection, *, timeout: float) -> AsyncIterator[Watch]:
    from coordinator.jobboard import JobBoard
    from coordinator.registry import Registry

    async with broker_transport(
        conn, timeout=timeout, name="ember-top", backoff_max=2.0
    ) as transport:
        registry = Registry(transport, conn.topics)
        board = JobBoard(transport, conn.topics)
        await registry.start()
        await board.start()
        try:
            yield Watch(registry, board, transport)
        finally:
            await board.stop()
            await registry.stop()


@click.command()
@connection_options
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option(
    "--interval",
    type=click.FloatRange(0.1),
    default=1.0,
    show_default=True,
    help="Seconds between redraws.",
)
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=3.0,
    show_default=True,
    help="With --once: at most this many seconds to gather the retained documents.",
)
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for the broker.",
)
def top(
    broker: str | None, prefix: str | None, once: bool, interval: float, wait: float, timeout: float
) -> None:
    """The fleet and its jobs, live: agents with health and roles, jobs with progress
    towards their stop rules and accuracy sparklines. Read from the broker's retained
    topics; Ctrl-C quits."""
    conn = connection(broker, prefix)
    source = f"{conn.broker} [dim]{conn.prefix}[/]"
    out = console()

    async def go() -> None:
        async with watching(conn, timeout=timeout) as watch:
            await watch.settle(quiet=0.3, limit=wait if once else 1.0)
            if once:
                out.print(render(watch.frame(source)))
                return
            if not out.is_terminal:  # batch mode, like top -b
                while True:
                    out.print(render(watch.frame(source)))
                    await asyncio.sleep(interval)
            from rich.live import Live

            with Live(render(watch.frame(source)), console=out, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(interval)
                    live.update(render(watch.frame(source)), refresh=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())

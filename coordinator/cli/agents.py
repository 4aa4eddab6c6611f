"""``ember agents``: the fleet as the coordinator sees it."""

from __future__ import annotations

import time
from typing import Any

import click

from coordinator.cli._common import (
    connection,
    connection_options,
    console,
    coordinator_client,
    print_json,
    run,
)
from coordinator.cli.jobs import json_option, timeout_option


@click.group()
def agents() -> None:
    """Agents on the broker (and on the LAN)."""


def _online(agent: dict[str, Any]) -> str:
    if agent.get("online"):
        return "[green]online[/]"
    if agent.get("lan"):
        return "[yellow]lan only[/]"
    return "[red]offline[/]"


def _cpu(agent: dict[str, Any]) -> str:
    cpu = agent.get("cpu") or {}
    text = f"{cpu['cores']} cores" if cpu.get("cores") else ""
    usage = (agent.get("telemetry") or {}).get("cpu_percent")
    if isinstance(usage, (int, float)):
        text += f" {usage:.0f}%"
    return text.strip()


def _memory(agent: dict[str, Any]) -> str:
    total = agent.get("memory_mb")
    text = (
        f"{total / 1024:.1f} GB"
        if isinstance(total, int) and total >= 1024
        else (f"{total} MB" if total else "")
    )
    memory = (agent.get("telemetry") or {}).get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("percent"), (int, float)):
        text += f" {memory['percent']:.0f}%"
    return text.strip()


def _datasets(agent: dict[str, Any]) -> str:
    return ", ".join(
        f"{d['name']}:{d['samples']}" if d.get("samples") is not None else d["name"]
        for d in agent.get("datasets", [])
    )


def _labels(agent: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((agent.get("labels") or {}).items()))


@agents.command("ls")
@connection_options
@timeout_option
@json_option
def agents_ls(broker: str | None, prefix: str | None, timeout: float, as_json: bool) -> None:
    """List agents: presence, labels, arch, CPU, memory, datasets and running roles."""
    from rich.table import Table

    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            return await client.call("agents.ls", timeout=timeout)

    rows = run(go)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no agents yet (start one with: ember-agent run --config agent.toml)")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("AGENT", "STATE", "LABELS", "ARCH", "CPU", "MEMORY", "DATASETS", "ROLES"):
        table.add_column(column, overflow="fold")
    for agent in rows:
        table.add_row(
            agent["agent"],
            _online(agent),
            _labels(agent),
            agent.get("arch") or "",
            _cpu(agent),
            _memory(agent),
            _datasets(agent),
            ", ".join(agent.get("running_roles", [])),
        )
    console().print(table)


@agents.command("show")
@click.argument("agent")
@connection_options
@timeout_option
@json_option
def agents_show(
    agent: str, broker: str | None, prefix: str | None, timeout: float, as_json: bool
) -> None:
    """Everything known about one agent."""
    from rich.table import Table

    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            return await client.call("agents.show", {"agent": agent}, timeout=timeout)

    a = run(go)
    if as_json:
        print_json(a)
        return
    out = console()
    since = a.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    out.print(f"[bold]{a['agent']}[/]  {_online(a)}{when} {a.get('reason') or ''}")
    runtimes = a.get("runtimes") or {}
    rows = [
        ("version", a.get("version")),
        ("os", a.get("os")),
        ("arch", a.get("arch")),
        ("cpu", " ".join(str(x) for x in ((a.get("cpu") or {}).get("model"), _cpu(a)) if x)),
        ("memory", _memory(a)),
        ("accelerators", ", ".join(a.get("accelerators") or []) or "none"),
        ("onnxruntime", runtimes.get("onnxruntime") or "no"),
        ("providers", ", ".join(runtimes.get("providers") or [])),
        ("torch", runtimes.get("torch") or "no"),
        ("labels", _labels(a)),
        ("lan", ", ".join((a.get("lan") or {}).get("addresses", [])) if a.get("lan") else ""),
        ("problems", ", ".join(a.get("problems") or [])),
    ]
    for label, value in rows:
        if value:
            out.print(f"  {label:<13} {value}")
    if a.get("datasets"):
        table = Table(title="Datasets", title_justify="left", box=None, pad_edge=False)
        for column in ("NAME", "TAGS", "SAMPLES", "FEATURES", "SCHEMA"):
            table.add_column(column)
        for d in a["datasets"]:
            table.add_row(
                d["name"],
                ",".join(d.get("tags") or []),
                "" if d.get("samples") is None else str(d["samples"]),
                "×".join(str(x) for x in d.get("feature_shape") or []),
                (d.get("schema_hash") or "")[:12],
            )
        out.print(table)
    if a.get("roles"):
        table = Table(title="Roles", title_justify="left", box=None, pad_edge=False)
        for column in ("JOB/ROLE", "STATE", "REASON"):
            table.add_column(column, overflow="fold")
        for key, r in a["roles"].items():
            table.add_row(key, r.get("state") or "", r.get("reason") or "")
        out.print(table)


def _duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` → seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected a duration such as 90s, 15m, 12h or 7d"
        ) from None


@agents.command("token")
@click.option(
    "--ttl", default="1h", show_default=True, help="How long the token is valid (s, m, h, d)."
)
@click.option("--id", "agent", default=None, help="Only an agent with this id may use it.")
@click.option("--aggregator", is_flag=True, help="The agent's login may host aggregator roles.")
@connection_options
@timeout_option
@json_option
def agents_token(
    ttl: str,
    agent: str | None,
    aggregator: bool,
    broker: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Make a one-time enrolment token and print the command that enrols a device with it.

    The coordinator keeps the token until it expires or an agent uses it; `ember-agent enroll`
    then receives the agent's broker login, the broker's CA and the coordinator's key.
    """
    conn = connection(broker, prefix)
    params = {"ttl": _duration(ttl), "agent": agent, "aggregator": aggregator}

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            return await client.call("agents.token", params, timeout=timeout)

    made = run(go)
    if as_json:
        print_json(made)
        return
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(made["expires_at"]))
    click.echo(made["token"])
    click.echo(f"valid until {expires}, once; on the device run:", err=True)
    click.echo(f"  {made['command']}", err=True)

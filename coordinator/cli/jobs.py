"""``ember jobs``: plan, submit, list, show, watch, export, report and cancel jobs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from coordinator.cli._common import (
    Connection,
    connection,
    connection_options,
    console,
    coordinator_client,
    fail,
    print_json,
    run,
    stderr,
)

TERMINAL = ("completed", "failed", "cancelled")
PHASE_STYLE = {
    "planned": "yellow",
    "dispatching": "cyan",
    "running": "green",
    "completed": "bold green",
    "failed": "bold red",
    "cancelled": "magenta",
}


Command = TypeVar("Command", bound=Callable[..., Any])


def _timeout_option(seconds: float, why: str = "") -> Callable[[Command], Command]:
    """``--timeout``: seconds to wait for the coordinator's answer (``why`` it may be long)."""
    return click.option(
        "--timeout",
        type=float,
        default=seconds,
        show_default=True,
        help=f"Seconds to wait for the coordinator's answer{why}.",
    )


timeout_option = _timeout_option(5.0)
model_timeout_option = _timeout_option(60.0, " (it reads the model from disk)")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def load_job_file(path: Path) -> Any:
    """The validated spec of a job file; a bad one ends the command with one line, exit 2."""
    from coordinator.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except SpecError as exc:
        fail(f"{path}: {exc}")


@click.group()
def jobs() -> None:
    """Federated learning jobs."""


# -- plan ----------------------------------------------------------------------------------------


@jobs.command("plan")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@connection_options
@timeout_option
@json_option
def jobs_plan(
    job_file: Path, broker: str | None, prefix: str | None, timeout: float, as_json: bool
) -> None:
    """Show which agents would take part in JOB_FILE's job, and why every other would not."""
    spec = load_job_file(job_file)
    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            return await client.call("jobs.plan", {"spec": spec.to_dict()}, timeout=timeout)

    result = run(go)
    if as_json:
        print_json(result)
        return
    print_plan(result)


def print_plan(plan: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    verdict = "[green]can start[/]" if plan.get("feasible") else "[yellow]cannot start yet[/]"
    out.print(f"[bold]{plan.get('job')}[/] ({plan.get('mode')}): {verdict}")
    for problem in plan.get("problems", []):
        out.print(f"  [yellow]•[/] {problem}")
    selected = Table(title="Selected", title_justify="left", box=None, pad_edge=False)
    for column in ("AGENT", "ROLE", "DATASET", "SAMPLES", "BACKEND", ""):
        selected.add_column(column)
    for s in plan.get("selected", []):
        selected.add_row(
            s["agent"],
            s["role"],
            s.get("dataset") or "",
            "" if s.get("samples") is None else str(s["samples"]),
            s.get("backend") or "",
            "standby" if s.get("standby") else "",
        )
    out.print(selected if plan.get("selected") else "[dim]no agent selected[/]")
    rejected = Table(title="Not taking part", title_justify="left", box=None, pad_edge=False)
    rejected.add_column("AGENT")
    rejected.add_column("REASON", overflow="fold")
    for r in plan.get("rejected", []):
        rejected.add_row(r["agent"], r["reason"])
    if plan.get("rejected"):
        out.print(rejected)


# -- submit --------------------------------------------------------------------------------------


@jobs.command("submit")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@connection_options
@timeout_option
@json_option
@click.option("--watch", "then_watch", is_flag=True, help="Watch the job after submitting it.")
def jobs_submit(
    job_file: Path,
    broker: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
    then_watch: bool,
) -> None:
    """Submit JOB_FILE's job; the coordinator places it as soon as the fleet can take it.

    A torch model is exported to ONNX here, on this machine, before it is sent.
    """
    from coordinator.bundles import model_artifacts

    spec = load_job_file(job_file)
    base_dir = job_file.resolve().parent
    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            shape = None
            if spec.model.torch is not None and spec.model.input_shape is None:
                shape = await _feature_shape(client, spec, timeout)
            if spec.model.torch is not None:
                stderr(f"exporting {spec.model.torch} to ONNX ...")
            built = await asyncio.to_thread(model_artifacts, spec, base_dir, input_shape=shape)
            size = sum(len(v) for v in built.artifacts.values())
            return await client.call(
                "jobs.submit",
                {"spec": spec.to_dict(), "artifacts": built.artifacts, "code": built.code},
                timeout=max(timeout, 30.0 + size / 1e6),
            )

    summary = run(go)
    if as_json:
        print_json(summary)
    else:
        click.echo(f"submitted {summary['job']} ({summary['phase']})")
        if summary.get("reason"):
            stderr(summary["reason"])
        if not then_watch:
            stderr(f"follow it with: ember jobs watch {summary['job']}")
    if then_watch:
        watch_job(conn, summary["job"], timeout)


async def _feature_shape(client: Any, spec: Any, timeout: float) -> list[int] | None:
    """The feature shape the matching datasets agree on (for exporting a torch model)."""
    plan = await client.call("jobs.plan", {"spec": spec.to_dict()}, timeout=timeout)
    shapes = {tuple(s["feature_shape"]) for s in plan.get("selected", []) if s.get("feature_shape")}
    return list(shapes.pop()) if len(shapes) == 1 else None


# -- ls / show -----------------------------------------------------------------------------------


def _age(ts: float | None) -> str:
    if not ts:
        return ""
    seconds = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _metric(metrics: dict[str, Any], name: str) -> str:
    value = metrics.get(name)
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def _trainers(counts: dict[str, int]) -> str:
    total = sum(n for state, n in counts.items() if state not in ("standby",))
    return f"{counts.get('running', 0)}/{total}" if total else "0"


@jobs.command("ls")
@connection_options
@timeout_option
@json_option
def jobs_ls(broker: str | None, prefix: str | None, timeout: float, as_json: bool) -> None:
    """List jobs, oldest first."""
    from rich.table import Table

    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            return await client.call("jobs.ls", timeout=timeout)

    rows = run(go)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no jobs (ember jobs submit job.yaml starts one)")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("JOB", "PHASE", "VERSION", "UPDATES", "ACCURACY", "TRAINERS", "AGE", "NOTE"):
        table.add_column(column, overflow="fold" if column == "NOTE" else "ellipsis")
    for job in rows:
        style = PHASE_STYLE.get(job["phase"], "")
        table.add_row(
            job["job"],
            f"[{style}]{job['phase']}[/]" if style else job["phase"],
            str(job["model_version"]),
            str(job["updates_applied"]),
            _metric(job.get("metrics") or {}, "accuracy"),
            _trainers(job.get("trainers") or {}),
            _age(job.get("submitted")),
            job.get("reason") or "",
        )
    console().print(table)


@jobs.command("show")
@click.argument("job")
@connection_options
@timeout_option
@json_option
def jobs_show(
    job: str, broker: str | None, prefix: str | None, timeout: float, as_json: bool
) -> None:
    """Show one job: phase, progress, metrics, its agents and its latest events."""
    from rich.table import Table

    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            return await client.call("jobs.show", {"job": job}, timeout=timeout)

    detail = run(go)
    if as_json:
        print_json(detail)
        return
    out = console()
    style = PHASE_STYLE.get(detail["phase"], "")
    out.print(
        f"[bold]{detail['job']}[/]  [{style}]{detail['phase']}[/]  {detail.get('reason', '')}"
    )
    spec = detail.get("spec", {})
    algo = spec.get("algorithm", {})
    out.print(
        f"  mode {algo.get('mode')}, buffer {algo.get('buffer_size')}, "
        f"concurrency {algo.get('concurrency')}, backend {spec.get('backend')}, "
        f"data {json.dumps(spec.get('data'))}"
    )
    out.print(
        f"  model version {detail['model_version']}, updates applied "
        f"{detail['updates_applied']}, progress {detail.get('progress', 0) * 100:.0f}%"
    )
    if detail.get("metrics"):
        text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(detail["metrics"].items()))
        out.print(f"  metrics: {text}")
    weights = detail.get("weights")
    if weights:
        kept = time.strftime("%H:%M:%S", time.localtime(weights["stored_at"]))
        final = ", final" if weights.get("final") else ""
        out.print(
            f"  model kept: version {weights['version']}{final}, stored {kept} "
            f"(ember jobs export {detail['job']} -o model.onnx)"
        )
    stamps = [
        (label, detail.get(key))
        for label, key in (
            ("submitted", "submitted"),
            ("started", "started"),
            ("ended", "finished"),
        )
    ]
    out.print(
        "  "
        + ", ".join(
            f"{label} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))}"
            for label, ts in stamps
            if ts
        )
    )
    table = Table(title="Agents", title_justify="left", box=None, pad_edge=False)
    for column in ("AGENT", "ROLE", "STATE", "DATASET", "SAMPLES", "REASON"):
        table.add_column(column, overflow="fold" if column == "REASON" else "ellipsis")
    for a in detail.get("assignments", []):
        table.add_row(
            a["agent"],
            a["role"],
            a["state"],
            a.get("dataset") or "",
            "" if a.get("samples") is None else str(a["samples"]),
            a.get("reason") or "",
        )
    out.print(table)
    events = detail.get("events", [])[-15:]
    if events:
        out.print("[bold]Events[/]")
        for e in events:
            extra = {k: v for k, v in e.items() if k not in ("seq", "job", "ts", "kind")}
            brief = ", ".join(
                f"{k}={len(v) if isinstance(v, (list, dict)) else v}"
                for k, v in extra.items()
                if v not in ("", None)
            )
            clock = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
            out.print(f"  {clock} {e['kind']} {brief}")


# -- watch ---------------------------------------------------------------------------------------


@jobs.command("watch")
@click.argument("job")
@connection_options
@timeout_option
def jobs_watch(job: str, broker: str | None, prefix: str | None, timeout: float) -> None:
    """Follow a job live (progress bar and latest metrics) until it ends.

    Exit status: 0 when it completed, 1 when it failed or was cancelled.
    """
    watch_job(connection(broker, prefix), job, timeout)


def _line(state: dict[str, Any]) -> str:
    metrics = state.get("metrics") or {}
    parts = [
        f"{state.get('phase')}",
        f"{state.get('progress', 0) * 100:5.1f}%",
        f"version {state.get('model_version', 0)}",
        f"updates {state.get('updates_applied', 0)}",
    ]
    parts += [f"{k} {metrics[k]:.4f}" for k in ("accuracy", "loss") if k in metrics]
    trainers = state.get("trainers") or {}
    parts.append(f"trainers {_trainers(trainers)}")
    if state.get("reason"):
        parts.append(f"({state['reason']})")
    return "  ".join(parts)


def watch_job(conn: Connection, job: str, timeout: float) -> None:
    from agent.transport import SubscriptionClosed

    async def go() -> dict[str, Any]:
        async with coordinator_client(conn, timeout=timeout) as client:
            detail = await client.call("jobs.show", {"job": job}, timeout=timeout)
            job_id = detail["job"]
            sub = await client.transport.subscribe(conn.topics.job_state(job_id), 1)
            out = console()
            state: dict[str, Any] = detail
            if not out.is_terminal:
                click.echo(f"{job_id}  {_line(state)}")
                last = _line(state)
                while state.get("phase") not in TERMINAL:
                    state = await _next_state(sub, state)
                    line = _line(state)
                    if line != last:
                        click.echo(f"{job_id}  {line}")
                        last = line
                return state
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=out,
            ) as bar:
                task = bar.add_task(job_id, total=1.0, info="")
                while True:
                    info = _line(state).split("  ", 2)[-1]
                    bar.update(
                        task,
                        completed=float(state.get("progress", 0.0)),
                        description=f"{job_id} {state.get('phase')}",
                        info=info,
                    )
                    if state.get("phase") in TERMINAL:
                        break
                    try:
                        state = await _next_state(sub, state)
                    except SubscriptionClosed:
                        break
            return state

    final = run(go)
    phase = final.get("phase")
    reason = f": {final['reason']}" if final.get("reason") else ""
    click.echo(f"{final.get('job')} {phase}{reason}")
    if phase != "completed":
        raise SystemExit(1)


async def _next_state(sub: Any, current: dict[str, Any]) -> dict[str, Any]:
    while True:
        message = await sub.get()
        try:
            state = json.loads(bytes(message.payload))
        except ValueError:
            continue
        if isinstance(state, dict) and state.get("job") == current.get("job"):
            return state


# -- export --------------------------------------------------------------------------------------


def _version(value: str) -> str | int:
    if value == "latest":
        return value
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'latest' or a version number, got {value!r}") from None
    if number < 0:
        raise click.BadParameter(f"a version number is ≥ 0, got {number}")
    return number


@jobs.command("export")
@click.argument("job")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    required=True,
    help="Where to write the model (an ONNX file).",
)
@click.option(
    "--version",
    "version",
    default="latest",
    show_default=True,
    help="Which model version: the coordinator keeps the newest one.",
)
@connection_options
@model_timeout_option
@json_option
def jobs_export(
    job: str,
    output: Path,
    version: str,
    broker: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Write JOB's model as an inference ONNX graph with its newest weights baked in.

    The graph is the job's inference graph (model.onnx.inference, or exported from torch);
    the weights are the newest version the coordinator kept (the final one once the job ended).
    The written model is run once with onnxruntime on a batch of zeros before this returns.
    """
    wanted = _version(version)
    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=min(timeout, 10.0)) as client:
            return await client.call(
                "jobs.export", {"job": job, "version": wanted}, timeout=timeout
            )

    exported = run(go)
    job_id = exported["job"]
    try:
        summary = _write_model(job_id, exported, output)
    except ModelWriteError as exc:
        fail(str(exc))
    if as_json:
        print_json(summary)
        return
    final = "final" if summary["final"] else f"not final: the job is {summary['phase']}"
    click.echo(
        f"wrote {output} ({summary['bytes']:,} bytes): {job_id} version {summary['version']} "
        f"({final}), {summary['parameters']:,} parameters"
    )


class ModelWriteError(Exception):
    """The exported model could not be made or written (the reason, in one line)."""


def _write_model(job_id: str, exported: dict[str, Any], output: Path) -> dict[str, Any]:
    """Bake the weights into the inference graph, write it atomically, run it once;
    :class:`ModelWriteError` says why it could not."""
    import os

    from agent.protocol.codec import decode_tensors
    from agent.protocol.errors import ProtocolError
    from coordinator.onnx_model import ModelExportError, smoke_test, with_weights

    try:
        weights = decode_tensors(exported["weights"])
    except ProtocolError as exc:
        raise ModelWriteError(
            f"job {job_id}: the coordinator's weights are unreadable: {exc}"
        ) from None
    metadata = {
        "ember.job": job_id,
        "ember.version": str(exported["version"]),
        "ember.final": "true" if exported["final"] else "false",
    }
    try:
        model = with_weights(exported["inference"], weights, metadata=metadata)
        check = smoke_test(model)
    except ModelExportError as exc:
        raise ModelWriteError(f"job {job_id}, version {exported['version']}: {exc}") from None
    except ImportError as exc:
        raise ModelWriteError(
            f"exporting a model needs onnx (pip install 'ember-fl[coordinator]'): {exc}"
        ) from None
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(model)
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelWriteError(f"cannot write {output}: {exc.strerror or exc}") from None
    return {
        "job": job_id,
        "phase": exported["phase"],
        "version": exported["version"],
        "final": exported["final"],
        "output": str(output),
        "bytes": len(model),
        "parameters": int(sum(t.size for t in weights.values())),
        "inputs": {k: list(v) for k, v in check.inputs.items()},
        "outputs": {k: list(v) for k, v in check.outputs.items()},
    }


# -- report --------------------------------------------------------------------------------------


@jobs.command("report")
@click.argument("job")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write the report into.  [default: ./<job id>-report]",
)
@click.option("--no-model", is_flag=True, help="Do not write the model as ONNX.")
@connection_options
@model_timeout_option
@json_option
def jobs_report(
    job: str,
    output: Path | None,
    no_model: bool,
    broker: str | None,
    prefix: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Write JOB's report into a directory: its learning curve (versions.csv, accuracy.png,
    loss.png), its newest model as ONNX (model.onnx, as `ember jobs export` writes it) and a
    summary (report.md) of how far it got, when, and with which agents.

    Works on a running job too: the report is of what the coordinator knows now.
    """
    from coordinator.report import MODEL_NAME, JobReport, write_markdown
    from coordinator.rpc import RpcError

    conn = connection(broker, prefix)

    async def go() -> tuple[Any, Any]:
        async with coordinator_client(conn, timeout=min(timeout, 10.0)) as client:
            detail = await client.call(
                "jobs.show", {"job": job, "versions": "all"}, timeout=timeout
            )
            if no_model:
                return detail, None
            try:
                exported = await client.call(
                    "jobs.export", {"job": detail["job"], "version": "latest"}, timeout=timeout
                )
            except RpcError as exc:
                return detail, str(exc)
            return detail, exported

    with console().status("asking the coordinator ...", spinner="dots"):
        detail, exported = run(go)
    report = JobReport(detail)
    directory = output if output is not None else Path(f"{report.job}-report")
    try:
        files = report.write(directory)
    except OSError as exc:
        fail(f"cannot write the report into {directory}: {exc.strerror or exc}")
    if isinstance(exported, dict):
        try:
            model = _write_model(report.job, exported, directory / MODEL_NAME)
        except ModelWriteError as exc:
            files[MODEL_NAME] = f"not written: {exc}"
        else:
            final = "final" if model["final"] else "not final"
            files[MODEL_NAME] = (
                f"version {model['version']} ({final}), {model['parameters']:,} parameters"
            )
    elif isinstance(exported, str):
        files[MODEL_NAME] = f"not written: {exported}"
    markdown = write_markdown(report, directory, files)
    summary = {**report.summary(), "directory": str(directory), "files": files}
    if as_json:
        print_json(summary)
        return
    _print_report(summary, markdown)


def _print_report(summary: dict[str, Any], markdown: Path) -> None:
    from rich.table import Table

    out = console()
    style = PHASE_STYLE.get(str(summary["phase"]), "")
    out.print(f"[bold]{summary['job']}[/]  [{style}]{summary['phase']}[/]  {summary['reason']}")
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    best, reached = summary["best_accuracy"], summary["target_reached"]
    rows = [
        ("model versions", str(summary["versions"])),
        ("updates applied", str(summary["updates_applied"])),
        ("ran", "-" if summary["duration_s"] is None else f"{summary['duration_s']:.1f} s"),
        (
            "best accuracy",
            "-" if best is None else f"{best['value']:.4f} (version {best['version']})",
        ),
    ]
    if summary["target_accuracy"] is not None:
        rows.append(
            (
                f"target {summary['target_accuracy']:g}",
                "not reached"
                if reached is None
                else f"version {reached['version']}, {reached['seconds']:.1f} s in",
            )
        )
    for name, what in summary["files"].items():
        rows.append((name, what))
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print(f"wrote {summary['directory']} (summary: {markdown})")


# -- cancel --------------------------------------------------------------------------------------


@jobs.command("cancel")
@click.argument("job")
@connection_options
@timeout_option
@json_option
@click.option("--reason", default="", help="Why (kept in the job's events).")
def jobs_cancel(
    job: str, broker: str | None, prefix: str | None, timeout: float, as_json: bool, reason: str
) -> None:
    """Cancel a job: its roles are stopped on every agent."""
    conn = connection(broker, prefix)

    async def go() -> Any:
        async with coordinator_client(conn, timeout=timeout) as client:
            return await client.call("jobs.cancel", {"job": job, "reason": reason}, timeout=timeout)

    summary = run(go)
    if as_json:
        print_json(summary)
    else:
        click.echo(f"{summary['job']} {summary['phase']}")

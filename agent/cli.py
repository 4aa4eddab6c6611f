"""``ember-agent``: the command-line face of the edge agent.

``ember-agent run --config PATH`` runs the daemon; ``ember-agent info`` prints the capabilities
document it would publish; ``ember-agent health`` judges the running daemon's heartbeat file;
``ember-agent datasets check`` validates the configured datasets;
``ember-agent enroll`` trades a one-time token for the device's broker login.
A configuration or dataset problem prints one line, ``error: <key or dataset>: <reason>``, on
stderr and exits with status 2 (systemd's unit does not restart on 2: see
``RestartPreventExitStatus``); it never prints a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from agent import __version__
from agent.cli_options import log_level_option
from agent.health import DEFAULT_MAX_AGE
from agent.logs import configure_logging

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.daemon import AgentDaemon

F = TypeVar("F", bound=Callable[..., Any])
EXIT_CONFIG = 2
"""Exit status for a bad configuration or dataset (the same as click's usage errors)."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="ember-agent")
@log_level_option(default="info")
@click.option(
    "--log-format",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "json", "console"]),
    help="auto: JSON under systemd or when piped, readable on a terminal.",
)
def cli(log_level: str, log_format: str) -> None:
    """Ember's edge agent: advertises this device to the fleet and runs the roles it is given."""
    configure_logging(log_level, log_format)  # type: ignore[arg-type]


def config_option(fn: F) -> F:
    return click.option(
        "-c",
        "--config",
        "config_path",
        envvar="EMBER_AGENT_CONFIG",
        default="/etc/ember-agent/agent.toml",
        show_default=True,
        type=click.Path(dir_okay=False),
        help="TOML configuration; EMBER_AGENT__<SECTION>__<KEY> variables override its keys.",
    )(fn)


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_CONFIG)


def _load(config_path: str) -> tuple[AgentConfig, str]:
    """The configuration and the agent id, or one error line and exit status 2."""
    from agent.config import ConfigError, ensure_state_dir, load_config, resolve_agent_id

    try:
        config = load_config(config_path)
        ensure_state_dir(config.state_dir)
        return config, resolve_agent_id(config)
    except ConfigError as exc:
        fail(str(exc))


@cli.command()
@config_option
@click.option(
    "--also",
    "also_paths",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="CONFIG",
    help="Run one more agent, with this configuration, in the same process: its own identity, "
    "broker connection, state and roles. For simulating a fleet on one machine; repeatable.",
)
def run(config_path: str, also_paths: tuple[str, ...]) -> None:
    """Run the agent daemon (under systemd: Type=notify, with a watchdog)."""
    from agent.daemon import AgentDaemon, dataset_cache
    from agent.datasets import DatasetError, summarize_all_in_child
    from agent.memory import tune_allocator
    from agent.notify import Notifier

    tune_allocator()  # before any model-sized buffer: they come from the heap, not fresh maps

    daemons = []
    for i, path in enumerate((config_path, *also_paths)):
        config, agent_id = _load(path)
        try:
            # In a child process unless cached: the daemon itself never maps numpy.
            summaries = asyncio.run(summarize_all_in_child(config.datasets, dataset_cache(config)))
        except DatasetError as exc:
            fail(f"dataset {exc}")
        # systemd hears from the first agent only: one process, one readiness and watchdog.
        notifier = None if i == 0 else Notifier(address="")
        daemons.append(
            AgentDaemon(config, agent_id=agent_id, summaries=summaries, notifier=notifier)
        )
    if len({d.agent_id for d in daemons}) < len(daemons):
        fail("--also: every agent in one process needs its own id")
    if len(daemons) == 1:
        asyncio.run(daemons[0].run())
    else:
        asyncio.run(_run_together(daemons))
    if any(d.runtime is not None and d.runtime.cpu_busy for d in daemons):
        # Worker threads cannot be interrupted; do not let them hold the exit hostage.
        sys.stderr.flush()
        os._exit(0)


async def _run_together(daemons: list[AgentDaemon]) -> None:
    """Several agents in one event loop; SIGTERM or SIGINT stops them all."""
    import signal

    def stop_all() -> None:
        for daemon in daemons:
            daemon.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    await asyncio.gather(*(d.run(handle_signals=False) for d in daemons))


@cli.command()
@config_option
def info(config_path: str) -> None:
    """Print the capabilities document this agent publishes on agents/<id>/info."""
    from agent.daemon import collect_info
    from agent.datasets import DatasetError

    config, agent_id = _load(config_path)
    try:
        document = collect_info(config, agent_id)
    except DatasetError as exc:
        fail(f"dataset {exc}")
    click.echo(json.dumps(document, indent=2, sort_keys=False))


@cli.command()
@config_option
@click.option(
    "--max-age",
    default=DEFAULT_MAX_AGE,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds after which the agent's heartbeat counts as stale.",
)
@click.option("--online", is_flag=True, help="Also require a live connection to the broker.")
def health(config_path: str, max_age: float, online: bool) -> None:
    """Judge the running agent's heartbeat file (state_dir/health.json): exit 0 if healthy,
    1 if not. For a container's HEALTHCHECK or an upgrade's rollback check."""
    from agent.health import check_health, health_path

    config, _ = _load(config_path)
    verdict = check_health(health_path(config.state_dir), max_age=max_age, require_online=online)
    click.echo(f"{'healthy' if verdict.ok else 'unhealthy'}: {verdict.reason}")
    sys.exit(0 if verdict.ok else 1)


@cli.command()
@config_option
@click.option("--version", "version", default=None, help="ember-fl==VERSION from the index.")
@click.option(
    "--wheel", default=None, type=click.Path(exists=True, dir_okay=False), help="A wheel file."
)
@click.option("--index-url", default=None, help="The package index pip uses.")
@click.option("--prefix", default="/opt/ember-agent", show_default=True, type=click.Path())
@click.option("--restart", default="systemctl restart ember-agent.service", show_default=True)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to come online.")
def upgrade(
    config_path: str,
    version: str | None,
    wheel: str | None,
    index_url: str | None,
    prefix: str,
    restart: str,
    timeout: float,
) -> None:
    """Install a new version beside the running one, switch to it and restart; roll back if
    it does not come online (as root). Exit 0 upgraded, 1 rolled back or not installed."""
    from pathlib import Path

    from agent.upgrade import Upgrade

    if (version is None) == (wheel is None):
        fail("upgrade: give exactly one of --version and --wheel")
    config, _ = _load(config_path)
    result = Upgrade(
        prefix=Path(prefix),
        state_dir=config.state_dir,
        version=version,
        wheel=Path(wheel) if wheel else None,
        index_url=index_url,
        restart=restart,
        timeout=timeout,
    ).run()
    click.echo(f"{result.outcome}: running {result.running or 'unknown'} ({result.reason})")
    sys.exit(0 if result.outcome == "upgraded" else 1)


@cli.group()
def datasets() -> None:
    """Local datasets."""


@datasets.command("check")
@config_option
def datasets_check(config_path: str) -> None:
    """Validate every configured dataset and print its summary; exit 2 if any is bad."""
    from agent.config import ConfigError, load_config
    from agent.datasets import DatasetError, summarize

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc))
    if not config.datasets:
        click.echo("no datasets configured")
        return
    bad = []
    for dataset in config.datasets:
        try:
            s = summarize(dataset)
        except DatasetError as exc:
            bad.append(str(exc))
            click.echo(f"BAD {exc}")
            continue
        labels = "continuous" if s.label_counts is None else f"{len(s.label_counts)} labels"
        click.echo(
            f"ok  {s.name}: {s.samples} samples, features {list(s.feature_shape)} {s.x_dtype}, "
            f"{labels}, schema {s.schema_hash} ({s.format}, {s.path})"
        )
    if bad:
        fail(f"dataset {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


@cli.command()
@click.option(
    "--coordinator",
    "url",
    required=True,
    metavar="URL",
    help="The broker with the enrolment login: mqtts://ember-enrol:PASSWORD@host:8883.",
)
@click.option("--token", required=True, help="The one-time token from 'ember agents token'.")
@config_option
@click.option("--id", "agent_id", default=None, help="This agent's id [host name + suffix].")
@click.option("--prefix", default="ember/v1", show_default=True, help="Topic prefix.")
@click.option(
    "--ca",
    "ca_file",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="Check the broker's certificate already while enrolling (else the token vouches "
    "for the CA that comes back).",
)
@click.option("--state-dir", default=None, help="Written into [agent] state_dir.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for an answer.")
def enroll(
    url: str,
    token: str,
    config_path: str,
    agent_id: str | None,
    prefix: str,
    ca_file: str | None,
    state_dir: str | None,
    timeout: float,
) -> None:
    """Get this device's broker login and the coordinator's key with a one-time token, and
    write them into the configuration (other settings in it are kept)."""
    from pathlib import Path

    from agent.config import new_agent_id
    from agent.enroll import EnrolmentError, request_grant, write_config
    from agent.protocol.enrolment import Token, TokenError
    from agent.protocol.topics import check_segment

    try:
        parsed = Token.parse(token)
        wanted = check_segment(agent_id or new_agent_id(), "--id")
        grant = asyncio.run(
            request_grant(
                url=url,
                token=parsed,
                agent_id=wanted,
                prefix=prefix,
                ca_file=ca_file,
                timeout=timeout,
            )
        )
        done = write_config(Path(config_path), grant, state_dir=state_dir)
    except (EnrolmentError, TokenError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"--config: {exc}")
    click.echo(f"enrolled as {done.agent}: wrote {done.config} and {done.ca}")
    click.echo(f"start it: ember-agent run --config {done.config}", err=True)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

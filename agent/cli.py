"""``ember-agent``: the command-line face of the edge agent.

``ember-agent run --config PATH`` runs the daemon; ``ember-agent info`` prints the capabilities
document it would publish; ``ember-agent datasets check`` validates the configured datasets.
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
from agent.logs import configure_logging

if TYPE_CHECKING:
    from agent.config import AgentConfig

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
def run(config_path: str) -> None:
    """Run the agent daemon (under systemd: Type=notify, with a watchdog)."""
    from agent.daemon import AgentDaemon, dataset_cache
    from agent.datasets import DatasetError, summarize_all

    config, agent_id = _load(config_path)
    try:
        summaries = summarize_all(config.datasets, dataset_cache(config))
    except DatasetError as exc:
        fail(f"dataset {exc}")
    daemon = AgentDaemon(config, agent_id=agent_id, summaries=summaries)
    asyncio.run(daemon.run())
    if daemon.runtime is not None and daemon.runtime.cpu_busy:
        # Worker threads cannot be interrupted; do not let them hold the exit hostage.
        sys.stderr.flush()
        os._exit(0)


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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

"""``ember-agent``: the command-line face of the edge agent."""

from __future__ import annotations

import click

from agent import __version__
from agent.logs import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="ember-agent")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
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


def main() -> None:
    cli()

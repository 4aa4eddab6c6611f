"""``ember``: the operator's command line (jobs, agents, keys, broker, demo)."""

from __future__ import annotations

import click

from agent import __version__
from agent.logs import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="ember")
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
def cli(log_level: str) -> None:
    """Ember: federated learning for fleets of edge devices, over MQTT."""
    configure_logging(log_level)


def main() -> None:
    cli()

"""``ember``: the operator's command line (jobs, agents, keys, broker, demo, top, dashboard)."""

from __future__ import annotations

import click

from agent import __version__
from agent.cli_options import log_level_option
from agent.logs import configure_logging
from coordinator.cli._common import connection_options
from coordinator.cli.agents import agents
from coordinator.cli.broker import broker
from coordinator.cli.dashboard import dashboard
from coordinator.cli.demo import demo
from coordinator.cli.jobs import jobs
from coordinator.cli.keys import keys
from coordinator.cli.serve import serve
from coordinator.cli.top import top


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="ember")
@log_level_option(default="warning")
@connection_options
def cli(log_level: str, broker: str | None, prefix: str | None) -> None:
    """Ember: federated learning for fleets of edge devices, over MQTT."""
    configure_logging(log_level)


cli.add_command(serve)
cli.add_command(keys)
cli.add_command(jobs)
cli.add_command(agents)
cli.add_command(demo)
cli.add_command(top)
cli.add_command(broker)
cli.add_command(dashboard)


def main() -> None:
    cli()

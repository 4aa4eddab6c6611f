"""``ember serve``: run the coordinator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from coordinator.cli._common import connection, connection_options, fail, stderr
from coordinator.cli.keys import state_dir_option


@click.command()
@connection_options
@state_dir_option
@click.option(
    "--embedded-agent/--no-embedded-agent",
    default=True,
    show_default=True,
    help="Start a local agent that hosts the aggregator role.",
)
@click.option(
    "--zeroconf/--no-zeroconf",
    default=True,
    show_default=True,
    help="Browse the LAN for agents (mDNS/DNS-SD).",
)
@click.option(
    "--zeroconf-interface",
    "zeroconf_interfaces",
    multiple=True,
    metavar="IP",
    help="Browse only on the interface with this address (repeatable).",
)
@click.option(
    "--agent-id", default=None, help="The embedded agent's id [default: coordinator-<hostname>]."
)
@click.option(
    "--agent-dataset",
    "agent_datasets",
    multiple=True,
    metavar="NAME=PATH",
    help="A dataset for the embedded agent, e.g. a held-out set for data.eval_dataset "
    "(repeatable).",
)
@click.option(
    "--aggregator-shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="S",
    help="Embedded agents to start, each its own process: a job with algorithm.shards S "
    "runs its S aggregator shards on them (one per process, so S cores).",
)
@click.option(
    "--weights-interval",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Write a running job's newest model weights to the state directory at most this "
    "often (a job's final model at once).",
)
@click.option(
    "--homeassistant/--no-homeassistant",
    default=False,
    show_default=True,
    help="Announce running jobs and the embedded agent to Home Assistant (MQTT discovery).",
)
@click.option(
    "--homeassistant-prefix",
    default="homeassistant",
    show_default=True,
    metavar="PREFIX",
    help="Home Assistant's MQTT discovery prefix.",
)
@click.option(
    "--broker-kit",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The 'ember broker config' kit of the broker: enrol agents by token into it.",
)
@click.option(
    "--broker-pid-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="mosquitto's pid file, to make it reload after an enrolment [the kit's].",
)
@click.option("--final-grace", type=click.FloatRange(min=0), default=15.0, hidden=True)
@click.option("--settle", type=float, default=1.5, hidden=True)
@click.option("--tick", type=float, default=1.0, hidden=True)
@click.option("--dispatch-timeout", type=float, default=20.0, hidden=True)
@click.pass_context
def serve(
    ctx: click.Context,
    broker: str | None,
    prefix: str | None,
    state_dir: Path,
    embedded_agent: bool,
    zeroconf: bool,
    zeroconf_interfaces: tuple[str, ...],
    agent_id: str | None,
    agent_datasets: tuple[str, ...],
    aggregator_shards: int,
    weights_interval: float,
    homeassistant: bool,
    homeassistant_prefix: str,
    broker_kit: Path | None,
    broker_pid_file: Path | None,
    final_grace: float,
    settle: float,
    tick: float,
    dispatch_timeout: float,
) -> None:
    """Run the coordinator beside an MQTT broker until SIGTERM or Ctrl-C.

    It keeps jobs in STATE_DIR/state.db (SQLite, WAL) and answers `ember` commands over MQTT.
    """
    from agent.logs import configure_logging
    from agent.protocol.homeassistant import check_discovery_prefix
    from coordinator.dispatcher import Timings
    from coordinator.service import ServiceConfig, ServiceError
    from coordinator.service import serve as run_service
    from coordinator.store import StoreError

    root = ctx.find_root()
    if root.get_parameter_source("log_level") == click.core.ParameterSource.DEFAULT:
        configure_logging("info")
    conn = connection(broker, prefix)
    try:
        check_discovery_prefix(homeassistant_prefix)
    except ValueError as exc:
        fail(f"--homeassistant-prefix: {exc}")
    datasets = []
    for item in agent_datasets:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            fail(f"--agent-dataset: expected NAME=PATH, got {item!r}")
        datasets.append((name, Path(path).expanduser().resolve()))
    config = ServiceConfig(
        broker=conn.broker_config(backoff_max=5.0),
        state_dir=state_dir,
        prefix=conn.topics.prefix,
        embedded_agent=embedded_agent,
        zeroconf=zeroconf,
        zeroconf_interfaces=zeroconf_interfaces,
        agent_id=agent_id,
        agent_datasets=tuple(datasets),
        aggregator_shards=aggregator_shards,
        weights_interval=weights_interval,
        homeassistant=homeassistant,
        homeassistant_prefix=homeassistant_prefix,
        final_grace=final_grace,
        broker_kit=broker_kit,
        broker_pid_file=broker_pid_file,
        timings=Timings(settle=settle, tick=tick, dispatch_timeout=dispatch_timeout),
    )
    stderr(f"ember serve: broker {conn.broker}, prefix {conn.prefix}, state {state_dir}")
    try:
        asyncio.run(run_service(config))
    except (ServiceError, StoreError, OSError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass

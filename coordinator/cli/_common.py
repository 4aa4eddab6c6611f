"""What every ``ember`` command shares: broker and prefix options, errors, the RPC connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from agent.protocol.topics import DEFAULT_PREFIX, Topics
from agent.transport import BrokerConfig, NotConnectedError, Transport

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
BROKER_ENV = "EMBER_BROKER"
PREFIX_ENV = "EMBER_PREFIX"
STATE_DIR_ENV = "EMBER_STATE_DIR"
TLS_ENV = {
    "ca_file": "EMBER_BROKER_CA",
    "cert_file": "EMBER_BROKER_CERT",
    "key_file": "EMBER_BROKER_KEY",
}
"""TLS files for ``mqtts://`` brokers with a private CA (``ember broker config`` writes them
into each account's broker.env)."""


class CliError(click.ClickException):
    """A one-line error and exit code 2."""

    exit_code = 2


def fail(message: str) -> NoReturn:
    raise CliError(" ".join(str(message).split()))


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "ember" / "coordinator"


def connection_options(fn: F) -> F:
    """``--broker`` and ``--prefix`` on a command (they may also be given before it)."""
    fn = click.option(
        "--prefix",
        envvar=PREFIX_ENV,
        default=None,
        help=f"Topic prefix [env {PREFIX_ENV}; default {DEFAULT_PREFIX}].",
    )(fn)
    return click.option(
        "--broker",
        envvar=BROKER_ENV,
        default=None,
        metavar="URL",
        help=f"MQTT broker, mqtt://host:port or mqtts:// [env {BROKER_ENV}; "
        f"default {DEFAULT_BROKER}].",
    )(fn)


@dataclass(frozen=True)
class Connection:
    """Where the coordinator is: a broker URL and a topic prefix."""

    broker: str
    prefix: str

    @property
    def topics(self) -> Topics:
        try:
            return Topics(self.prefix)
        except ValueError as exc:
            fail(f"--prefix: {exc}")

    def broker_config(self, **options: Any) -> BrokerConfig:
        for key, name in TLS_ENV.items():
            if os.environ.get(name):
                options.setdefault(key, os.environ[name])
        try:
            return BrokerConfig(urls=(self.broker,), **options)
        except ValueError as exc:
            fail(f"--broker: {exc}")


def connection(broker: str | None, prefix: str | None) -> Connection:
    """The command line wins (the command's option, then the group's), then the environment,
    then the defaults."""
    ctx = click.get_current_context()
    root = ctx.find_root()

    def pick(name: str, own: str | None, default: str) -> str:
        given = click.core.ParameterSource.COMMANDLINE
        if own is not None and ctx.get_parameter_source(name) == given:
            return own
        group = root.params.get(name)
        if group is not None and root.get_parameter_source(name) == given:
            return str(group)
        return own or group or default

    return Connection(
        broker=pick("broker", broker, DEFAULT_BROKER),
        prefix=pick("prefix", prefix, DEFAULT_PREFIX),
    )


def quiet_transport_logs() -> None:
    """A client command reports a missing broker as one error line, not a stream of retries."""
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("ember.transport").setLevel(logging.CRITICAL)
        logging.getLogger("ember.rpc").setLevel(logging.ERROR)


@contextlib.asynccontextmanager
async def broker_transport(
    conn: Connection, *, timeout: float, name: str = "ember-cli", backoff_max: float = 1.0
) -> AsyncIterator[Transport]:
    """A connected transport for a command; one error line (exit 2) when the broker cannot
    be reached within ``timeout`` seconds."""
    quiet_transport_logs()
    config = conn.broker_config(connect_timeout=min(timeout, 10.0), backoff_max=backoff_max)
    async with Transport(config, name=name) as transport:
        try:
            await transport.wait_connected(timeout)
        except NotConnectedError:
            fail(f"cannot reach the MQTT broker at {conn.broker} within {timeout:g} s")
        yield transport


@contextlib.asynccontextmanager
async def coordinator_client(conn: Connection, *, timeout: float) -> AsyncIterator[Any]:
    """An RPC client talking to the coordinator, checked with a ping first."""
    from coordinator.rpc import RpcClient

    async with (
        broker_transport(conn, timeout=timeout) as transport,
        RpcClient(transport, conn.topics, broker=conn.broker) as client,
    ):
        await client.call("ping", timeout=timeout)
        yield client


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine for a command, turning coordinator errors into one-line exit-2 errors."""
    from coordinator.rpc import RpcError
    from coordinator.spec import SpecError

    async def main() -> T:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except (RpcError, SpecError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False, default=str, ensure_ascii=False))


def stderr(message: str) -> None:
    click.echo(message, err=True)


def console() -> Any:
    """A rich console for tables (wide enough when the output is not a terminal)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)

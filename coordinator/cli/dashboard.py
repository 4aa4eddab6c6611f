"""``ember dashboard``: serve the web view of the fleet (see :mod:`coordinator.dashboard`)."""

from __future__ import annotations

import ipaddress

import click

from coordinator.cli._common import connection, connection_options, fail, stderr

WS_ENV = "EMBER_BROKER_WS"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@connection_options
@click.option(
    "--ws-url",
    envvar=WS_ENV,
    default=None,
    metavar="URL",
    help="The broker's MQTT-over-WebSockets listener as the browser reaches it "
    f"[env {WS_ENV}; default ws://<--broker's host>:9001].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8470, show_default=True, help="HTTP port."
)
def dashboard(
    broker: str | None, prefix: str | None, ws_url: str | None, host: str, port: int
) -> None:
    """Serve a web page that shows the fleet and its jobs live, with each job's accuracy curve.

    The browser connects to the broker itself over MQTT-over-WebSockets (ember broker config
    writes that listener); this serves only the page and where the broker is. Add
    ?broker=ws://host:port&prefix=... to the page's address to look elsewhere.
    """
    from coordinator.dashboard import DashboardConfig, DashboardServer, default_ws_url

    conn = connection(broker, prefix)
    checked_prefix = conn.topics.prefix
    try:
        config = DashboardConfig(
            ws_url=ws_url or default_ws_url(conn.broker), prefix=checked_prefix
        )
        server = DashboardServer(config, host, port)
    except ValueError as exc:
        fail(f"--ws-url: {exc}" if ws_url else f"--broker: {exc}")
    except OSError as exc:
        fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}")
    if not _loopback(host):
        stderr(
            f"serving on {host}: anyone who reaches this port can load the page (it holds no "
            "credentials; the broker's ACLs decide what a browser may read)"
        )
    click.echo(f"Ember dashboard on {server.url} (broker {config.ws_url}, prefix {config.prefix})")
    click.echo("Ctrl-C stops it.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

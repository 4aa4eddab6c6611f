"""``ember broker config``: a mosquitto configuration that keeps strangers out."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import click

from agent.protocol.topics import DEFAULT_PREFIX
from coordinator.cli._common import PREFIX_ENV, fail, stderr


@click.group()
def broker() -> None:
    """The MQTT broker's security (TLS, one login per agent, ACLs) and site bridges."""


@broker.command("config")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The kit directory (created, or updated when it exists).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME",
    help="A DNS name or IP address agents use for the broker (repeatable; goes into the "
    "server certificate) [default: this host's name, localhost, 127.0.0.1].",
)
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="TLS port [8883].")
@click.option("--bind", default=None, metavar="ADDRESS", help="Listen only on this address.")
@click.option(
    "--websockets-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve MQTT over WebSockets on this port, for browser dashboards (ember "
    "dashboard), with the same address, TLS (wss://) and logins; 0 removes it [none; 9001 is "
    "usual].",
)
@click.option(
    "--agent",
    "agents",
    multiple=True,
    metavar="ID",
    help="An agent account, username = agent id (repeatable).",
)
@click.option(
    "--aggregator",
    "aggregators",
    multiple=True,
    metavar="ID",
    help="An agent account that may also host aggregator roles (repeatable).",
)
@click.option("--operator", "operators", multiple=True, metavar="NAME", help="Repeatable.")
@click.option(
    "--coordinator-key",
    default=None,
    metavar="ed25519:...",
    help="Written into new agents' [trust] coordinator_keys (see 'ember keys show').",
)
@click.option("--prefix", envvar=PREFIX_ENV, default=None, help="Topic prefix [ember/v1].")
@click.option(
    "--homeassistant-prefix",
    default=None,
    metavar="PREFIX",
    help="Home Assistant's MQTT discovery prefix agents may announce under [homeassistant].",
)
@click.option(
    "--pid-file",
    default=None,
    metavar="PATH",
    help="Where mosquitto writes its pid, e.g. /run/mosquitto/mosquitto.pid [INSTALL_DIR].",
)
@click.option("--public-url", default=None, help="How agents reach the broker [mqtts://HOST:PORT].")
@click.option(
    "--install-dir",
    default=None,
    metavar="PATH",
    help="Where the files will live on the broker host (mosquitto.conf names them) [--out].",
)
@click.option(
    "--require-client-cert/--no-require-client-cert",
    default=None,
    help="Also demand a client certificate from the kit's CA [no].",
)
def config(
    out: Path,
    hosts: tuple[str, ...],
    port: int | None,
    bind: str | None,
    websockets_port: int | None,
    agents: tuple[str, ...],
    aggregators: tuple[str, ...],
    operators: tuple[str, ...],
    coordinator_key: str | None,
    prefix: str | None,
    homeassistant_prefix: str | None,
    pid_file: str | None,
    public_url: str | None,
    install_dir: str | None,
    require_client_cert: bool | None,
) -> None:
    """Write (or update) a mosquitto 2.0 kit in OUT: mosquitto.conf with a TLS listener and no
    anonymous access, a password file with one login per agent, the coordinator and each
    operator, an ACL that lets an agent write only its own topics, a local CA with server and
    client certificates, and the credential files each side needs (OUT/credentials/<name>/).

    Existing accounts keep their passwords. Run mosquitto with `mosquitto -c OUT/mosquitto.conf`.
    """
    from dataclasses import replace

    from coordinator.brokerkit import BrokerKit, KitError, KitSettings, Listener
    from coordinator.brokerkit.kit import KIT_FILE, kit_lock

    try:
        with kit_lock(out):
            current = BrokerKit.load(out).settings if (out / KIT_FILE).exists() else None
            settings = current or KitSettings(hosts=_default_hosts())
            listener = settings.listeners[0] if settings.listeners else Listener()
            if port is not None or bind is not None:
                listener = replace(listener, port=port or listener.port, bind=bind or listener.bind)
            listeners = _with_websockets((listener, *settings.listeners[1:]), websockets_port)
            settings = replace(
                settings,
                hosts=tuple(dict.fromkeys(hosts)) or settings.hosts,
                listeners=listeners,
                prefix=prefix or settings.prefix,
                discovery_prefix=homeassistant_prefix or settings.discovery_prefix,
                public_url=public_url if public_url is not None else settings.public_url,
                install_dir=install_dir if install_dir is not None else settings.install_dir,
                pid_file=pid_file if pid_file is not None else settings.pid_file,
                require_client_cert=settings.require_client_cert
                if require_client_cert is None
                else require_client_cert,
            )
            kit = BrokerKit.open(out, settings)
            keys = (coordinator_key,) if coordinator_key else ()
            made: list[str] = []
            for name in agents:
                if kit.add_account(name, "agent", coordinator_keys=keys) is not None:
                    made.append(name)
            for name in aggregators:
                if (
                    kit.add_account(name, "agent", aggregator=True, coordinator_keys=keys)
                    is not None
                ):
                    made.append(name)
            for name in operators:
                if kit.add_account(name, "operator") is not None:
                    made.append(name)
            kit.save()
    except (KitError, ValueError, OSError) as exc:
        fail(str(exc))
    stderr(f"wrote {out}: mosquitto.conf, passwd, acl, CA and certificates")
    for name in made:
        stderr(f"  new account {name}: {kit.credentials_dir(name)}")
    stderr(f"run: mosquitto -c {kit.install / 'mosquitto.conf'}   (reload: kill -HUP)")
    stderr(f"coordinator: {kit.credentials_dir('ember-coordinator') / 'broker.env'}")
    stderr(f"enrolment: ember serve --broker-kit {out}, then ember agents token")
    for ws in (x for x in kit.settings.listeners if x.protocol == "websockets"):
        scheme = "wss" if ws.tls else "ws"
        stderr(
            f"dashboard: ember dashboard --ws-url {scheme}://{kit.settings.hosts[0]}:{ws.port} "
            f"(log in as an operator; the browser must trust {kit.install / 'ca.crt'})"
        )


def _with_websockets(listeners: tuple[Any, ...], port: int | None) -> tuple[Any, ...]:
    """The listeners with the WebSockets one set to ``port`` (like the first listener: same
    address and TLS), removed for 0, unchanged for ``None``."""
    from dataclasses import replace

    if port is None:
        return listeners
    first, rest = listeners[0], [x for x in listeners[1:] if x.protocol != "websockets"]
    if port == first.port:
        fail(f"--websockets-port {port} is the MQTT listener's port")
    if port:
        rest.append(replace(first, port=port, protocol="websockets"))
    return (first, *rest)


def _default_hosts() -> tuple[str, ...]:
    return tuple(dict.fromkeys([socket.gethostname(), "localhost", "127.0.0.1"]))


@broker.command("bridge")
@click.option("--site", required=True, metavar="NAME", help="This site's name (the bridge's).")
@click.option("--central", required=True, metavar="HOST:PORT", help="The central broker's address.")
@click.option("--prefix", envvar=PREFIX_ENV, default=None, help="Topic prefix [ember/v1].")
@click.option("--username", default=None, help="The bridge's login on the central broker.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="A file holding that login's password (kept out of the command line).",
)
@click.option(
    "--cafile",
    default=None,
    metavar="PATH",
    help="The central broker's CA certificate, as the site broker will find it: TLS.",
)
@click.option("--certfile", default=None, metavar="PATH", help="The bridge's client certificate.")
@click.option("--keyfile", default=None, metavar="PATH", help="Its private key.")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write here (e.g. /etc/mosquitto/conf.d/ember-bridge.conf) [stdout].",
)
def bridge(
    site: str,
    central: str,
    prefix: str | None,
    username: str | None,
    password_file: Path | None,
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    out: Path | None,
) -> None:
    """A site mosquitto's bridge to the central broker, for hierarchical FL: agent presence,
    metrics and updates for a top aggregator go out; inboxes, global model versions and job
    states come in; a group's own topics stay at the site. Persistent session, no echo
    loops, reconnect backoff. Include it in the site broker's mosquitto.conf."""
    from coordinator.brokerkit.bridge import BridgeSettings, render_bridge

    try:
        password = password_file.read_text().strip() if password_file else None
        settings = BridgeSettings(
            site=site,
            address=central,
            prefix=prefix or DEFAULT_PREFIX,
            username=username,
            password=password,
            cafile=cafile,
            certfile=certfile,
            keyfile=keyfile,
        )
        text = render_bridge(settings)
        if out is None:
            click.echo(text, nl=False)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if password is not None:
            out.chmod(0o600)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    stderr(f"wrote {out}: bridge {site} → {central}; include it in the site's mosquitto.conf")

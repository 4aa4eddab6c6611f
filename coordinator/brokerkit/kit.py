"""The broker kit directory: everything a self-hosted mosquitto 2.0 needs to keep strangers out.

``ember broker config --out DIR`` creates (and on later runs updates) ::

    DIR/kit.json            the kit's settings and accounts; the source of everything below
    DIR/mosquitto.conf      listeners (data-driven: kit.json "listeners"), TLS, auth, ACL
    DIR/passwd              mosquitto 2.0 password file ($7$ PBKDF2-SHA512), mode 0600
    DIR/acl                 per-account grants (coordinator.brokerkit.acl)
    DIR/ca.crt, ca.key      the fleet's CA (ECDSA P-256); ca.key never leaves this host
    DIR/server.crt, .key    the broker's certificate, for every name in kit.json "hosts"
    DIR/conf.d/             more mosquitto settings of your own (logging, limits)
    DIR/credentials/<user>/ what each side needs: ca.crt, client.crt/.key and either
                            agent.toml (agents) or broker.env (coordinator, operators)

Existing accounts keep their passwords and the CA is never replaced; a change of host names
re-issues the server certificate. The coordinator adds enrolled agents through the same class
and then asks mosquitto to reload (SIGHUP re-reads the password and ACL files).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from agent.credentials import AgentCredentials, write_atomic
from agent.protocol.homeassistant import DEFAULT_DISCOVERY_PREFIX, check_discovery_prefix
from agent.protocol.topics import DEFAULT_PREFIX, Topics
from agent.transport import BrokerEndpoint
from coordinator.brokerkit import pki
from coordinator.brokerkit.acl import COORDINATOR_USER, ENROL_USER, Account, Kind, render_acl
from coordinator.brokerkit.passwords import (
    hash_password,
    new_password,
    parse_password_file,
    render_password_file,
)

KIT_VERSION = 1
KIT_FILE = "kit.json"
PID_FILE = "mosquitto.pid"
RESERVED = frozenset({COORDINATOR_USER, ENROL_USER})


class KitError(ValueError):
    """The kit directory cannot be used as asked; the message says why."""


@contextlib.contextmanager
def kit_lock(root: Path) -> Iterator[None]:
    """Hold the kit's lock (``flock`` on ``.lock``) while reading, changing and saving it, so
    ``ember broker config`` and an enrolment in ``ember serve`` never lose each other's
    accounts. Blocking: call it off the event loop."""
    root.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True)
class Listener:
    """One mosquitto listener. ``websockets`` listeners are for browser dashboards."""

    port: int = 8883
    bind: str | None = None
    protocol: Literal["mqtt", "websockets"] = "mqtt"
    tls: bool = True

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Listener:
        listener = cls(
            port=int(raw["port"]),
            bind=raw.get("bind"),
            protocol=raw.get("protocol", "mqtt"),
            tls=bool(raw.get("tls", True)),
        )
        if listener.protocol not in ("mqtt", "websockets"):
            raise KitError(f"listener {listener.port}: protocol must be mqtt or websockets")
        if not 0 < listener.port < 65536:
            raise KitError(f"listener port {listener.port} is not a TCP port")
        return listener

    def render(self, install: Path, require_client_cert: bool) -> list[str]:
        lines = [
            f"listener {self.port}" + (f" {self.bind}" if self.bind else ""),
            f"protocol {self.protocol}",
            "allow_anonymous false",
            f"password_file {install / 'passwd'}",
            f"acl_file {install / 'acl'}",
        ]
        if self.tls:
            lines += [
                f"cafile {install / 'ca.crt'}",
                f"certfile {install / 'server.crt'}",
                f"keyfile {install / 'server.key'}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if require_client_cert else 'false'}",
            ]
        return lines


@dataclass(frozen=True, kw_only=True)
class KitSettings:
    prefix: str = DEFAULT_PREFIX
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    """Names agents use to reach the broker: they go into the server certificate."""
    listeners: tuple[Listener, ...] = (Listener(),)
    public_url: str = ""
    """How agents reach the broker; default ``mqtts://<first host>:<first TLS mqtt port>``."""
    require_client_cert: bool = False
    discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX
    """Home Assistant's MQTT discovery prefix (agents and the coordinator announce there)."""
    pid_file: str = ""
    """Where mosquitto writes its pid (it must be able to, after dropping to its own user);
    default ``mosquitto.pid`` in the install directory."""
    install_dir: str = ""
    """Where the files live on the broker host (mosquitto.conf names them absolutely);
    default: the kit directory itself."""

    def url(self) -> str:
        if self.public_url:
            return self.public_url
        for listener in self.listeners:
            if listener.protocol == "mqtt":
                scheme = "mqtts" if listener.tls else "mqtt"
                return f"{scheme}://{self.hosts[0]}:{listener.port}"
        raise KitError("no mqtt listener: agents could not connect")


@dataclass
class BrokerKit:
    """A kit directory, loaded; change it with :meth:`add_account`, then :meth:`save`."""

    root: Path
    settings: KitSettings
    accounts: dict[str, Account] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    enrol_password: str = ""

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.prefix)

    @property
    def install(self) -> Path:
        return Path(self.settings.install_dir or self.root.resolve())

    @property
    def pid_file(self) -> Path:
        return Path(self.settings.pid_file or self.install / PID_FILE)

    def credentials_dir(self, username: str) -> Path:
        return self.root / "credentials" / username

    # loading and creating -------------------------------------------------------------------
    @classmethod
    def load(cls, root: Path) -> BrokerKit:
        path = root / KIT_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KitError(
                f"{root} is not a broker kit (no {KIT_FILE}; ember broker config)"
            ) from None
        except (OSError, ValueError) as exc:
            raise KitError(f"{path}: unreadable: {exc}") from None
        if raw.get("v") != KIT_VERSION:
            raise KitError(f"{path}: unsupported kit version {raw.get('v')!r}")
        s = raw["settings"]
        settings = KitSettings(
            prefix=s["prefix"],
            hosts=tuple(s["hosts"]),
            listeners=tuple(Listener.from_json(x) for x in s["listeners"]),
            public_url=s.get("public_url", ""),
            require_client_cert=bool(s.get("require_client_cert", False)),
            install_dir=s.get("install_dir", ""),
            pid_file=s.get("pid_file", ""),
            discovery_prefix=s.get("discovery_prefix", DEFAULT_DISCOVERY_PREFIX),
        )
        accounts = {
            name: Account(name, entry["kind"], bool(entry.get("aggregator", False)))
            for name, entry in raw["accounts"].items()
        }
        passwd = root / "passwd"
        hashes = parse_password_file(passwd.read_text()) if passwd.exists() else {}
        return cls(root, settings, accounts, hashes, raw.get("enrol_password", ""))

    @classmethod
    def open(cls, root: Path, settings: KitSettings | None = None) -> BrokerKit:
        """The kit at ``root``, created with ``settings`` if it does not exist yet, or updated
        to ``settings`` if given. The CA, the coordinator and the enrolment account are made
        on first use."""
        if (root / KIT_FILE).exists():
            kit = cls.load(root)
            if settings is not None:
                kit.settings = settings
        else:
            kit = cls(root, settings or KitSettings())
        try:
            Topics(kit.settings.prefix)
            check_discovery_prefix(kit.settings.discovery_prefix)
            BrokerEndpoint.parse(kit.settings.url())
        except ValueError as exc:
            raise KitError(str(exc)) from None
        if not root.exists():
            # Group-readable: the group can be mosquitto's (see docs/security.md); the secrets
            # in it (ca.key, kit.json, credentials) are 0600 each.
            root.mkdir(parents=True, mode=0o750)
        kit._ensure_pki()
        if COORDINATOR_USER not in kit.accounts:
            kit.add_account(COORDINATOR_USER, "coordinator")
        if not kit.enrol_password or ENROL_USER not in kit.accounts:
            kit.enrol_password = new_password()
            kit.accounts[ENROL_USER] = Account(ENROL_USER, "enrol")
            kit.hashes[ENROL_USER] = hash_password(kit.enrol_password)
        return kit

    def _ensure_pki(self) -> None:
        ca_cert, ca_key = self.root / "ca.crt", self.root / "ca.key"
        if not ca_cert.exists():
            pki.make_ca().write(ca_cert, ca_key)
        ca = pki.load(ca_cert, ca_key)
        server_cert = self.root / "server.crt"
        if server_cert.exists():
            current = pki.load(server_cert, self.root / "server.key")
            if tuple(_san(current)) == self.settings.hosts:
                return
        pki.issue(ca, self.settings.hosts[0], hosts=self.settings.hosts, server=True).write(
            server_cert, self.root / "server.key", key_mode=0o640
        )

    # accounts -------------------------------------------------------------------------------
    def add_account(
        self,
        username: str,
        kind: Kind,
        *,
        aggregator: bool = False,
        coordinator_keys: Iterable[str] = (),
    ) -> str | None:
        """Add an account (or change an agent's aggregator grant) and write its credentials
        directory. Returns the new password, or ``None`` for an existing account (whose
        password is kept: its credentials were written when it was made)."""
        existing = self.accounts.get(username)
        if existing is not None and existing.kind != kind:
            raise KitError(f"{username!r} is already a {existing.kind} account")
        if existing is None and kind == "agent" and username in RESERVED:
            raise KitError(f"{username!r} is a reserved account name")
        try:
            account = Account(username, kind, aggregator)
        except ValueError as exc:
            raise KitError(str(exc)) from None
        self.accounts[username] = account
        if existing is not None and username in self.hashes:
            return None
        password = new_password()
        self.hashes[username] = hash_password(password)
        self._write_credentials(account, password, tuple(coordinator_keys))
        return password

    def _write_credentials(self, account: Account, password: str, keys: tuple[str, ...]) -> None:
        out = self.credentials_dir(account.username)
        out.mkdir(parents=True, exist_ok=True)
        ca = pki.load(self.root / "ca.crt", self.root / "ca.key")
        write_atomic(out / "ca.crt", ca.cert_pem(), 0o644)
        pki.issue(ca, account.username, server=False).write(out / "client.crt", out / "client.key")
        url = self.settings.url()
        if account.kind == "agent":
            creds = AgentCredentials(
                agent_id=account.username,
                prefix=self.settings.prefix,
                urls=(url,),
                username=account.username,
                password=password,
                ca_file="ca.crt",
                cert_file="client.crt" if self.settings.require_client_cert else None,
                key_file="client.key" if self.settings.require_client_cert else None,
                coordinator_keys=keys,
            )
            header = (
                f"Broker credentials of agent {account.username!r}, by 'ember broker config'.\n"
                "Copy this directory to the device (e.g. /etc/ember-agent/) and add your\n"
                "[[datasets]] (and, if still empty, [trust] coordinator_keys from "
                "'ember keys show')."
            )
            write_atomic(out / "agent.toml", creds.toml(header=header).encode(), 0o600)
            return
        parts = BrokerEndpoint.parse(url)
        scheme = "mqtts" if parts.tls else "mqtt"
        lines = [
            f"# Broker credentials of {account.kind} {account.username!r}: source this file or",
            "# use it as a systemd EnvironmentFile= for 'ember serve' and 'ember' commands.",
            f"EMBER_BROKER={scheme}://{account.username}:{password}@{parts.host}:{parts.port}",
            f"EMBER_PREFIX={self.settings.prefix}",
            f"EMBER_BROKER_CA={out.resolve() / 'ca.crt'}",
        ]
        if self.settings.require_client_cert:
            lines += [
                f"EMBER_BROKER_CERT={out.resolve() / 'client.crt'}",
                f"EMBER_BROKER_KEY={out.resolve() / 'client.key'}",
            ]
        write_atomic(out / "broker.env", ("\n".join(lines) + "\n").encode(), 0o600)

    # rendering ------------------------------------------------------------------------------
    def mosquitto_conf(self) -> str:
        install = self.install
        lines = [
            "# Written by 'ember broker config' for mosquitto 2.0; regenerated from kit.json.",
            "# Run: mosquitto -c " + str(install / "mosquitto.conf"),
            "# Reload accounts and ACL after a change: kill -HUP $(cat " + str(self.pid_file) + ")",
            "per_listener_settings true",
            f"pid_file {self.pid_file}",
            "persistence true",
            f"persistence_location {install / 'data'}/",
            "",
        ]
        for listener in self.settings.listeners:
            lines += [*listener.render(install, self.settings.require_client_cert), ""]
        lines.append(f"include_dir {install / 'conf.d'}")
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        """Write kit.json, the password file, the ACL and mosquitto.conf (each atomically)."""
        (self.root / "data").mkdir(exist_ok=True)
        (self.root / "conf.d").mkdir(exist_ok=True)
        known = {name: self.hashes[name] for name in self.accounts if name in self.hashes}
        document = {
            "v": KIT_VERSION,
            "settings": {
                **asdict(replace(self.settings, listeners=())),
                "hosts": list(self.settings.hosts),
                "listeners": [asdict(x) for x in self.settings.listeners],
            },
            "accounts": {
                name: {"kind": a.kind, "aggregator": a.aggregator}
                for name, a in sorted(self.accounts.items())
            },
            "enrol_password": self.enrol_password,
        }
        write = write_atomic
        write(self.root / KIT_FILE, (json.dumps(document, indent=2) + "\n").encode(), 0o600)
        write(self.root / "passwd", render_password_file(known).encode(), 0o640)
        acl = render_acl(self.topics, self.accounts.values(), self.settings.discovery_prefix)
        write(self.root / "acl", acl.encode(), 0o644)
        write(self.root / "mosquitto.conf", self.mosquitto_conf().encode(), 0o644)

    def reload_broker(self, pid_file: Path | None = None) -> int | None:
        """SIGHUP the local mosquitto named by its pid file (it re-reads the password and ACL
        files); the pid, or ``None`` when there is no pid file (no local broker running)."""
        path = pid_file or self.pid_file
        try:
            pid = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return None
        return pid


def _san(issued: pki.Issued) -> list[str]:
    from cryptography import x509

    try:
        names = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in names.value]

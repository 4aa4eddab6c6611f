"""A site broker's bridge to the central broker (mosquitto bridges, for hierarchical FL).

A site (a building, a farm, a factory floor) runs its own mosquitto; its agents and a middle
aggregator talk to it, and one bridge connection carries to the central broker only what the
rest of the federation needs (mosquitto.conf(5), "Configuring Bridges"):

* out (site → central): agents' presence, capabilities, telemetry and roles documents, the
  jobs' metric events and progress documents, the updates the site's roles send to a top
  aggregator (a middle aggregator's group deltas, or two-tier trainers' deltas), and the
  CLI's requests to the coordinator;
* in (central → site): each agent's inbox (signed role bundles, cancels), the global model
  versions and receipts, the jobs' state documents, and the coordinator's RPC replies.

A group's own topics (``jobs/<job>/groups/<group>/...``: its trainers' updates, the relayed
versions, ring all-reduce chunks) stay at the site. The bridge keeps a persistent session
(``cleansession false``: messages queued while the link is down are delivered after it comes
back), announces itself as a bridge (``try_private``: no echo loops between two mosquittos) and
reconnects with a backoff (``restart_timeout``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.protocol.topics import DEFAULT_PREFIX, Topics

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

OUT = (
    "agents/+/status",
    "agents/+/info",
    "agents/+/telemetry",
    "agents/+/roles",
    "jobs/+/metrics/+",
    "jobs/+/agents/+/progress",
    "jobs/+/updates/+",
    "coordinator/rpc/requests",
)
"""Topics (under the prefix) the site sends to the central broker."""
IN = (
    "agents/+/inbox",
    "jobs/+/model/#",
    "jobs/+/state",
    "coordinator/rpc/replies/+",
)
"""Topics (under the prefix) the central broker sends to the site."""


@dataclass(frozen=True, kw_only=True)
class BridgeSettings:
    """One site's bridge connection to the central broker."""

    site: str
    address: str
    """``host:port`` of the central broker."""
    prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    """The central broker's CA: with it the bridge speaks TLS (``bridge_cafile``)."""
    certfile: str | None = None
    keyfile: str | None = None
    restart_timeout: tuple[int, int] = (2, 60)
    """Reconnect backoff, base and cap in seconds (mosquitto's ``restart_timeout base cap``)."""
    qos: int = 1

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.site):
            raise ValueError(f"site {self.site!r}: letters, digits, '.', '_' or '-' (≤ 64)")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"central broker address {self.address!r}: expected host:port")
        if any(c.isspace() for c in self.address + (self.username or "")):
            raise ValueError("the address and username may not contain whitespace")
        if self.password is not None and ("\n" in self.password or not self.username):
            raise ValueError("a bridge password needs a username and must be one line")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("give both the bridge's certificate and its key, or neither")
        Topics(self.prefix)  # validates the prefix


def render_bridge(settings: BridgeSettings) -> str:
    """The ``connection`` section for the site's mosquitto.conf."""
    s = settings
    lines = [
        f"# Ember bridge: site {s.site} to the central broker (written by 'ember broker bridge')",
        f"connection ember-{s.site}",
        f"address {s.address}",
        f"remote_clientid ember-bridge-{s.site}",
        "cleansession false",
        "try_private true",
        "notifications false",
        f"restart_timeout {s.restart_timeout[0]} {s.restart_timeout[1]}",
        "bridge_protocol_version mqttv311",
    ]
    if s.username:
        lines.append(f"remote_username {s.username}")
    if s.password is not None:
        lines.append(f"remote_password {s.password}")
    if s.cafile:
        lines += [f"bridge_cafile {s.cafile}", "bridge_insecure false"]
    if s.certfile and s.keyfile:
        lines += [f"bridge_certfile {s.certfile}", f"bridge_keyfile {s.keyfile}"]
    lines += [f"topic {s.prefix}/{pattern} out {s.qos}" for pattern in OUT]
    lines += [f"topic {s.prefix}/{pattern} in {s.qos}" for pattern in IN]
    return "\n".join(lines) + "\n"

"""A heartbeat file for health checks that cannot ask systemd or the broker.

The agent rewrites ``state_dir/health.json`` from its event loop every few seconds and on every
(re)connection, with what it knows: its process id, whether its MQTT connection is up, the
connection's session number (the same number as the retained ``agents/<id>/status``) and its
version. On a clean stop it writes ``stopped``. ``ember-agent health`` reads that file and judges
it, for a container's HEALTHCHECK (Docker has no sd_notify watchdog), a Kubernetes exec probe,
or the upgrade supervisor that must know whether a new version came online.

The file is a liveness signal in the same sense as systemd's watchdog (sd_watchdog_enabled(3)):
it is written by a task on the event loop, so a wedged loop lets it go stale. A check says
*unhealthy* when the file is missing, unreadable, older than ``max_age`` seconds, says
``stopped``, or (with ``require_online``) says the broker is not connected.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

HEALTH_FILE = "health.json"
HEARTBEAT_INTERVAL = 5.0
"""Seconds between rewrites of the health file."""
DEFAULT_MAX_AGE = 30.0
"""A health file older than this is stale: six missed heartbeats."""

State = Literal["connecting", "online", "stopped"]


@dataclass(frozen=True)
class Health:
    """One heartbeat: what the agent process knew about itself at ``ts``."""

    pid: int
    state: State
    session: int
    version: str
    agent: str
    ts: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Health:
        """Parse a health file; raises ``ValueError`` naming what is wrong."""
        raw: Any = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        try:
            health = cls(
                pid=int(raw["pid"]),
                state=raw["state"],
                session=int(raw["session"]),
                version=str(raw["version"]),
                agent=str(raw["agent"]),
                ts=float(raw["ts"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad field: {exc}") from None
        if health.state not in ("connecting", "online", "stopped"):
            raise ValueError(f"unknown state {health.state!r}")
        return health


def health_path(state_dir: Path) -> Path:
    return state_dir / HEALTH_FILE


def write_health(path: Path, health: Health) -> None:
    """Replace the health file atomically (a reader never sees half a file). Blocking I/O."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(health.to_json())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Verdict:
    """The result of judging a health file: ``ok`` and a sentence for people."""

    ok: bool
    reason: str
    health: Health | None = None


def check_health(
    path: Path,
    *,
    max_age: float = DEFAULT_MAX_AGE,
    require_online: bool = False,
    now: float | None = None,
) -> Verdict:
    """Judge the health file at ``path`` (see the module's docstring for the rules)."""
    try:
        health = Health.from_json(path.read_bytes())
    except FileNotFoundError:
        return Verdict(False, f"no health file at {path}: the agent has not started")
    except (OSError, ValueError) as exc:
        return Verdict(False, f"cannot read {path}: {exc}")
    age = (time.time() if now is None else now) - health.ts
    what = (
        f"agent {health.agent} {health.state} (session {health.session}, pid {health.pid}, "
        f"version {health.version}, written {age:.1f} s ago)"
    )
    if health.state == "stopped":
        return Verdict(False, what, health)
    if age > max_age:
        return Verdict(False, f"{what}: stale, the agent's event loop is not running", health)
    if require_online and health.state != "online":
        return Verdict(False, f"{what}: not connected to the broker", health)
    return Verdict(True, what, health)

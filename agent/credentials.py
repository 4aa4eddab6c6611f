"""The agent configuration that carries its broker credentials and trusted keys.

Written by ``ember broker config`` (one file per agent, to copy onto the device) and by
``ember-agent enroll`` (the whole ``agent.toml``, keeping whatever else it held); both produce
:mod:`agent.config`'s format through :func:`render_toml`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {_value(v, where)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"{where}: cannot write {type(value).__name__} as TOML")


def _key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    return key if bare else json.dumps(key)


def render_toml(document: Mapping[str, Any]) -> str:
    """A configuration as TOML: top-level tables as ``[name]`` (nested maps inline), lists of
    tables as ``[[name]]``. Enough for :mod:`agent.config`'s shape, not a general writer."""
    lines: list[str] = []
    for name, value in document.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{_key(name)}]"]
            lines += [f"{_key(k)} = {_value(v, f'{name}.{k}')}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for table in value:
                lines += ["", f"[[{_key(name)}]]"]
                lines += [f"{_key(k)} = {_value(v, f'{name}.{k}')}" for k, v in table.items()]
        else:
            raise TypeError(f"{name}: only tables at the top level of an agent configuration")
    return "\n".join(lines).lstrip("\n") + "\n"


@dataclass(frozen=True, kw_only=True)
class AgentCredentials:
    """Everything an agent needs to reach a secured broker and to trust its coordinator."""

    agent_id: str
    prefix: str
    urls: tuple[str, ...]
    username: str
    password: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    coordinator_keys: tuple[str, ...] = ()

    def merge_into(self, document: dict[str, Any]) -> dict[str, Any]:
        """``document`` (a parsed agent.toml) with this agent's id, prefix, broker login and
        trusted keys; its other settings (state_dir, labels, datasets, ...) are kept."""
        agent = dict(document.get("agent", {}))
        agent.update(id=self.agent_id, topic_prefix=self.prefix)
        broker = {
            k: v
            for k, v in document.get("broker", {}).items()
            if k not in ("url", "username", "password", "ca_file", "cert_file", "key_file")
        }
        broker = {
            "url": self.urls[0] if len(self.urls) == 1 else list(self.urls),
            "username": self.username,
            "password": self.password,
            **{
                k: getattr(self, k)
                for k in ("ca_file", "cert_file", "key_file")
                if getattr(self, k)
            },
            **broker,
        }
        trust = dict(document.get("trust", {}))
        known = trust.get("coordinator_keys", [])
        known = [known] if isinstance(known, str) else list(known)
        trust["coordinator_keys"] = list(dict.fromkeys([*known, *self.coordinator_keys]))
        rest = {k: v for k, v in document.items() if k not in ("agent", "broker", "trust")}
        return {"agent": agent, "broker": broker, "trust": trust, **rest}

    def toml(self, *, header: str, document: dict[str, Any] | None = None) -> str:
        """The configuration text: ``header`` as comments, then :meth:`merge_into`."""
        comments = "".join(f"# {line}\n" for line in header.splitlines())
        return comments + render_toml(self.merge_into(document or {}))


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` so that a crash leaves the old file or the new
    one, never a torn one (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

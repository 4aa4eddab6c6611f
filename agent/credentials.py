"""The agent configuration that carries its broker credentials and trusted keys.

Written by ``ember broker config`` (one file per agent, to copy onto the device) and by
``ember-agent enroll`` (the whole ``agent.toml``); both produce :mod:`agent.config`'s format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


def toml_string(value: str) -> str:
    """A TOML basic string (a JSON string is one)."""
    return json.dumps(value)


def toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(toml_string(v) for v in values) + "]"


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

    def toml(self, *, header: str, state_dir: str | None = None) -> str:
        """``[agent]``, ``[broker]`` and ``[trust]`` tables; paths as given (relative ones
        are read relative to the configuration file's directory)."""
        lines = [*(f"# {line}" for line in header.splitlines()), "[agent]"]
        lines.append(f"id = {toml_string(self.agent_id)}")
        if state_dir is not None:
            lines.append(f"state_dir = {toml_string(state_dir)}")
        lines += [f"topic_prefix = {toml_string(self.prefix)}", "", "[broker]"]
        urls = self.urls[0] if len(self.urls) == 1 else list(self.urls)
        lines.append(f"url = {toml_string(urls) if isinstance(urls, str) else toml_list(urls)}")
        lines += [
            f"username = {toml_string(self.username)}",
            f"password = {toml_string(self.password)}",
        ]
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            if value:
                lines.append(f"{key} = {toml_string(value)}")
        lines += ["", "[trust]", f"coordinator_keys = {toml_list(self.coordinator_keys)}", ""]
        return "\n".join(lines)

"""Pieces of ``ember serve``: the embedded agent's configuration and the state-directory lock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import load_config
from coordinator.bundles import init_key, public_text
from coordinator.service import ServiceError, StateDirLock, embedded_agent_id, embedded_agent_toml


def test_the_embedded_agent_config_is_what_the_agent_reads(tmp_path: Path) -> None:
    key, _ = init_key(tmp_path)
    holdout = tmp_path / "holdout.npz"
    np.savez(holdout, x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))
    path = tmp_path / "embedded-agent.toml"
    path.write_text(
        embedded_agent_toml(
            agent_id="coordinator-host",
            state_dir=tmp_path / "embedded agent",
            prefix="site/ember",
            broker_url="mqtt://user:p%40ss@broker.lan:1883",
            public_key=public_text(key),
            datasets=(("digits-test", holdout),),
        )
    )
    config = load_config(path, env={})
    assert config.id == "coordinator-host"
    assert config.labels == {"role": "aggregator"}
    assert config.allow_code is False
    assert config.topic_prefix == "site/ember"
    assert config.coordinator_keys == (public_text(key),)
    assert config.zeroconf.enabled is False
    assert [(d.name, d.path) for d in config.datasets] == [("digits-test", holdout)]
    assert config.homeassistant.enabled is False


def test_ember_serve_homeassistant_announces_the_embedded_agent_too(tmp_path: Path) -> None:
    key, _ = init_key(tmp_path)
    path = tmp_path / "embedded-agent.toml"
    path.write_text(
        embedded_agent_toml(
            agent_id="coordinator-host",
            state_dir=tmp_path / "state",
            prefix="ember/v1",
            broker_url="mqtt://127.0.0.1:1883",
            public_key=public_text(key),
            homeassistant="hass",
        )
    )
    config = load_config(path, env={})
    assert config.homeassistant.enabled is True
    assert config.homeassistant.discovery_prefix == "hass"


def test_the_embedded_agent_fails_over_between_the_coordinators_brokers(tmp_path: Path) -> None:
    """On a clustered broker the aggregator must follow the coordinator to the next node."""
    key, _ = init_key(tmp_path)
    path = tmp_path / "embedded-agent.toml"
    nodes = ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1884", "mqtt://127.0.0.1:1885")
    path.write_text(
        embedded_agent_toml(
            agent_id="coordinator-host",
            state_dir=tmp_path / "state",
            prefix="ember/v1",
            broker_url=nodes,
            public_key=public_text(key),
        )
    )
    assert load_config(path, env={}).broker.urls == nodes


def test_embedded_agent_id_is_a_topic_segment() -> None:
    assert embedded_agent_id("pi 4/b+#") == "coordinator-pi-4-b"
    assert embedded_agent_id("").startswith("coordinator-")


def test_one_coordinator_per_state_directory(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(ServiceError, match=r"another 'ember serve' \(pid \d+\) is using"):
            StateDirLock(tmp_path).acquire()
    finally:
        first.release()
    again = StateDirLock(tmp_path)
    again.acquire()
    again.release()

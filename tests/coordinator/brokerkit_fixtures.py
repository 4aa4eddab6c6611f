"""A real mosquitto started with a broker kit that ``ember broker config`` wrote."""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.protocol.topics import Topics
from agent.transport import BrokerConfig
from coordinator.brokerkit import BrokerKit, KitSettings, Listener
from coordinator.mosquitto import MosquittoProcess, free_port

FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "connect_timeout": 3.0}


@dataclass
class SecuredBroker:
    kit: BrokerKit
    process: MosquittoProcess

    @property
    def url(self) -> str:
        return self.kit.settings.url()

    @property
    def topics(self) -> Topics:
        return self.kit.topics

    def agent_config(self, agent: str, **options: Any) -> BrokerConfig:
        """The broker section of the agent.toml the kit wrote for ``agent``."""
        path = self.kit.credentials_dir(agent) / "agent.toml"
        broker = load_config(path, env={}).broker
        return BrokerConfig(
            urls=broker.urls,
            username=broker.username,
            password=broker.password,
            ca_file=broker.ca_file,
            **{**FAST, **options},
        )

    def env(self, account: str) -> dict[str, str]:
        """The variables of the broker.env the kit wrote for a coordinator or operator."""
        text = (self.kit.credentials_dir(account) / "broker.env").read_text()
        pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
        return dict(pairs)

    def account_config(self, account: str, **options: Any) -> BrokerConfig:
        env = self.env(account)
        return BrokerConfig(
            urls=(env["EMBER_BROKER"],), ca_file=env["EMBER_BROKER_CA"], **{**FAST, **options}
        )


def start_kit_broker(
    root: Path,
    topics: Topics,
    *,
    agents: tuple[str, ...] = (),
    aggregators: tuple[str, ...] = (),
    coordinator_keys: tuple[str, ...] = (),
) -> SecuredBroker:
    """Write a kit for a free loopback port and start mosquitto with exactly its files (plus a
    conf.d file that logs to the work directory and, as root, keeps mosquitto from switching to
    a user that could not read a test's temporary directory)."""
    port = free_port()
    settings = KitSettings(
        prefix=topics.prefix,
        hosts=("localhost", "127.0.0.1"),
        listeners=(Listener(port=port, bind="127.0.0.1"),),
        public_url=f"mqtts://localhost:{port}",
    )
    kit = BrokerKit.open(root / "kit", settings)
    for name in agents:
        kit.add_account(name, "agent", coordinator_keys=coordinator_keys)
    for name in aggregators:
        kit.add_account(name, "agent", aggregator=True, coordinator_keys=coordinator_keys)
    kit.add_account("op", "operator")
    kit.save()
    workdir = root / "mosquitto"
    workdir.mkdir()
    local = [f"log_dest file {workdir / 'mosquitto.log'}", "log_type all"]
    if os.geteuid() == 0:
        local.append(f"user {getpass.getuser()}")
    (kit.root / "conf.d" / "test.conf").write_text("\n".join(local) + "\n")
    process = MosquittoProcess(workdir, port=port, config_file=kit.root / "mosquitto.conf").start()
    return SecuredBroker(kit, process)


@pytest.fixture
def secured(tmp_path: Path, topics: Topics) -> Iterator[SecuredBroker]:
    """A kit broker with agents ``alice`` and ``bob`` and aggregator agent ``gw``."""
    broker = start_kit_broker(tmp_path, topics, agents=("alice", "bob"), aggregators=("gw",))
    try:
        yield broker
    finally:
        broker.process.stop()

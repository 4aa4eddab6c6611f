"""A three-node NATS cluster with MQTT enabled, on loopback: Ember's clustered-broker fixture.

NATS serves MQTT 3.1.1 (no MQTT 5, no QoS 2) on top of JetStream, so every node needs a
``server_name``, a JetStream store of its own and the cluster's routes; sessions, QoS 1
subscriptions and retained messages live in JetStream streams replicated on the three nodes
(``stream_replicas: 3``), which is what lets a client that loses its node carry on at
another. Each node listens on free loopback ports (client, HTTP monitoring, cluster route,
MQTT); the system NATS on 4222 is never touched.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coordinator.mosquitto import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
NODES = 3


@dataclass
class NatsNode:
    """One nats-server process of the cluster and its ports."""

    name: str
    directory: Path
    client_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def log(self) -> Path:
        return self.directory / "nats.log"

    def config(self, routes: list[int], extra: str = "") -> str:
        """nats.conf: JetStream, MQTT and, with other nodes, the cluster and its routes."""
        route_urls = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
        cluster = [
            "cluster {",
            "  name: ember-test",
            f"  listen: 127.0.0.1:{self.cluster_port}",
            f"  routes: [{route_urls}]",
            "}",
        ]
        return "\n".join(
            [
                f"server_name: {self.name}",
                f"listen: 127.0.0.1:{self.client_port}",
                f"http: 127.0.0.1:{self.http_port}",
                f'jetstream {{ store_dir: "{self.directory / "store"}" }}',
                *(cluster if routes else []),
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port}, "
                f"stream_replicas: {len(routes) + 1} }}",
                extra,
                "",
            ]
        )

    def healthy(self) -> bool:
        """The node's JetStream is up and current with the cluster (``/healthz``)."""
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:  # loopback only
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """Three nats-server processes routed to each other, each with JetStream and MQTT."""

    def __init__(self, directory: Path, nodes: int = NODES, extra_config: str = "") -> None:
        self.nodes = [NatsNode(f"n{i}", directory / f"n{i}") for i in range(nodes)]
        self.extra_config = extra_config
        """Further nats.conf lines for every node (``authorization { ... }``)."""

    @property
    def urls(self) -> tuple[str, ...]:
        """The nodes' MQTT URLs, node 0 first."""
        return tuple(node.mqtt_url for node in self.nodes)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        self.write_configs()
        for node in self.nodes:
            conf = node.directory / "nats.conf"
            with open(node.log, "wb") as log:
                node.process = subprocess.Popen(
                    [NATS_SERVER, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
                )
        deadline = time.monotonic() + timeout
        while not all(node.healthy() for node in self.nodes):
            dead = [node.name for node in self.nodes if not node.running]
            if dead or time.monotonic() > deadline:
                self.stop()
                logs = "\n".join(node.log.read_text()[-2000:] for node in self.nodes)
                raise RuntimeError(f"NATS cluster did not come up (dead: {dead}):\n{logs}")
            time.sleep(0.2)
        return self

    def write_configs(self) -> None:
        routes = [node.cluster_port for node in self.nodes]
        for node in self.nodes:
            (node.directory / "store").mkdir(parents=True, exist_ok=True)
            others = [p for p in routes if p != node.cluster_port]
            (node.directory / "nats.conf").write_text(node.config(others, self.extra_config))

    def reload(self, extra_config: str) -> None:
        """New ``extra_config`` on every node, read again on SIGHUP (clients stay connected)."""
        self.extra_config = extra_config
        self.write_configs()
        for node in self.nodes:
            if node.process is not None and node.running:
                node.process.send_signal(signal.SIGHUP)

    def kill(self, index: int) -> None:
        """SIGKILL one node: no goodbye to its clients or its routes."""
        process = self.nodes[index].process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            if node.running and node.process is not None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(5)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three NATS nodes with MQTT on loopback, stopped after the test (pass or fail)."""
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    cluster = NatsCluster(tmp_path / "nats").start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[Callable[..., NatsCluster]]:
    """Start NATS nodes with custom settings (``nodes``, ``extra_config``); all stopped after
    the test."""
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    started: list[NatsCluster] = []

    def start(**options: Any) -> NatsCluster:
        cluster = NatsCluster(tmp_path / f"nats-{len(started)}", **options)
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in started:
            cluster.stop()

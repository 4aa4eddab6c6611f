"""``ember broker config --websockets-port``: the kit's MQTT-over-WebSockets listener (TLS and
logins as on the MQTT listener), and the dashboard in headless Chromium logging in through it."""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.protocol.topics import Topics
from agent.transport import BrokerConfig, Transport
from coordinator.brokerkit import BrokerKit
from coordinator.cli import cli
from coordinator.dashboard import DashboardConfig, DashboardServer
from coordinator.mosquitto import MosquittoProcess, free_port
from tests.coordinator.browser import Chromium, find_chromium
from tests.coordinator.test_dashboard import needs_chromium


def broker_config_cmd(out: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["broker", "config", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return result.output


def listeners(out: Path) -> list[tuple[int, str]]:
    return [(x.port, x.protocol) for x in BrokerKit.load(out).settings.listeners]


def test_the_websockets_listener_is_added_kept_moved_and_removed(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    base = ("--port", "18883", "--bind", "127.0.0.1", "--host", "localhost")
    said = broker_config_cmd(out, *base, "--websockets-port", "9001")
    assert listeners(out) == [(18883, "mqtt"), (9001, "websockets")]
    conf = (out / "mosquitto.conf").read_text()
    block = conf[conf.index("listener 9001") :]
    for line in ("listener 9001 127.0.0.1", "protocol websockets", "allow_anonymous false"):
        assert line in block
    assert f"certfile {out.resolve() / 'server.crt'}" in block
    assert "dashboard: ember dashboard --ws-url wss://localhost:9001" in said
    broker_config_cmd(out, "--operator", "viewer")  # other changes keep it
    assert listeners(out) == [(18883, "mqtt"), (9001, "websockets")]
    broker_config_cmd(out, "--websockets-port", "9443")
    assert listeners(out) == [(18883, "mqtt"), (9443, "websockets")]
    broker_config_cmd(out, "--websockets-port", "0")
    assert listeners(out) == [(18883, "mqtt")]
    assert "protocol websockets" not in (out / "mosquitto.conf").read_text()
    result = CliRunner().invoke(
        cli, ["broker", "config", "--out", str(out), "--websockets-port", "18883"]
    )
    assert result.exit_code == 2
    assert "is the MQTT listener's port" in result.output


def spki_pin(cert_file: Path) -> str:
    """Chromium's --ignore-certificate-errors-spki-list value for one certificate."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


async def publish_as_coordinator(url: str, ca: str, topics: Topics) -> None:
    status = {"v": 1, "agent": "pi-porch", "state": "online", "session": 1, "ts": time.time()}
    config = BrokerConfig(urls=(url,), ca_file=ca, connect_timeout=5.0, backoff_max=0.5)
    async with Transport(config) as mqtt:
        await mqtt.wait_connected(10)
        await mqtt.publish(topics.agent_status("pi-porch"), json.dumps(status), retain=True)


@needs_chromium
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_dashboard_logs_in_over_wss_with_an_operator_account(
    tmp_path: Path, topics: Topics
) -> None:
    chromium = find_chromium()
    assert chromium is not None, "CI installs chromium (.ci/test)"
    out, port, ws_port = tmp_path / "kit", free_port(), free_port()
    broker_config_cmd(
        out,
        *("--port", str(port), "--bind", "127.0.0.1", "--host", "127.0.0.1"),
        *("--operator", "viewer", "--prefix", topics.prefix, "--websockets-port", str(ws_port)),
    )
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    local = [f"log_dest file {workdir / 'mosquitto.log'}", "log_type all"]
    if os.geteuid() == 0:  # keep mosquitto from switching to a user that cannot read tmp_path
        local.append(f"user {getpass.getuser()}")
    (out / "conf.d" / "test.conf").write_text("\n".join(local) + "\n")
    broker = MosquittoProcess(workdir, port=port, config_file=out / "mosquitto.conf").start()
    env = dict(
        line.split("=", 1)
        for line in (out / "credentials" / "viewer" / "broker.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    viewer = urlsplit(env["EMBER_BROKER"])
    coordinator_env = (out / "credentials" / "ember-coordinator" / "broker.env").read_text()
    coordinator_url = next(
        x.split("=", 1)[1] for x in coordinator_env.splitlines() if x.startswith("EMBER_BROKER=")
    )
    ws_url = f"wss://127.0.0.1:{ws_port}"
    page = DashboardServer(DashboardConfig(ws_url, topics.prefix)).start()
    try:
        asyncio.run(publish_as_coordinator(coordinator_url, env["EMBER_BROKER_CA"], topics))
        pin = f"--ignore-certificate-errors-spki-list={spki_pin(out / 'server.crt')}"
        with Chromium(chromium, tmp_path / "chromium", extra_args=[pin]) as browser:
            browser.open(page.url)
            # No anonymous access: the broker refuses, the page asks for a login.
            browser.wait_for(
                "document.getElementById('conn').dataset.state === 'refused' && "
                "!document.getElementById('login').hidden",
                60,
                "the login form",
            )
            browser.evaluate(
                "(() => { const f = document.getElementById('login');"
                f" f.username.value = {json.dumps(unquote(viewer.username or ''))};"
                f" f.password.value = {json.dumps(unquote(viewer.password or ''))};"
                " f.requestSubmit(); })()"
            )
            browser.wait_for(
                "document.querySelector('#agents tr[data-agent=\"pi-porch\"] td.state')"
                "?.textContent === 'online'",
                60,
                "the agent, read over wss:// as the operator",
            )
            assert browser.evaluate("document.getElementById('login').hidden")
            shot = browser.screenshot(tmp_path / "dashboard-wss.png")
            print(f"\ndashboard screenshot: {shot}")
    finally:
        page.stop()
        broker.stop()

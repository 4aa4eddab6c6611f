"""``ember dashboard``: the server's answers, and the page in real headless Chromium against a
real mosquitto (WebSockets listener) while a real job trains on a real fleet."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner

from agent.transport import Transport
from coordinator.cli import cli
from coordinator.dashboard import DashboardConfig, DashboardServer, default_ws_url
from tests.coordinator.browser import Chromium, find_chromium
from tests.coordinator.conftest import broker_config
from tests.coordinator.live_fleet import LiveFleet, live_fleet

__all__ = ["live_fleet"]  # the fixture, imported for the tests below


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    running = DashboardServer(DashboardConfig("ws://127.0.0.1:9001", "ember/v1")).start()
    try:
        yield running
    finally:
        running.stop()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# -- the server ----------------------------------------------------------------------------------


def test_the_page_and_its_scripts_are_served_with_a_strict_policy(
    server: DashboardServer,
) -> None:
    status, headers, body = fetch(server.url)
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="app.js"></script>' in body
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self' ws: wss:" in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    for name in ("app.js", "mqtt-ws.js"):
        status, headers, body = fetch(server.url + name)
        assert status == 200
        assert headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert b"export" in body or b"import" in body
    status, headers, body = fetch(server.url + "dashboard.css", method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["Content-Length"]) > 100


def test_config_names_the_broker_websocket_and_the_prefix(server: DashboardServer) -> None:
    status, headers, body = fetch(server.url + "config.json")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    config = json.loads(body)
    assert config["ws_url"] == "ws://127.0.0.1:9001"
    assert config["prefix"] == "ember/v1"


@pytest.mark.parametrize(
    "path", ["../pyproject.toml", "%2e%2e/server.py", "server.py", "static/app.js", "x"]
)
def test_nothing_but_the_page_files_is_served(server: DashboardServer, path: str) -> None:
    status, _, _ = fetch(server.url + path)
    assert status == 404


def test_the_websocket_url_is_guessed_from_the_broker_url() -> None:
    assert default_ws_url("mqtt://broker.lan:1883") == "ws://broker.lan:9001"
    assert default_ws_url("mqtts://user:pw@broker.lan") == "wss://broker.lan:9001"
    assert default_ws_url("mqtt://[::1]:1883") == "ws://[::1]:9001"


@pytest.mark.parametrize(
    ("ws_url", "problem"),
    [("http://broker:9001", "ws://host:port"), ("ws://u:secret@broker:9001", "credentials")],
)
def test_a_bad_websocket_url_is_refused(ws_url: str, problem: str) -> None:
    result = CliRunner().invoke(cli, ["dashboard", "--ws-url", ws_url, "--port", "0"])
    assert result.exit_code == 2
    assert problem in result.output
    assert "secret" not in result.output or problem == "credentials"


# -- in a real browser ---------------------------------------------------------------------------

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium; CI installs it)",
)

AGENT_ROWS = """(() => [...document.querySelectorAll('#agents tr[data-agent]')].map(r => ({
  id: r.dataset.agent, cells: [...r.cells].map(c => c.textContent)})))()"""
JOB = """(() => {
  const card = document.querySelector('section.job[data-job^="digits-fedbuff-"]');
  if (!card) return null;
  const curve = card.querySelector('svg.curve');
  const line = curve.querySelector('polyline');
  const facts = Object.fromEntries([...card.querySelectorAll('dd')].map(d => [d.dataset.fact,
    d.textContent]));
  return {id: card.dataset.job, phase: card.querySelector('.phase').textContent,
    points: Number(curve.dataset.points),
    drawn: line ? line.getAttribute('points').trim().split(' ').length : 0,
    spark: card.querySelectorAll('svg.spark polyline').length,
    progress: card.querySelector('progress').value, facts};
})()"""


def _live(browser: Chromium, agents: tuple[str, ...]) -> bool:
    rows = {r["id"]: r["cells"] for r in browser.evaluate(AGENT_ROWS) or []}
    job = browser.evaluate(JOB)
    return (
        all(a in rows and rows[a][1] == "online" for a in agents)
        and all(rows[a][2].endswith("%") for a in agents)  # telemetry arrived
        and job is not None
        and job["phase"] == "running"
        and job["points"] >= 3
    )


async def _publish_hostile_documents(fleet: LiveFleet) -> None:
    """An agent id that is HTML, and documents that are not JSON objects."""
    prefix = fleet.topics.prefix
    async with Transport(broker_config(fleet.url)) as mqtt:
        await mqtt.wait_connected(10)
        evil = "<img src=x onerror=window.pwned=1>"
        status = {"v": 1, "agent": evil, "state": "online", "session": 1, "ts": time.time()}
        await mqtt.publish(f"{prefix}/agents/{evil}/status", json.dumps(status), retain=True)
        await mqtt.publish(f"{prefix}/agents/garbage/status", b"\xff{not json", retain=True)
        await mqtt.publish(f"{prefix}/jobs/garbage-1/state", b"[1, 2, 3]", retain=True)


@needs_chromium
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_page_shows_the_fleet_and_a_running_jobs_curve_in_chromium(
    live_fleet: LiveFleet, tmp_path: Path
) -> None:
    fleet = live_fleet
    assert CHROMIUM is not None, "CI installs chromium (.ci/test)"
    page = DashboardServer(DashboardConfig(fleet.ws_url, fleet.topics.prefix)).start()
    # Told about nothing: the query string must name the broker and prefix.
    elsewhere = DashboardServer(DashboardConfig("ws://127.0.0.1:9", "nothing/here")).start()
    try:
        with Chromium(CHROMIUM, tmp_path / "chromium") as browser:
            browser.open(page.url)
            browser.wait_for(
                "document.getElementById('conn').dataset.state === 'connected'", 60, "connected"
            )
            demo = fleet.agents
            deadline = time.monotonic() + 240
            while not _live(browser, demo):
                assert time.monotonic() < deadline, (
                    fleet.errors,
                    browser.evaluate(AGENT_ROWS),
                    browser.evaluate(JOB),
                    browser.console[-20:],
                )
                time.sleep(0.5)
            shot = browser.screenshot(tmp_path / "dashboard.png")
            print(f"\ndashboard screenshot: {shot}")
            rows = {r["id"]: r["cells"] for r in browser.evaluate(AGENT_ROWS)}
            job = browser.evaluate(JOB)
            assert "/aggregator" in rows["demo-aggregator"][6]
            assert all("/trainer" in rows[a][6] for a in demo if a.startswith("demo-pi-"))
            assert job["drawn"] == job["points"]  # one vertex per model version with accuracy
            assert job["spark"] == 1
            assert 0.0 <= float(job["facts"]["accuracy"]) <= 1.0
            assert job["facts"]["stop"] == "acc ≥ 0.999 · 4 min"
            assert 0 < job["progress"] < 1
            summary = browser.evaluate("document.getElementById('summary').textContent")
            assert "agents 3/3 online" in summary
            assert shot.stat().st_size > 10_000

            # Hostile documents are shown as text or skipped, never run.
            asyncio.run(_publish_hostile_documents(fleet))
            browser.wait_for(
                "[...document.querySelectorAll('#agents tr[data-agent]')].some("
                "r => r.dataset.agent.startsWith('<img'))",
                30,
                "the agent whose id is HTML",
            )
            assert browser.evaluate("window.pwned === undefined")
            assert browser.evaluate("document.querySelectorAll('#agents img').length") == 0
            assert browser.evaluate("document.querySelector('[data-agent=\"garbage\"]')") is None
            assert browser.evaluate("document.querySelector('[data-job=\"garbage-1\"]')") is None
            assert not [c for c in browser.console if c.startswith("exception")]

            # Another server that knows nothing: the query string says where to look.
            query = urlencode({"broker": fleet.ws_url, "prefix": fleet.topics.prefix})
            browser.navigate(f"{elsewhere.url}?{query}")
            browser.wait_for(
                "document.querySelectorAll('#agents tr[data-agent=\"demo-pi-0\"]').length === 1",
                60,
                "the fleet through the query string",
            )
    finally:
        page.stop()
        elsewhere.stop()

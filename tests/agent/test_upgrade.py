"""``ember-agent upgrade``: side-by-side environments, a switch, a restart and a rollback.

Real processes throughout: three wheels built from this tree (as it is, with a newer version,
and a newer version whose agent exits at start), real virtual environments installed by pip
(dependencies from this machine's package index), a real agent reaching a real mosquitto. The
service manager is the one part played by a script (``restart.sh`` stops the running agent and
starts ``PREFIX/bin/ember-agent`` again), because systemd is not PID 1 here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.health import check_health, health_path
from agent.protocol.topics import Topics
from agent.transport import Transport
from coordinator.mosquitto import MosquittoProcess
from tests.agent.conftest import REPO, agent_toml, next_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RESTART = """\
#!/bin/bash
# Plays systemctl restart: stop the agent in the pid file, start PREFIX/bin/ember-agent.
set -u
pidfile=$1 prefix=$2 config=$3 log=$4
if [ -f "$pidfile" ]; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && break
        sleep 0.1
    done
fi
setsid "$prefix/bin/ember-agent" --log-format json run --config "$config" >>"$log" 2>&1 </dev/null &
echo $! >"$pidfile"
"""


def build_wheel(tmp: Path, version: str, *, broken: bool = False) -> Path:
    """A wheel of this tree with ``version``; ``broken``: its agent exits 3 instead of running."""
    hatchling = pytest.importorskip("hatchling.builders.wheel")
    tree = tmp / f"tree-{version}"
    for name in ("agent", "coordinator", "systemd"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    init = tree / "agent" / "__init__.py"
    text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
    init.write_text(text)
    if broken:
        cli = tree / "agent" / "cli.py"
        cli.write_text(
            cli.read_text().replace(
                "def main() -> None:\n",
                "def main() -> None:\n    if 'run' in sys.argv:\n        sys.exit(3)\n",
            )
        )
    (path,) = hatchling.WheelBuilder(str(tree)).build(
        directory=str(tmp / "dist"), versions=["standard"]
    )
    return Path(path)


def ember_agent(*args: str) -> subprocess.CompletedProcess[str]:
    """This tree's CLI (installed in the test's environment), with no PYTHONPATH: the agents
    it starts must import the versions installed in their own environments."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )


async def test_upgrade_switches_and_a_version_that_does_not_come_online_is_rolled_back(
    mosquitto: MosquittoProcess, watcher: Transport, topics: Topics, tmp_path: Path
) -> None:
    current_version = __import__("agent").__version__
    wheels = {
        "a": build_wheel(tmp_path, current_version),
        "b": build_wheel(tmp_path, "99.0.0"),
        "bad": build_wheel(tmp_path, "99.1.0", broken=True),
    }
    prefix = tmp_path / "prefix"
    first = prefix / "venvs" / "20000101T000000Z-1"
    for step in (
        [sys.executable, "-m", "venv", str(first)],
        [str(first / "bin" / "python"), "-m", "pip", "install", "-q", str(wheels["a"])],
    ):
        done = await asyncio.to_thread(subprocess.run, step, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    (prefix / "current").symlink_to(first.relative_to(prefix))
    (prefix / "bin").symlink_to("current/bin")

    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(
        agent_toml(state_dir=state, broker_url=mosquitto.url, topics=topics, agent_id="pi-up")
    )
    script = tmp_path / "restart.sh"
    script.write_text(RESTART)
    pidfile, log = tmp_path / "agent.pid", tmp_path / "agent.log"
    restart = f"bash {script} {pidfile} {prefix} {config} {log}"
    status = await watcher.subscribe(topics.agent_status("pi-up"))
    upgrade = ["upgrade", "--config", str(config), "--prefix", str(prefix), "--restart", restart]
    try:
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        await asyncio.to_thread(subprocess.run, restart.split(), check=True, env=clean)
        await next_json(status, 60, state="online")

        done = await asyncio.to_thread(
            ember_agent, *upgrade, "--wheel", str(wheels["b"]), "--timeout", "90"
        )
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()
        assert done.stdout.startswith("upgraded: running 99.0.0")
        health = check_health(health_path(state), require_online=True)
        assert health.ok, health.reason
        assert health.health is not None
        assert health.health.version == "99.0.0"
        upgraded_to = (prefix / "current").resolve()
        assert upgraded_to != first.resolve()
        assert first.exists()  # the previous environment stays for a rollback

        done = await asyncio.to_thread(
            ember_agent, *upgrade, "--wheel", str(wheels["bad"]), "--timeout", "20"
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stdout.startswith("rolled_back: running 99.0.0"), done.stdout
        assert "version 99.1.0 did not come online in 20 s" in done.stdout
        assert (prefix / "current").resolve() == upgraded_to
        assert {p.resolve() for p in (prefix / "venvs").iterdir()} == {
            first.resolve(),
            upgraded_to,
        }
        result = json.loads((state / "upgrade.json").read_text())
        assert (result["outcome"], result["requested"], result["running"]) == (
            "rolled_back",
            "99.1.0",
            "99.0.0",
        )
        health = check_health(health_path(state), require_online=True)
        assert health.ok, health.reason
        assert health.health is not None
        assert health.health.version == "99.0.0"
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_nothing_is_switched_when_the_new_version_cannot_be_installed(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "venvs" / "old").mkdir(parents=True)
    (prefix / "venvs" / "old" / "ember-version").write_text("0.1.0\n")
    (prefix / "current").symlink_to("venvs/old")
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nid = "pi-up"\nstate_dir = "{tmp_path / "state"}"\n')
    not_a_wheel = tmp_path / "ember_fl-9.9.9-py3-none-any.whl"
    not_a_wheel.write_bytes(b"not a zip")
    done = ember_agent(
        "upgrade", "--config", str(config), "--prefix", str(prefix), "--restart", "false",
        "--wheel", str(not_a_wheel), "--timeout", "1",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout.startswith("failed: running 0.1.0"), done.stdout
    assert os.readlink(prefix / "current") == "venvs/old"
    assert sorted(p.name for p in (prefix / "venvs").iterdir()) == ["old"]
    result = json.loads((tmp_path / "state" / "upgrade.json").read_text())
    assert result["outcome"] == "failed"
    assert textwrap.shorten(result["reason"], 20)

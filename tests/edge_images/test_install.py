"""``edge_images/install.sh`` in a fresh Debian root (debootstrap), as on a real device.

The script installs the agent from a wheel built from this tree (its dependencies come from the
package index pip uses on this machine), creates the ``ember`` user, the unit and the
configuration; ``systemd-analyze verify`` inside the root checks the unit with its drop-in; the
agent is then started directly (systemd is not PID 1 in a chroot) and must reach the test's
mosquitto on loopback, publish its retained online status and say it is healthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from agent.protocol.topics import Topics
from agent.transport import Subscription, Transport
from coordinator.mosquitto import MosquittoProcess
from tests.agent.conftest import REPO, next_json
from tests.edge_images.debian_root import DebianRoot, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WHY_NOT = unavailable()


@pytest.fixture
def debian(tmp_path: Path) -> DebianRoot:
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    return DebianRoot(tmp_path / "root")


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    builder = pytest.importorskip("hatchling.builders.wheel")
    (path,) = builder.WheelBuilder(str(REPO)).build(
        directory=str(tmp_path / "dist"), versions=["standard"]
    )
    return Path(path)


async def test_install_sh_in_a_fresh_debian_root(
    debian: DebianRoot,
    wheel: Path,
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    tmp_path: Path,
) -> None:
    # Only the script and the wheel go in: the unit must come from the wheel itself.
    src = debian.file("/src")
    src.mkdir()
    shutil.copy(REPO / "edge_images" / "install.sh", src / "install.sh")
    shutil.copy(wheel, src / wheel.name)
    install = [
        "bash", "/src/install.sh", "--wheel", f"/src/{wheel.name}",
        "--broker", mosquitto.url, "--agent-id", "pi-chroot", "--topic-prefix", topics.prefix,
        "--label", "site=lab", "--label", 'room=shed "b"', "--no-zeroconf",
    ]  # fmt: skip
    done = await debian.arun(*install)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "systemd is not running here" in done.stdout

    unit = debian.file("/etc/systemd/system/ember-agent.service")
    assert unit.read_bytes() == (REPO / "systemd" / "ember-agent.service").read_bytes()
    wanted = debian.file("/etc/systemd/system/multi-user.target.wants/ember-agent.service")
    assert wanted.is_symlink()
    verify = await debian.arun("systemd-analyze", "verify", "ember-agent.service")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "ember-agent" not in verify.stderr, verify.stderr  # no warnings about the unit
    show = await debian.arun("getent", "passwd", "ember")
    assert show.returncode == 0
    assert show.stdout.split(":")[6].strip() == "/usr/sbin/nologin"
    config = debian.file("/etc/ember-agent/agent.toml")
    assert oct(config.stat().st_mode & 0o777) == "0o640"

    status = await watcher.subscribe(topics.agent_status("pi-chroot"))
    info = await watcher.subscribe(topics.agent_info("pi-chroot"))
    log = await run_agent_until_online(debian, status, "pi-chroot", tmp_path)
    document = await next_json(info, 60, agent="pi-chroot")
    assert document["labels"] == {"site": "lab", "room": 'shed "b"'}
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert "agent_stopped" in {e.get("event") for e in events}

    # Enrolment goes through `ember-agent enroll`; a refused token starts nothing and leaves
    # the configuration as it was.
    before_enrol = config.read_bytes()
    refused = await debian.arun(
        "bash", "/src/install.sh", "--configure-only",
        "--enroll-url", mosquitto.url, "--token", "not-a-token",
    )  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "token: expected <id>.<secret>" in refused.stderr
    assert "enrolment failed" in refused.stderr
    assert config.read_bytes() == before_enrol

    # Again, with no configuration argument: an upgrade in place. The configuration is kept,
    # a second environment is made and switched to, and the first stays for a rollback.
    before = (debian.file("/opt/ember-agent/current").readlink(), config.read_bytes())
    again = await debian.arun("bash", "/src/install.sh", "--wheel", f"/src/{wheel.name}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "keeping the existing /etc/ember-agent/agent.toml" in again.stdout
    assert config.read_bytes() == before[1]
    after = debian.file("/opt/ember-agent/current").readlink()
    assert after != before[0]
    kept = {p.name for p in debian.file("/opt/ember-agent/venvs").iterdir()}
    assert kept == {before[0].name, after.name}


async def test_the_pi_gen_stage_installs_the_agent_and_first_boot_configures_it(
    debian: DebianRoot,
    wheel: Path,
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    tmp_path: Path,
) -> None:
    """The stage's scripts as pi-gen runs them (00-run.sh on the host with ROOTFS_DIR, then
    00-run-chroot.sh fed to ``bash -e`` inside the root), on amd64 instead of arm64; then what
    cloud-init's runcmd does on first boot."""
    stage = tmp_path / "stage-ember"
    shutil.copytree(REPO / "edge_images" / "rpi" / "stage-ember", stage)
    sub = stage / "00-install-ember"
    shutil.copy(wheel, sub / "files" / wheel.name)
    env = {**os.environ, "ROOTFS_DIR": str(debian.path), "EMBER_REPO": str(REPO)}
    host = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-e", "00-run.sh"],
        cwd=sub,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert host.returncode == 0, host.stdout + host.stderr
    shutil.copy(sub / "00-run-chroot.sh", debian.file("/root/00-run-chroot.sh"))
    chroot = await debian.arun("bash", "-e", "/root/00-run-chroot.sh")
    assert chroot.returncode == 0, chroot.stdout + chroot.stderr
    assert "installed without a configuration" in chroot.stdout

    # The image: agent, unit, example configuration, setup script and cloud-init seed; the
    # agent neither configured nor enabled until first boot.
    assert debian.file("/opt/ember-agent/bin/ember-agent").exists()
    assert debian.file("/etc/systemd/system/ember-agent.service").exists()
    assert debian.file("/etc/ember-agent/agent.toml.example").exists()
    assert not debian.file("/etc/ember-agent/agent.toml").exists()
    wants = debian.file("/etc/systemd/system/multi-user.target.wants/ember-agent.service")
    assert not wants.is_symlink()
    assert debian.file("/etc/cloud/cloud.cfg.d/99-ember-nocloud.cfg").exists()
    for seed in ("user-data", "meta-data"):
        assert debian.file(f"/boot/firmware/{seed}").exists()
    assert not debian.file("/tmp/ember-install").exists()

    # First boot: the user-data's explicit-settings variant of runcmd.
    first_boot = await debian.arun(
        "ember-agent-setup", "--configure-only", "--broker", mosquitto.url,
        "--agent-id", "pi-stage", "--topic-prefix", topics.prefix, "--no-zeroconf",
    )  # fmt: skip
    assert first_boot.returncode == 0, first_boot.stdout + first_boot.stderr
    assert wants.is_symlink()
    status = await watcher.subscribe(topics.agent_status("pi-stage"))
    await run_agent_until_online(debian, status, "pi-stage", tmp_path)


async def run_agent_until_online(
    debian: DebianRoot,
    status: Subscription,
    agent_id: str,
    tmp_path: Path,
) -> Path:
    """Start the installed agent inside the root as ``ember`` (as the unit would), wait for its
    retained online status and for ``ember-agent health --online``, stop it with SIGTERM and
    see it go offline cleanly; its log."""
    agent_cmd = ["/opt/ember-agent/bin/ember-agent", "--log-format", "json"]
    as_ember = ["setpriv", "--reuid=ember", "--regid=ember", "--init-groups"]
    config = ["--config", "/etc/ember-agent/agent.toml"]
    log = tmp_path / f"{agent_id}.log"
    with log.open("wb") as sink:
        agent = await debian.start(*as_ember, *agent_cmd, "run", *config, output=sink)
    try:
        online = await next_json(status, 60, state="online")
        assert online["agent"] == agent_id
        health = await debian.arun(*as_ember, *agent_cmd, "health", "--online", *config)
        assert health.returncode == 0, health.stdout + health.stderr + log.read_text()
        assert f"healthy: agent {agent_id} online" in health.stdout
    finally:
        if agent.returncode is None:
            agent.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(agent.wait(), 30)
    assert code == 0, log.read_text()
    assert (await next_json(status, 10, state="offline"))["reason"] == "stopped"
    return log


def test_bad_arguments_are_refused_with_a_reason(debian: DebianRoot) -> None:
    shutil.copy(REPO / "edge_images" / "install.sh", debian.file("/install.sh"))
    for args, says in [
        (["--wheel", "a.whl", "--version", "1"], "at most one of --version, --wheel"),
        (["--enroll-url", "mqtts://x"], "--enroll-url needs --token"),
        (["--label", "nokey"], "--label expects KEY=VALUE"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--wheel", "/missing.whl", "--no-apt"], "--wheel: no such file /missing.whl"),
    ]:
        done = debian.run("bash", "/install.sh", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert says in done.stderr, (args, done.stderr)

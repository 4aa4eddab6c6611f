"""``ember top``: rendered through rich's capture, from retained documents on a real mosquitto,
and live in a pseudo-terminal watching a real job on a real fleet."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from agent.protocol.topics import Topics
from agent.transport import Inbound, Transport
from coordinator.cli import cli
from coordinator.cli.top import Frame, render, sparkline, stop_rules
from coordinator.jobboard import JobBoard
from coordinator.mosquitto import MosquittoProcess
from coordinator.registry import Registry
from tests.coordinator.conftest import agent_info, broker_config
from tests.coordinator.live_fleet import LiveFleet, live_fleet, plain

__all__ = ["live_fleet"]  # the fixture, imported for the tests below

NOW = 1_795_385_200.0


def job_state(job: str = "digits-3f9a1c", **changes: Any) -> dict[str, Any]:
    """A job state document shaped as the coordinator's (docs/topics.md's example)."""
    doc = {
        "v": 1,
        "job": job,
        "name": "digits",
        "phase": "running",
        "reason": "",
        "mode": "async",
        "model_version": 12,
        "updates_applied": 36,
        "metrics": {"loss": 0.412, "accuracy": 0.871, "train_loss": 0.455},
        "progress": 0.24,
        "trainers": {"running": 3, "standby": 1},
        "submitted": NOW - 100,
        "started": NOW - 90,
        "finished": None,
        "stop": {"target_accuracy": 0.95, "max_versions": 50},
        "agents": {},
        "ts": NOW - 1,
    }
    doc.update(changes)
    return doc


def status(agent: str, state: str = "online", reason: str = "") -> dict[str, Any]:
    return {
        "v": 1,
        "type": "agent_status",
        "id": f"{agent}-{state}",
        "agent": agent,
        "state": state,
        "session": 1,
        "ts": NOW - 50,
        "reason": reason,
    }


def telemetry(agent: str) -> dict[str, Any]:
    return {
        "v": 1,
        "agent": agent,
        "ts": NOW - 4,
        "cpu_percent": 37.2,
        "load": [0.43, 0.94, 1.01],
        "memory": {"total": 4 << 30, "available": 1 << 30, "percent": 75.0},
        "temperature": {"cpu_thermal": 61.3, "gpu": 55.0},
        "temperature_max": 61.3,
        "roles": ["digits-3f9a1c/trainer"],
        "updates_sent": 17,
    }


def roles(agent: str, job: str, state: str = "running") -> dict[str, Any]:
    key = f"{job}/trainer"
    return {
        "v": 1,
        "agent": agent,
        "ts": NOW - 10,
        "roles": {
            key: {"job": job, "role": "trainer", "state": state, "reason": "", "since": NOW - 9}
        },
    }


def message(topic: str, payload: bytes | str) -> Inbound:
    data = payload.encode() if isinstance(payload, str) else payload
    return Inbound(topic=topic, payload=data, retain=True, qos=1)


def capture(frame: Frame, width: int = 200) -> str:
    out = Console(width=width, record=True, color_system=None, force_terminal=False)
    out.print(render(frame))
    return out.export_text()


# -- pieces --------------------------------------------------------------------------------------


def test_sparkline_scales_between_the_lowest_and_highest_value() -> None:
    assert sparkline([0.1, 0.5, 0.9]) == "▁▅█"
    assert sparkline([0.7, 0.7]) == "▄▄"
    assert sparkline([]) == ""
    assert sparkline([float(i) for i in range(100)], width=5) == "▁▃▅▆█"


def test_stop_rules_name_every_rule_that_is_set() -> None:
    assert stop_rules({"target_accuracy": 0.95, "max_versions": 50, "max_minutes": 2.5}) == (
        "acc ≥ 0.95 · 50 versions · 2.5 min"
    )
    assert stop_rules({"max_updates": 300}) == "300 updates"
    assert stop_rules(None) == ""


# -- the job board -------------------------------------------------------------------------------


def test_job_board_keeps_the_state_and_an_accuracy_history() -> None:
    topics = Topics("t/v1")
    board = JobBoard(None, topics, clock=lambda: NOW)  # type: ignore[arg-type]
    state_topic = topics.job_state("digits-3f9a1c")
    history = [{"version": 2, "accuracy": 0.41}, {"version": 6, "accuracy": 0.72}, [9, 0.8]]
    board.apply(message(state_topic, json.dumps(job_state(history=history))))
    event = {"v": 1, "event": "model_version", "version": 13, "accuracy": 0.88, "loss": 0.3}
    board.apply(message(topics.job_metrics("digits-3f9a1c", "gw"), json.dumps(event)))
    job = board.get("digits-3f9a1c")
    assert job is not None
    assert job.phase == "running"
    assert job.curve() == [(2, 0.41), (6, 0.72), (9, 0.8), (12, 0.871), (13, 0.88)]


def test_job_board_skips_bad_documents_and_forgets_a_cleared_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = Topics("t/v1")
    board = JobBoard(None, topics, clock=lambda: NOW)  # type: ignore[arg-type]
    state_topic = topics.job_state("a-1")
    board.apply(message(state_topic, json.dumps(job_state("a-1"))))
    for bad in (b"\xff\xfe", b"[1, 2]", b"{not json", json.dumps({"history": "x"}).encode()):
        board.apply(message(state_topic, bad))
    nan_event = b'{"event": "model_version", "version": 14, "accuracy": NaN}'
    board.apply(message(topics.job_metrics("a-1", "gw"), nan_event))
    board.apply(message(topics.job_metrics("unknown-job", "gw"), nan_event))
    board.apply(message(f"{topics.prefix}/jobs/a-1/model/global", b"\xc1EC1"))
    job = board.get("a-1")
    assert job is not None
    # The last good document stays (the one without a phase replaced it: it was an object).
    assert [j.id for j in board.snapshot()] == ["a-1"]
    assert 14 not in job.accuracy
    assert board.get("unknown-job") is None
    board.apply(message(state_topic, b""))
    assert board.snapshot() == []
    progress = topics.job_progress("a-1", "pi-1")
    board.apply(message(progress, json.dumps({"roles": {"trainer": {"state": "sending"}}})))
    assert board.role_progress("a-1", "pi-1", "trainer") == {"state": "sending"}
    assert board.role_progress("a-1", "pi-1", "aggregator") is None
    board.apply(message(progress, b'{"roles": ["not", "a", "map"]}'))
    assert board.role_progress("a-1", "pi-1", "trainer") is None
    board.apply(message(progress, json.dumps({"roles": {"trainer": {"state": "sending"}}})))
    board.apply(message(progress, b""))
    assert board.role_progress("a-1", "pi-1", "trainer") is None


def test_running_job_progress_moves_with_the_clock_towards_its_time_limit() -> None:
    topics = Topics("t/v1")
    board = JobBoard(None, topics)  # type: ignore[arg-type]
    doc = job_state(progress=0.1, started=NOW - 30, stop={"max_minutes": 1.0})
    board.apply(message(topics.job_state("j-1"), json.dumps(doc)))
    job = board.get("j-1")
    assert job is not None
    assert job.progress(NOW) == pytest.approx(0.5)
    assert job.progress(NOW + 3600) == 1.0
    board.apply(message(topics.job_state("j-1"), json.dumps({**doc, "phase": "failed"})))
    assert job.progress(NOW) == pytest.approx(0.1)


# -- rendering -----------------------------------------------------------------------------------


def test_render_shows_agent_health_roles_and_job_progress() -> None:
    topics = Topics("t/v1")
    registry = Registry(None, topics, clock=lambda: NOW)  # type: ignore[arg-type]
    registry.update("pi-kitchen", "status", status("pi-kitchen"))
    registry.update("pi-kitchen", "info", agent_info("pi-kitchen"))
    registry.update("pi-kitchen", "telemetry", telemetry("pi-kitchen"))
    registry.update("pi-kitchen", "roles", roles("pi-kitchen", "digits-3f9a1c"))
    registry.update("pi-shed", "status", status("pi-shed", "offline", "connection lost"))
    board = JobBoard(None, topics, clock=lambda: NOW)  # type: ignore[arg-type]
    points = [{"version": v, "accuracy": a} for v, a in ((1, 0.2), (4, 0.5), (8, 0.8))]
    board.update_state(
        "digits-3f9a1c", job_state(history={"points": points}, stragglers=["pi-shed"])
    )
    progress = {"v": 1, "roles": {"trainer": {"state": "training", "updates_sent": 17}}}
    board.apply(message(topics.job_progress("digits-3f9a1c", "pi-kitchen"), json.dumps(progress)))
    board.update_state(
        "old-000001", job_state("old-000001", phase="completed", progress=1.0, finished=NOW - 5)
    )
    text = capture(
        Frame(
            registry.snapshot(),
            board.snapshot(),
            source="mqtt://broker:1883 t/v1",
            now=NOW,
            role_progress=board.role_progress,
        )
    )
    lines = text.splitlines()
    assert "agents 1/2 online" in lines[0]
    assert "jobs 1 running/2" in lines[0]
    kitchen = next(line for line in lines if line.startswith("pi-kitchen"))
    assert kitchen.rstrip().endswith("4s")  # the telemetry sample's age
    for shown in ("online", "37%", "75%", "61°C", "0.43", " 17 ", "digits-3f9a1c/trainer training"):
        assert shown in kitchen, (shown, kitchen)
    shed = next(line for line in lines if line.startswith("pi-shed"))
    assert "offline (connection lost)" in shed
    running = next(line for line in lines if line.startswith("digits-3f9a1c"))
    for shown in (
        "running",
        "24%",
        "12",
        "36",
        "0.8710",
        "▁▄▇█",
        "3/3 · 1 lagging",
        "acc ≥ 0.95 · 50 versions",
    ):
        assert shown in running, (shown, running)
    assert "█████░░░░░░░░░░░░░░░" in running  # the progress bar: 24% of 20 cells
    # Running jobs come first.
    assert lines.index(running) < lines.index(next(x for x in lines if x.startswith("old-")))
    done = next(line for line in lines if line.startswith("old-000001"))
    assert "completed" in done
    assert "100%" in done


def test_render_says_when_there_is_nothing_yet() -> None:
    text = capture(Frame([], [], source="x", now=NOW, connected=False))
    assert "no agents on this prefix yet" in text
    assert "no jobs on this prefix yet" in text
    assert "broker unreachable" in text


# -- against a broker ----------------------------------------------------------------------------


async def publish_fleet(url: str, topics: Topics) -> None:
    async with Transport(broker_config(url)) as mqtt:
        await mqtt.wait_connected(5)
        for agent, state in (("pi-kitchen", "online"), ("pi-shed", "offline")):
            await mqtt.publish(
                topics.agent_status(agent), json.dumps(status(agent, state)), retain=True
            )
        await mqtt.publish(
            topics.agent_roles("pi-kitchen"),
            json.dumps(roles("pi-kitchen", "digits-3f9a1c")),
            retain=True,
        )
        history = [{"version": v, "accuracy": v / 20} for v in range(1, 13)]
        await mqtt.publish(
            topics.job_state("digits-3f9a1c"),
            json.dumps(job_state(history=history)),
            retain=True,
        )


def test_top_once_prints_the_retained_fleet_and_jobs(
    mosquitto: MosquittoProcess, topics: Topics
) -> None:
    asyncio.run(publish_fleet(mosquitto.url, topics))
    result = CliRunner().invoke(
        cli, ["top", "--once", "--broker", mosquitto.url, "--prefix", topics.prefix]
    )
    assert result.exit_code == 0, result.output
    assert "agents 1/2 online" in result.output
    assert "digits-3f9a1c/trainer" in result.output
    job = next(x for x in result.output.splitlines() if x.startswith("digits-3f9a1c"))
    assert "running" in job
    assert "0.8710" in job
    # Versions 1-11 from the history, 12 from the latest metrics.
    assert sparkline([v / 20 for v in range(1, 12)] + [0.871]) in job


def test_top_without_a_broker_says_so() -> None:
    from coordinator.mosquitto import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["top", "--once", "--broker", url, "--timeout", "1"])
    assert result.exit_code == 2
    assert f"cannot reach the MQTT broker at {url}" in result.output


# -- live, in a terminal, watching a real job ----------------------------------------------------


def start_in_terminal(args: list[str], columns: int = 200, rows: int = 60) -> tuple[Any, int]:
    """Run ``args`` with a pseudo-terminal as its controlling terminal; the master's fd."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # As in a login session: a test run started in the background by a shell without job
        # control (as CI may be) ignores SIGINT and SIGQUIT, and its children inherit that.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "CI")}
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
        env=env,
    )
    os.close(slave)
    return process, master


def read_until(master: int, done: Any, timeout: float) -> str:
    """Everything the terminal showed until ``done(plain text)`` holds (or the timeout)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if done(plain(seen.decode(errors="replace"))):
                break
    return seen.decode(errors="replace")


def wait_reading(process: Any, master: int, timeout: float) -> tuple[int | None, str]:
    """``process``'s exit code (``None`` if it still runs after ``timeout``) and what it showed
    meanwhile: read, as a program writing to a terminal nobody reads blocks once the
    terminal's buffer is full, and never exits."""
    shown = read_until(master, lambda _: process.poll() is not None, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(1)  # its terminal closed: gone, or about to be
    return process.poll(), plain(shown)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_top_live_in_a_terminal_follows_a_running_job(live_fleet: LiveFleet) -> None:
    fleet = live_fleet
    process, master = start_in_terminal(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "top",
            "--broker",
            fleet.url,
            "--prefix",
            fleet.topics.prefix,
            "--interval",
            "0.3",
        ]
    )
    try:

        def last_frame(text: str) -> str:
            return text[text.rfind("ember top") :]

        def shows_the_job_training(text: str) -> bool:
            frame = last_frame(text)
            job = [x for x in frame.splitlines() if x.startswith("digits-fedbuff-")]
            agents = [x for x in frame.splitlines() if x.startswith("demo-pi-")]
            return (
                len(agents) == 2
                and all("online" in a and "%" in a for a in agents)
                and bool(job)
                and "running" in job[0]
                and any(c in job[0] for c in "▁▂▃▄▅▆▇█")
            )

        screen = read_until(master, shows_the_job_training, timeout=240)
        frame = last_frame(plain(screen))
        assert shows_the_job_training(plain(screen)), (fleet.errors, frame[-3000:])
        assert "agents 3/3 online" in frame
        agg = next(x for x in frame.splitlines() if x.startswith("demo-aggregator"))
        assert "/aggregator" in agg

        def trainers_report(text: str) -> bool:  # what they publish on their progress topics
            rows = [x for x in last_frame(text).splitlines() if x.startswith("demo-pi-")]
            states = ("training", "sending", "waiting_ack", "waiting_model")
            return len(rows) == 2 and all(any(w in x for w in states) for x in rows)

        more = read_until(master, trainers_report, timeout=60)
        assert trainers_report(plain(screen + more)), last_frame(plain(screen + more))
        os.write(master, b"\x03")  # Ctrl-C, through the terminal's line discipline
        code, shown = wait_reading(process, master, 30)
        assert code == 0, shown[-3000:]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
        os.close(master)

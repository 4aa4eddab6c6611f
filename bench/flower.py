"""Flower, installed and run by the benchmark itself: never a dependency of Ember.

:func:`flower_venv` makes ``bench/.flower-venv`` (git-ignored) with ``flwr==1.40.0`` the first
time (1.42 needs a newer certifi than the package index has). :class:`FlowerFederation` runs
Flower's deployment engine on loopback as its documentation describes it: one
``flower-superlink --insecure`` and N ``flower-supernode --insecure`` processes, then ``flwr run``
of the numpy-only app in ``bench/flower_app`` against a SuperLink connection written into a
private ``FLWR_HOME``. The ServerApp writes one JSON line per round; the benchmark reads them.
Telemetry and update checks are off; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from coordinator.mosquitto import free_port

FLOWER_VERSION = "1.40.0"
BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".flower-venv"
APP = BENCH / "flower_app"
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_venv() -> Path:
    """The ``bin`` directory of a virtual environment with Flower, made if missing."""
    python = VENV / "bin" / "python"
    if python.exists():
        done = subprocess.run(
            [str(python), "-c", "import flwr, sys; sys.stdout.write(flwr.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip() == FLOWER_VERSION:
            return VENV / "bin"
        shutil.rmtree(VENV)
    print(f"installing flwr=={FLOWER_VERSION} into {VENV} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"flwr=={FLOWER_VERSION}"], check=True
    )
    return VENV / "bin"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _toml_value(value: Any) -> str:
    return (
        json.dumps(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


class FlowerFederation:
    """A SuperLink and ``len(node_configs)`` SuperNodes on loopback, in ``workdir``."""

    def __init__(self, workdir: Path, node_configs: list[Mapping[str, Any]]) -> None:
        self.workdir = workdir
        self.node_configs = node_configs
        self.bin = flower_venv()
        self.home = workdir / "flwr-home"
        self.port = free_port()
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    @property
    def env(self) -> dict[str, str]:
        # The SuperLink and SuperNodes start their SuperExec (and apps) by name from PATH.
        path = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.home), "PATH": path}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115  closed in stop()
        self.logs.append(log)
        return subprocess.Popen(
            [str(self.bin / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(self.workdir),
        )

    def start(self) -> FlowerFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text(
            "[superlink]\n"
            'default = "bench"\n\n'
            "[superlink.bench]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        self.superlink = self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        _wait_for_port(self.port, self.superlink, 120)
        for i, node in enumerate(self.node_configs):
            config = " ".join(f"{k}={_toml_value(v)}" for k, v in node.items())
            self.supernodes.append(
                self._spawn(
                    f"supernode-{i}",
                    [
                        "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        config,
                    ],
                )
            )
        return self

    async def run(
        self, run_config: Mapping[str, Any], *, expect_lines: int, timeout: float
    ) -> list[dict[str, Any]]:
        """``flwr run`` the app with ``run_config``; the ServerApp's lines once it is done."""
        out = self.workdir / f"rounds-{time.monotonic_ns()}.jsonl"
        config = {**run_config, "nodes": len(self.node_configs), "out": str(out)}
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
        app = self.workdir / "app"
        if not app.exists():
            shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
        submit = await asyncio.create_subprocess_exec(
            str(self.bin / "flwr"),
            "run",
            str(app),
            "bench",
            "--run-config",
            overrides,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            cwd=str(self.workdir),
        )
        output, _ = await asyncio.wait_for(submit.communicate(), 120)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed: {output.decode(errors='replace')[-2000:]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self._read(out)
            if lines and (lines[-1].get("done") or len(lines) >= expect_lines + 1):
                return [line for line in lines if "round" in line]
            await asyncio.sleep(0.2)
        raise TimeoutError(
            f"Flower run did not finish in {timeout} s ({len(self._read(out))} lines); "
            f"see {self.workdir}/*.log"
        )

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def node_processes(self, index: int) -> list[psutil.Process]:
        """SuperNode ``index`` and every process under it (its SuperExec, ClientApps)."""
        root = psutil.Process(self.supernodes[index].pid)
        return [p for p in [root, *root.children(recursive=True)] if _alive(p)]

    def stop(self) -> None:
        processes = [*self.supernodes, *([self.superlink] if self.superlink else [])]
        for process in processes:
            for child in _children(process.pid):
                with contextlib.suppress(psutil.Error):
                    child.terminate()
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.logs:
            log.close()

    def __enter__(self) -> FlowerFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []

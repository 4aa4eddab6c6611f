"""Run a mosquitto broker from a configuration written here: for tests, benchmarks and demos.

:class:`MosquittoProcess` writes ``mosquitto.conf`` into a working directory, starts Debian's
``mosquitto`` on a free loopback port, waits until it accepts connections and stops it again
(SIGTERM, then SIGKILL). It can also be killed and restarted on the same port, which the
reliability tests use to take the broker away from running agents.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which(
        "mosquitto", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])
    )
    if found is None:
        raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class MosquittoProcess:
    """One mosquitto broker on loopback, configured by this object."""

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port at the first start; restarts keep it."""
    max_packet_size: int | None = None
    """Broker's packet limit in bytes (mosquitto disconnects clients that send larger ones)."""
    persistence: bool = False
    """Keep retained messages and sessions across restarts (in ``workdir``)."""
    extra_config: str = ""
    """Further mosquitto.conf lines (listeners, TLS, ACLs)."""
    config_file: Path | None = None
    """Run this existing configuration (a broker kit's) instead of writing one; set ``port``
    to its listener's port so :meth:`start` knows when the broker is up."""
    executable: str = field(default_factory=find_mosquitto)
    environment: dict[str, str] = field(default_factory=dict)
    """Variables added to mosquitto's environment (e.g. glibc's ``MALLOC_*`` tunables)."""
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "max_queued_messages 100000",
        ]
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start the broker and wait until its port accepts TCP connections."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        config = self.config_file or self.write_config()
        self._process = subprocess.Popen(
            [self.executable, "-c", str(config)],
            env={**os.environ, **self.environment} if self.environment else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = (
                    self._process.stderr.read().decode(errors="replace")
                    if self._process.stderr
                    else ""
                )
                raise RuntimeError(
                    f"mosquitto exited with {self._process.returncode}: {err.strip()} "
                    f"{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"mosquitto did not accept connections on {self.url} within {timeout} s")

    def reload(self) -> None:
        """SIGHUP: mosquitto reads its ACL and password files again, keeping its clients."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close(process)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes as a crashed one would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._close(process)

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def _close(self, process: subprocess.Popen[bytes]) -> None:
        if process.stderr is not None:
            process.stderr.close()
        self._process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""Upgrade the installed agent in place, and roll back when the new version does not come online.

The layout is the one ``edge_images/install.sh`` makes: every installation is a virtual
environment ``PREFIX/venvs/<UTC time>``, ``PREFIX/current`` points at the one in use and the
unit runs ``PREFIX/bin/ember-agent`` through ``PREFIX/bin -> current/bin``. An upgrade is an
A/B switch at the level of a virtual environment (the scheme of A/B system updates such as
RAUC or Mender, without a second partition):

1. a new environment beside the running one, with the new version from a package index
   (``ember-fl==V``) or a wheel, checked to run and to report that version;
2. ``current`` switched to it atomically (a new symlink renamed over the old one), then the
   service restarted (``systemctl restart ember-agent.service`` by default);
3. the agent's heartbeat file (:mod:`agent.health`) must say ``online`` with the new version
   within ``timeout`` seconds;
4. otherwise ``current`` goes back to the previous environment and the service is restarted
   again: the fleet keeps a working agent.

The outcome is written to ``state_dir/upgrade.json``; the agent puts it into its retained info
document (``last_upgrade``), so the operator sees it in any dashboard. Runs as root (it writes
PREFIX and restarts the service); blocking, one upgrade at a time (a lock file in PREFIX).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.health import Health, check_health, health_path

DEFAULT_PREFIX = Path("/opt/ember-agent")
DEFAULT_RESTART = "systemctl restart ember-agent.service"
RESULT_FILE = "upgrade.json"
PACKAGE = "ember-fl"


class UpgradeError(RuntimeError):
    """The new version could not be installed; nothing was switched."""


@dataclass(frozen=True)
class UpgradeResult:
    """What happened, as written to ``state_dir/upgrade.json``."""

    outcome: str
    """``upgraded``, ``rolled_back`` or ``failed`` (not installed, nothing switched)."""
    requested: str
    previous: str
    running: str
    reason: str
    ts: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()


@dataclass(frozen=True)
class Upgrade:
    """One upgrade request: a version from an index, or a wheel file."""

    prefix: Path
    state_dir: Path
    version: str | None = None
    wheel: Path | None = None
    index_url: str | None = None
    restart: str = DEFAULT_RESTART
    timeout: float = 120.0
    python: str = sys.executable

    def requirement(self) -> str:
        if self.wheel is not None:
            return str(self.wheel.resolve())
        if self.version is None:
            raise UpgradeError("give a version or a wheel")
        return f"{PACKAGE}=={self.version}"

    def run(self) -> UpgradeResult:
        """Install, switch, restart, check; roll back on failure. Writes the result file."""
        self.prefix.joinpath("venvs").mkdir(parents=True, exist_ok=True)
        with (self.prefix / ".upgrade.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.prefix / "current"
            previous = os.readlink(current)
            previous_version = _installed_version(self.prefix / previous)
            requested = self.version or (self.wheel.name if self.wheel else "")
            try:
                venv, new_version = self._install()
            except UpgradeError as exc:
                return self._finish("failed", requested, previous_version, previous_version, exc)
            _switch(current, venv.relative_to(self.prefix))
            started = time.time()
            self._restart()
            ok, reason = self._wait_online(new_version, started)
            if ok:
                return self._finish("upgraded", new_version, previous_version, new_version, reason)
            _switch(current, Path(previous))
            _remove(venv)  # never kept as a rollback target
            started = time.time()
            self._restart()
            back, why = self._wait_online(previous_version, started)
            running = previous_version if back else "unknown"
            note = f"{reason}; rolled back to {previous_version}" + ("" if back else f": {why}")
            return self._finish("rolled_back", new_version, previous_version, running, note)

    def _install(self) -> tuple[Path, str]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
        venv = self.prefix / "venvs" / stamp
        steps = [[self.python, "-m", "venv", str(venv)]]
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", "-q"]
        if self.index_url:
            pip += ["--index-url", self.index_url]
        steps.append([*pip, self.requirement()])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False, timeout=1800)
            if done.returncode != 0:
                _remove(venv)
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise UpgradeError(f"{shlex.join(step[:4])}... failed: {' '.join(tail)}")
        version = _installed_version(venv)
        if not version or (self.version is not None and version != self.version):
            _remove(venv)
            raise UpgradeError(f"the new environment reports version {version!r}")
        (venv / "ember-version").write_text(version + "\n", encoding="utf-8")
        return venv, version

    def _restart(self) -> None:
        subprocess.run(shlex.split(self.restart), check=False, timeout=120)

    def _wait_online(self, version: str, since: float) -> tuple[bool, str]:
        """Until ``timeout``: a heartbeat written after ``since`` saying online with ``version``."""
        deadline = time.monotonic() + self.timeout
        path = health_path(self.state_dir)
        last = "no heartbeat since the restart"
        while time.monotonic() < deadline:
            verdict = check_health(path, require_online=True)
            health: Health | None = verdict.health
            if health is not None and health.ts >= since:
                if verdict.ok and health.version == version:
                    return True, verdict.reason
                last = verdict.reason
            time.sleep(0.2)
        return False, f"version {version} did not come online in {self.timeout:g} s ({last})"

    def _finish(
        self, outcome: str, requested: str, previous: str, running: str, reason: object
    ) -> UpgradeResult:
        result = UpgradeResult(outcome, requested, previous, running, str(reason), time.time())
        path = self.state_dir / RESULT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(result.to_json())
        os.replace(tmp, path)
        _prune(self.prefix)
        return result


def read_result(state_dir: Path) -> dict[str, object] | None:
    """The last upgrade's result, for the info document; None if there is none or it is bad."""
    try:
        raw = json.loads((state_dir / RESULT_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _installed_version(venv: Path) -> str:
    marker = venv / "ember-version"
    if marker.exists():
        return marker.read_text(encoding="utf-8").strip()
    done = subprocess.run(
        [str(venv / "bin" / "ember-agent"), "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    words = done.stdout.split()  # "ember-agent, version 0.1.0"
    return words[-1] if done.returncode == 0 and words else ""


def _switch(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically: a new symlink renamed over the old one."""
    tmp = link.with_name(f".{link.name}.new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _remove(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)


def _prune(prefix: Path, keep: int = 2) -> None:
    """Keep the current environment and the newest others up to ``keep`` in all."""
    current = (prefix / "current").resolve()
    venvs = sorted((p for p in (prefix / "venvs").iterdir() if p.is_dir()), reverse=True)
    kept = [current]
    for venv in venvs:
        if venv.resolve() in kept:
            continue
        if len(kept) < keep:
            kept.append(venv.resolve())
        else:
            _remove(venv)

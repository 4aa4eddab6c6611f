"""A fresh Debian root made with debootstrap, to run ``edge_images/install.sh`` as on a device.

Building one takes a minute or two (debootstrap downloads ~60 MB of packages from Debian's
mirror), so two things are cached under ``$EMBER_TEST_CACHE`` (default
``~/.cache/ember-tests``): debootstrap's own tarball of the packages (``--make-tarball``) and
the finished root as a tar archive; a test extracts that archive in a couple of seconds.

Commands run inside the root through ``unshare --mount`` and ``chroot``: /proc, /sys and /dev
are mounted in a private mount namespace (they disappear with the process), and the network
namespace is the host's, so pip reaches the package index and the agent reaches the test's
mosquitto on loopback. systemd is installed in the root (for ``systemd-analyze verify`` and the
targets the unit refers to) but is not running: the agent is started directly.
"""

from __future__ import annotations

import asyncio
import configparser
import fcntl
import os
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "systemd")
CA_IN_ROOT = "/etc/ember-test-ca.pem"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ember-tests"
    path = Path(os.environ.get("EMBER_TEST_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def debian_mirror() -> str | None:
    """``$EMBER_DEBIAN_MIRROR``, else the Debian mirror this machine's apt uses (deb822 or
    one-line sources), so the root comes from where the host's packages come from."""
    if os.environ.get("EMBER_DEBIAN_MIRROR"):
        return os.environ["EMBER_DEBIAN_MIRROR"]
    files = [*sorted(Path("/etc/apt/sources.list.d").glob("*")), Path("/etc/apt/sources.list")]
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] not in (["URIs:"], ["deb"]) or "security" in line:
                continue
            uris = [w for w in words[1:] if "://" in w]
            if uris:
                return uris[0]
    return None


def unavailable() -> str | None:
    """Why a Debian root cannot be made here, or None."""
    if os.geteuid() != 0:
        return "debootstrap, chroot and mounts need root"
    if debian_mirror() is None:
        return "no Debian mirror in /etc/apt/sources* (set EMBER_DEBIAN_MIRROR)"
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} is not installed (Debian: apt-get install debootstrap util-linux)"
    return None


def base_archive() -> Path:
    """The cached archive of a finished Debian root, built (under a lock) when missing."""
    cache = cache_dir()
    key = f"debian-{SUITE}-{'-'.join(PACKAGES)}"
    archive = cache / f"{key}.root.tar"
    with (cache / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if archive.exists():
            return archive
        debs = cache / f"{key}.debs.tgz"
        common = ["--variant=minbase", f"--include={','.join(PACKAGES)}"]
        mirror = debian_mirror() or ""
        if not debs.exists():
            work = cache / f"{key}.download"
            shutil.rmtree(work, ignore_errors=True)
            _run(["debootstrap", *common, f"--make-tarball={debs}.tmp", SUITE, str(work), mirror])
            Path(f"{debs}.tmp").replace(debs)
        root = cache / f"{key}.build"
        shutil.rmtree(root, ignore_errors=True)
        _run(["debootstrap", *common, f"--unpack-tarball={debs}", SUITE, str(root), mirror])
        _run(["tar", "-C", str(root), "-cf", f"{archive}.tmp", "."])
        Path(f"{archive}.tmp").replace(archive)
        shutil.rmtree(root, ignore_errors=True)
        return archive


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr}")


def host_pip_ca() -> Path | None:
    """The CA bundle this machine's pip trusts (``$PIP_CERT`` or ``cert`` in /etc/pip.conf):
    the root must trust the same one to reach the same index."""
    named = os.environ.get("PIP_CERT")
    if not named and Path("/etc/pip.conf").exists():
        parser = configparser.ConfigParser()
        parser.read("/etc/pip.conf")
        named = parser.get("global", "cert", fallback=None)
    return Path(named) if named and Path(named).is_file() else None


def pip_environment() -> dict[str, str]:
    """The pip settings of this machine that mean the same inside the root."""
    env = {"PIP_DEFAULT_TIMEOUT": os.environ.get("PIP_DEFAULT_TIMEOUT", "180")}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        value = os.environ.get(name, "")
        if value and not value.startswith("file:"):  # a local path is not in the root
            env[name] = value
    return env


class DebianRoot:
    """A Debian root in ``path``, extracted from the cached archive, with a shared pip cache."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        with tarfile.open(base_archive()) as archive:
            archive.extractall(path, filter="fully_trusted")  # our own archive, with devices
        shutil.copy("/etc/resolv.conf", path / "etc" / "resolv.conf")
        self.env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        self.env.update(HOME="/root", LANG="C.UTF-8")
        self.env.update(pip_environment())
        ca = host_pip_ca()
        if ca is not None:
            shutil.copy(ca, path / CA_IN_ROOT.lstrip("/"))
            self.env["PIP_CERT"] = CA_IN_ROOT
        self.pip_cache = cache_dir() / "pip"
        self.pip_cache.mkdir(exist_ok=True)
        (path / "root" / ".cache" / "pip").mkdir(parents=True, exist_ok=True)

    def file(self, inside: str) -> Path:
        return self.path / inside.lstrip("/")

    def command(self, *argv: str, env: Mapping[str, str] | None = None) -> list[str]:
        """``argv`` run inside the root: one process (each step ``exec``s the next), so a signal
        sent to it reaches the command itself."""
        root = shlex.quote(str(self.path))
        mounts = " && ".join(
            [
                f"mount -t proc proc {root}/proc",
                f"mount -t sysfs sysfs {root}/sys",
                f"mount --rbind /dev {root}/dev",
                f"mount --bind {shlex.quote(str(self.pip_cache))} {root}/root/.cache/pip",
            ]
        )
        variables = [f"{k}={v}" for k, v in {**self.env, **(env or {})}.items()]
        inner = shlex.join(["chroot", str(self.path), "/usr/bin/env", "-i", *variables, *argv])
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"{mounts} && exec {inner}",
        ]

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    async def arun(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """:meth:`run` off the event loop (the test's MQTT clients keep running)."""
        return await asyncio.to_thread(self.run, *argv, timeout=timeout)

    async def start(self, *argv: str, output: IO[bytes]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.command(*argv), stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output
        )

"""What this device can do: hardware, board, accelerators and ML runtimes.

Everything here reads files under ``/proc``, ``/sys``, ``/etc`` and ``/dev`` and is blocking;
the daemon calls it off the event loop. The ML runtimes (onnxruntime, torch) are *not*
imported into the agent: importing them costs 30-300 MB of resident memory for as long as the
process lives. Instead :func:`probe_runtimes` runs a short-lived ``python -c`` child with a
timeout and caches its answer in the state directory, keyed by the installed package versions
(read from package metadata without importing anything), so the probe runs once per upgrade.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from agent import __version__

PROBE_TIMEOUT = 60.0
_PROBE = r"""
import json, sys
out = {}
try:
    import onnxruntime as ort
    out["onnxruntime"] = {"version": ort.__version__,
                          "providers": list(ort.get_available_providers()),
                          "device": ort.get_device()}
except Exception as exc:
    out["onnxruntime"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
if "--torch" in sys.argv:
    try:
        import torch
        info = {"version": torch.__version__, "cuda": bool(torch.cuda.is_available())}
        if info["cuda"]:
            info["cuda_devices"] = [torch.cuda.get_device_name(i)
                                    for i in range(torch.cuda.device_count())]
        mps = getattr(torch.backends, "mps", None)
        info["mps"] = bool(mps is not None and mps.is_available())
        out["torch"] = info
    except Exception as exc:
        out["torch"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
print(json.dumps(out))
"""


def _read(path: str, limit: int = 65536) -> str | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode(errors="replace")
    except OSError:
        return None


def package_version(name: str) -> str | None:
    """The installed version of a distribution, from its metadata (nothing is imported)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- hardware ------------------------------------------------------------------------------------


def os_release() -> dict[str, str]:
    """``/etc/os-release`` as a mapping (freedesktop.org os-release(5))."""
    text = _read("/etc/os-release") or _read("/usr/lib/os-release") or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip().strip('"')
    return out


def cpu_model() -> str:
    """The CPU's marketing name, or what the kernel knows of it on ARM boards."""
    text = _read("/proc/cpuinfo", 1 << 20) or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "cpu model", "hardware", "processor"):
        value = fields.get(key, "")
        if value and not value.isdigit():
            return value
    implementer, part = fields.get("cpu implementer"), fields.get("cpu part")
    if implementer and part:
        return (
            f"{_ARM_PARTS.get((implementer, part), 'ARM')} (implementer {implementer}, part {part})"
        )
    return platform.processor() or platform.machine()


_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x4e", "0x004"): "NVIDIA Carmel",
}


def board() -> dict[str, Any] | None:
    """Single-board computer identity: device-tree model (Raspberry Pi, Jetson) and, on a
    Jetson, the L4T release from ``/etc/nv_tegra_release``; ``None`` on a plain PC."""
    out: dict[str, Any] = {}
    model = _read("/proc/device-tree/model") or _read("/sys/firmware/devicetree/base/model")
    if model:
        out["model"] = model.strip("\x00").strip()
    else:
        vendor = _read("/sys/class/dmi/id/sys_vendor")
        product = _read("/sys/class/dmi/id/product_name")
        if product and product.strip():
            out["model"] = " ".join(p.strip() for p in (vendor, product) if p and p.strip())
    if "Raspberry Pi" in out.get("model", ""):
        out["family"] = "raspberry_pi"
        revision = next(
            (
                line.split(":", 1)[1].strip()
                for line in (_read("/proc/cpuinfo", 1 << 20) or "").splitlines()
                if line.lower().startswith("revision")
            ),
            None,
        )
        if revision:
            out["revision"] = revision
    tegra = _read("/etc/nv_tegra_release")
    if tegra:
        out["family"] = "jetson"
        out["l4t"] = _l4t_release(tegra)
    return out or None


def _l4t_release(text: str) -> str:
    """``# R35 (release), REVISION: 4.1, GCID: ...`` → ``35.4.1``."""
    first = text.splitlines()[0] if text else ""
    major = first.split("(")[0].replace("#", "").strip().lstrip("R")
    revision = ""
    for part in first.split(","):
        if "REVISION" in part:
            revision = part.split(":", 1)[1].strip()
    return f"{major}.{revision}" if major and revision else first.strip()


def accelerators() -> list[dict[str, Any]]:
    """Device nodes of accelerators this process could use: NVIDIA GPUs (desktop and Jetson),
    DRM render nodes, the Raspberry Pi VideoCore, Coral Edge TPU and Hailo NPUs."""
    found: list[dict[str, Any]] = []
    names = {}
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        for line in (_read(info) or "").splitlines():
            if line.startswith("Model:"):
                names[Path(info).parent.name] = line.split(":", 1)[1].strip()
    for node in sorted(glob.glob("/dev/nvidia[0-9]*")):
        entry: dict[str, Any] = {"kind": "nvidia_gpu", "device": node}
        if names:
            entry["name"] = sorted(names.values())[min(len(names) - 1, _index(node))]
        found.append(entry)
    if os.path.exists("/dev/nvhost-ctrl-gpu") or os.path.exists("/dev/nvgpu/igpu0"):
        found.append({"kind": "nvidia_tegra_gpu", "device": "/dev/nvhost-ctrl-gpu"})
    for node in sorted(glob.glob("/dev/dri/renderD*")):
        found.append({"kind": "drm_render", "device": node, "driver": _drm_driver(node)})
    for node, kind in (("/dev/vchiq", "videocore"), ("/dev/apex_0", "edgetpu")):
        if os.path.exists(node):
            found.append({"kind": kind, "device": node})
    for node in sorted(glob.glob("/dev/hailo[0-9]*")):
        found.append({"kind": "hailo", "device": node})
    return found


def _index(node: str) -> int:
    digits = "".join(c for c in node if c.isdigit())
    return int(digits) if digits else 0


def _drm_driver(node: str) -> str | None:
    link = f"/sys/class/drm/{os.path.basename(node)}/device/driver"
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(link))
    return None


def hardware(state_dir: Path) -> dict[str, Any]:
    """The slowly changing facts for the ``info`` document (blocking)."""
    release = os_release()
    disk: dict[str, Any] = {"path": str(state_dir)}
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(state_dir)
        disk.update(total=usage.total, free=usage.free)
    freq = None
    with contextlib.suppress(Exception):
        current = psutil.cpu_freq()
        freq = round(current.max or current.current) if current else None
    return {
        "hostname": socket.gethostname(),
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "distro": release.get("PRETTY_NAME", ""),
            "libc": "-".join(platform.libc_ver()).strip("-"),
        },
        "arch": platform.machine(),
        "python": platform.python_version(),
        "cpu": {
            "model": cpu_model(),
            "cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
            "threads": psutil.cpu_count() or 1,
            "max_mhz": freq,
        },
        "memory": {"total": psutil.virtual_memory().total},
        "disk": disk,
        "board": board(),
        "accelerators": accelerators(),
    }


# -- ML runtimes, probed in a child process ------------------------------------------------------


def runtime_versions() -> dict[str, str | None]:
    """Installed versions of the runtimes (the cache key of :func:`probe_runtimes`)."""
    return {
        "onnxruntime": package_version("onnxruntime")
        or package_version("onnxruntime-gpu")
        or package_version("onnxruntime-openvino"),
        "torch": package_version("torch"),
    }


def probe_command(versions: dict[str, str | None]) -> list[str]:
    command = [sys.executable, "-c", _PROBE]
    if versions.get("torch"):
        command.append("--torch")
    return command


def parse_probe(
    versions: dict[str, str | None], stdout: str | None, error: str | None
) -> dict[str, Any]:
    """The runtimes section of ``info`` from the probe's output (or its failure)."""
    out: dict[str, Any] = {"onnxruntime": None, "torch": None}
    if stdout:
        with contextlib.suppress(ValueError):
            parsed = json.loads(stdout.strip().splitlines()[-1])
            if isinstance(parsed, dict):
                out.update(parsed)
    for name, version in versions.items():
        if version is None:
            out[name] = None
        elif out.get(name) is None:
            out[name] = {"version": version, "error": error or "probe gave no answer"}
    return out


def cached_probe(cache_file: Path, versions: dict[str, str | None]) -> dict[str, Any] | None:
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(cached, dict) and cached.get("key") == _probe_key(versions):
        runtimes = cached.get("runtimes")
        return runtimes if isinstance(runtimes, dict) else None
    return None


def known_runtimes(
    cache_file: Path | None, versions: dict[str, str | None]
) -> dict[str, Any] | None:
    """The runtimes section without running the probe: the cached one for these ``versions``,
    or both ``None`` when neither runtime is installed; ``None`` when the probe must run."""
    if cache_file is not None:
        cached = cached_probe(cache_file, versions)
        if cached is not None:
            return cached
    if not any(versions.values()):
        return {"onnxruntime": None, "torch": None}
    return None


def exit_error(returncode: int | None, stderr: str) -> str | None:
    """The error of a probe that exited with ``returncode`` (``None`` for 0): the code and the
    end of its stderr."""
    if returncode == 0:
        return None
    return f"probe exited with {returncode}: {stderr.strip()[-200:]}"


def store_probe(
    cache_file: Path, versions: dict[str, str | None], runtimes: dict[str, Any]
) -> None:
    with contextlib.suppress(OSError):
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": _probe_key(versions), "runtimes": runtimes}))
        os.replace(tmp, cache_file)


def _probe_key(versions: dict[str, str | None]) -> dict[str, Any]:
    return {**versions, "python": sys.executable, "agent": __version__}


def probe_runtimes(cache_file: Path | None, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """onnxruntime (version, execution providers) and torch (version, CUDA), from the cache or
    a child process. Blocking; the daemon uses :func:`probe_runtimes_async` instead."""
    versions = runtime_versions()
    known = known_runtimes(cache_file, versions)
    if known is not None:
        return known
    error = None
    stdout = None
    try:
        done = subprocess.run(
            probe_command(versions), capture_output=True, text=True, timeout=timeout, check=False
        )
        stdout = done.stdout
        error = exit_error(done.returncode, done.stderr)
    except subprocess.TimeoutExpired:
        error = f"probe timed out after {timeout:g} s"
    except OSError as exc:
        error = f"probe could not start: {exc}"
    runtimes = parse_probe(versions, stdout, error)
    if cache_file is not None and error is None:
        store_probe(cache_file, versions, runtimes)
    return runtimes


async def probe_runtimes_async(
    cache_file: Path | None, timeout: float = PROBE_TIMEOUT
) -> dict[str, Any]:
    """:func:`probe_runtimes` without blocking the event loop: the child is awaited with
    asyncio, the cache is read and written in a worker thread."""
    import asyncio

    from agent.process import communicate

    versions = runtime_versions()
    known = await asyncio.to_thread(known_runtimes, cache_file, versions)
    if known is not None:
        return known
    error = None
    stdout = None
    try:
        code, out, err = await communicate(probe_command(versions), None, timeout)
    except TimeoutError:
        error = f"probe timed out after {timeout:g} s"
    except OSError as exc:
        error = f"probe could not start: {exc}"
    else:
        stdout = out.decode(errors="replace")
        error = exit_error(code, err.decode(errors="replace"))
    runtimes = parse_probe(versions, stdout, error)
    if cache_file is not None and error is None:
        await asyncio.to_thread(store_probe, cache_file, versions, runtimes)
    return runtimes

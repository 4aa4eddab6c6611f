"""Hardware and runtime probes, on this machine for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent import capabilities
from agent.capabilities import _l4t_release


def test_hardware_of_this_machine(tmp_path: Path) -> None:
    facts = capabilities.hardware(tmp_path)
    assert facts["arch"]
    assert facts["os"]["system"] == "Linux"
    assert facts["cpu"]["threads"] >= facts["cpu"]["cores"] >= 1
    assert facts["cpu"]["model"]
    assert facts["memory"]["total"] > 0
    assert facts["disk"]["total"] > 0
    assert isinstance(facts["accelerators"], list)
    json.dumps(facts)  # all of it is JSON


def test_jetson_release_line() -> None:
    line = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64"
    assert _l4t_release(line) == "35.4.1"


def test_runtimes_are_probed_in_a_child_and_cached(tmp_path: Path) -> None:
    cache = tmp_path / "runtimes.json"
    runtimes = capabilities.probe_runtimes(cache)
    ort = runtimes["onnxruntime"]
    assert ort["version"] == capabilities.package_version("onnxruntime")
    assert "CPUExecutionProvider" in ort["providers"]
    if capabilities.package_version("torch"):
        assert runtimes["torch"]["version"].startswith(capabilities.package_version("torch") or "")
        assert runtimes["torch"]["cuda"] in (True, False)
    # The second call reads the cache: prove it by planting a marker there.
    stored = json.loads(cache.read_text())
    stored["runtimes"]["marker"] = True
    cache.write_text(json.dumps(stored))
    assert capabilities.probe_runtimes(cache)["marker"] is True


async def test_the_async_probe_times_out_cleanly_and_caches_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "runtimes.json"
    runtimes = await capabilities.probe_runtimes_async(cache, timeout=0.001)
    assert "timed out" in runtimes["onnxruntime"]["error"]
    assert not cache.exists()


def test_a_failed_probe_keeps_the_versions() -> None:
    versions = {"onnxruntime": "1.2.3", "torch": None}
    out = capabilities.parse_probe(versions, None, "probe exited with 1: ImportError")
    assert out == {
        "onnxruntime": {"version": "1.2.3", "error": "probe exited with 1: ImportError"},
        "torch": None,
    }


def test_the_daemon_does_not_import_heavy_runtimes() -> None:
    """onnxruntime and torch cost the agent 30-300 MB for as long as it runs; cryptography is
    only needed once a bundle arrives."""
    code = (
        "import sys, agent.cli, agent.daemon, agent.runtime; "
        "print(sorted(m for m in ('onnxruntime', 'torch', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

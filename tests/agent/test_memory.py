"""glibc's allocator thresholds for model-sized buffers: set, bounded, and what they are for
(a buffer of an update's size reuses mapped pages instead of page-faulting afresh)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agent.memory import TRIM_BOUNDS, trim_threshold, tune_allocator

MiB = 1024 * 1024


def test_the_trim_threshold_is_an_eighth_of_memory_within_bounds() -> None:
    assert trim_threshold(1024 * MiB) == 128 * MiB  # a 1 GB Raspberry Pi
    assert trim_threshold(128 * MiB) == TRIM_BOUNDS[0]
    assert trim_threshold(64 * 1024 * MiB) == TRIM_BOUNDS[1]


def test_tuning_takes_on_glibc() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    assert tune_allocator() is True


FAULTS = textwrap.dedent(
    """
    import resource, sys
    from agent.memory import tune_allocator
    if sys.argv[1] == "tuned":
        tune_allocator()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for burst in range(50):
        held = [bytearray(4_000_000) for _ in range(8)]  # eight 1M-parameter updates at once
        del held
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])  # after any log line


def test_update_sized_buffers_stop_page_faulting() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    # Untuned, glibc gives the 32 MB back after every burst and faults it in again (1,000
    # faults per buffer); tuned, only the first burst faults.
    assert faults("default") > 100_000
    assert faults("tuned") < 20_000

"""Where a process spends its CPU while a benchmark measures it: py-spy, when installed.

``pip install py-spy`` into the environment that runs the benchmarks and the parts that
support it sample the process under test during their window (``py-spy record --pid``, raw
stacks, every thread, non-blocking) and file each sample under the first Ember or library
layer found from the innermost frame outwards. Without py-spy they measure without a profile.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

LAYERS = (
    ("reassembly (chunk check, copy)", ("agent/protocol/chunking.py",)),
    (
        "decode and validation",
        ("agent/protocol/codec.py", "agent/protocol/messages.py", "agent/protocol/msgpack_view"),
    ),
    ("checkpoint (encode, write, fsync)", ("agent/durable.py", "Checkpoints", "encode_tensors")),
    (
        "aggregation math",
        ("agent/learning/fedbuff.py", "agent/learning/aggregation.py", "agent/learning/stal"),
    ),
    ("MQTT client (paho, aiomqtt)", ("paho/", "aiomqtt/")),
    ("Ember transport", ("agent/transport.py",)),
    ("asyncio and threads", ("asyncio/", "concurrent/futures", "threading.py", "selectors.py")),
)


IDLE = (
    "select (selectors.py",
    "_worker (concurrent/futures/thread.py:81)",
    "_do_waitpid (asyncio/unix_events.py",
    "Condition.wait (threading.py",
)
"""Leaf frames of a thread waiting (for I/O, work, a child): py-spy does not always see them as
idle, and they are no CPU spent."""


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profile:
    """``async with Profile(seconds) as p:`` samples this process; ``p.shares`` afterwards
    (empty when py-spy is missing or ``enabled`` is false)."""

    def __init__(self, seconds: float, pid: int | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.seconds = max(1, round(seconds))
        self.pid = pid or os.getpid()
        self.shares: dict[str, float] = {}
        self.samples = 0
        self._process: asyncio.subprocess.Process | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="ember-profile-")
        self._out = Path(self._dir.name) / "stacks.txt"

    async def __aenter__(self) -> Profile:
        tool = py_spy() if self.enabled else None
        if tool is not None:
            self._process = await asyncio.create_subprocess_exec(
                tool,
                "record",
                "--pid",
                str(self.pid),
                "--duration",
                str(self.seconds),
                "--rate",
                "50",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(self._out),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), self.seconds + 30)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()
            if self._out.exists():
                self._fold(self._out.read_text())
        self._dir.cleanup()

    def _fold(self, text: str) -> None:
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            stack, _, number = line.rpartition(" ")
            if not number.isdigit():
                continue
            frames = stack.split(";")
            if any(idle in frames[-1] for idle in IDLE):
                continue
            counts[layer_of(frames)] += int(number)
        self.samples = sum(counts.values())
        if self.samples:
            self.shares = {k: round(v / self.samples, 3) for k, v in counts.most_common()}


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in LAYERS:
            if any(needle in frame for needle in needles):
                return name
    return "other"

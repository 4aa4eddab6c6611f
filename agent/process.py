"""Child ``ember-agent run`` processes: starting one the way the coordinator and the demo do,
and stopping a child process (SIGTERM, a grace period, then SIGKILL).

Here rather than in :mod:`coordinator` because agent-side code and tests use it too, and
``agent`` never imports ``coordinator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["reap", "spawn_agent", "stop_process", "terminate"]


async def spawn_agent(
    config: Path,
    output: IO[bytes],
    *,
    also: Sequence[Path] = (),
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], Any] | None = None,
) -> asyncio.subprocess.Process:
    """Start ``python -m agent.cli --log-format json run --config <config>`` with no stdin and
    stdout and stderr both going to ``output``; ``also`` hosts more agents in the same process
    (``--also``)."""
    extra = [arg for path in also for arg in ("--also", str(path))]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "--log-format",
        "json",
        "run",
        "--config",
        str(config),
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        env=env,
        preexec_fn=preexec_fn,
    )


def terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM ``process`` if it is still running."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()


async def reap(process: asyncio.subprocess.Process, timeout: float) -> int:
    """Wait up to ``timeout`` seconds for ``process`` to exit, then SIGKILL it; its exit code."""
    try:
        return await asyncio.wait_for(process.wait(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


async def stop_process(process: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``timeout`` seconds."""
    terminate(process)
    return await reap(process, timeout)

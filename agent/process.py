"""Child processes: starting ``ember-agent run`` the way the coordinator and the demo do,
running a short-lived helper to its end (:func:`communicate`), and stopping a child process
(SIGTERM, a grace period, then SIGKILL).

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

__all__ = ["communicate", "reap", "spawn_agent", "stop_process", "terminate"]


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


async def communicate(
    args: Sequence[str], stdin: bytes | None, timeout: float
) -> tuple[int, bytes, bytes]:
    """Run ``args`` with ``stdin`` as its input (none if ``None``) to its end: its exit code,
    standard output and standard error. After ``timeout`` seconds it is killed and
    :class:`TimeoutError` raised; :class:`OSError` if it cannot start."""
    child = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        child.kill()
        await child.wait()
        raise TimeoutError(f"{args[0]} ran for more than {timeout:g} s") from None
    assert child.returncode is not None  # communicate() waited for it
    return child.returncode, out, err


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

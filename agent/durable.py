"""Files that are either whole or absent after a crash or a power cut: write to a temporary
name, fsync, rename over the target, fsync the directory (POSIX makes a rename durable only
once its directory is synced; the pattern SQLite's and ext4's own journals rely on).

One place for the aggregator's checkpoints and the trainers' update spool, both of which are
read back after a crash and must never be torn.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_directory", "write_durably"]


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``; on return both the content and the name are on disk."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

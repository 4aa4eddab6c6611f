"""The agent's outgoing spool: messages kept on disk until their receiver acknowledges them.

A trainer's update must survive a broker restart, a network partition and a crash of the agent
itself (DESIGN.md, "State and reliability"). The transport already waits for the broker's
PUBACK of every chunk (MQTT QoS 1), but a PUBACK only says the broker took the message: a broker
restarted without persistence, or a receiver that was away with a clean session, loses it
after that. So the sender keeps each message here until the *receiver* acknowledges it end to
end (the aggregator's ``UpdateAck``) and sends it again after a reconnect or a restart; the
receiver drops repeats by message id.

One file per message, named ``<sequence>-<id>.msgpack``: a msgpack map (never pickle) with the
topic, the payload and when it was spooled, written durably (:mod:`agent.durable`), so an
entry is either whole or absent after a crash. Bounded by a count and a byte total: a full
spool refuses new entries with :class:`SpoolFull` and the caller waits. An unreadable file is
moved aside with the reason logged, never a crash.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import structlog

from agent.durable import fsync_directory, write_durably

log = structlog.get_logger("ember.spool")

SPOOL_VERSION = 1
SUFFIX = ".msgpack"
_NAME = re.compile(r"^(\d{12})-([A-Za-z0-9_-]{1,128})\.msgpack$")


class SpoolFull(RuntimeError):
    """The spool holds its maximum number of entries or bytes: wait for acknowledgements."""


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled message: its id (the message's own id), topic and payload."""

    sequence: int
    id: str
    topic: str
    payload: bytes
    created: float

    @property
    def size(self) -> int:
        return len(self.payload)


class Spool:
    """A bounded, crash-safe queue of outgoing messages in one directory, oldest first.

    Safe to share between the event loop (which reads it) and a worker thread (which writes and
    fsyncs through ``ctx.run_cpu``): the in-memory index is guarded by a lock.
    """

    def __init__(self, directory: Path, *, max_entries: int = 32, max_bytes: int = 256 << 20):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"spool bounds must be ≥ 1, got {max_entries} entries/{max_bytes} B")
        self.directory = directory
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: dict[str, SpoolEntry] = {}
        self._next = 1
        self._loaded = False
        self._lock = threading.Lock()

    # -- reading what a previous run left --------------------------------------------------------
    def load(self) -> list[SpoolEntry]:
        """Read the directory (once): the entries a previous run left, oldest first."""
        if not self._loaded:
            self.directory.mkdir(parents=True, exist_ok=True)
            found = [self._read(path) for path in sorted(self.directory.glob(f"*{SUFFIX}"))]
            for stale in self.directory.glob("*.tmp"):  # a write the crash interrupted
                stale.unlink(missing_ok=True)
            with self._lock:
                for entry in found:
                    if entry is not None:
                        self._entries[entry.id] = entry
                        self._next = max(self._next, entry.sequence + 1)
                self._loaded = True
            if self._entries:
                log.info("spool_loaded", directory=str(self.directory), entries=len(self._entries))
        return self.entries()

    def _read(self, path: Path) -> SpoolEntry | None:
        match = _NAME.match(path.name)
        reason = "" if match else "file name is not <sequence>-<id>.msgpack"
        document: Any = None
        if match:
            try:
                document = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=True)
            except (ValueError, msgpack.UnpackException, OSError) as exc:
                reason = f"not msgpack: {exc}"
        if not reason:
            reason = _problem(document, match.group(2) if match else "")
        if reason:
            aside = path.with_suffix(".bad")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log.warning(
                "spool_entry_unreadable", path=str(path), moved_to=aside.name, reason=reason
            )
            return None
        assert match is not None
        return SpoolEntry(
            sequence=int(match.group(1)),
            id=document["id"],
            topic=document["topic"],
            payload=bytes(document["payload"]),
            created=float(document["created"]),
        )

    # -- the queue -------------------------------------------------------------------------------
    def entries(self) -> list[SpoolEntry]:
        """Every entry, oldest first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.sequence)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    @property
    def size(self) -> int:
        """Payload bytes held."""
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def has_room(self, size: int = 0) -> bool:
        """Whether an entry of ``size`` payload bytes fits (an empty spool takes any one)."""
        with self._lock:
            count, total = len(self._entries), sum(e.size for e in self._entries.values())
        return count == 0 or (count < self.max_entries and total + size <= self.max_bytes)

    def put(self, entry_id: str, topic: str, payload: bytes) -> SpoolEntry:
        """Write one message durably (fsynced before this returns); :class:`SpoolFull` if it
        does not fit. ``entry_id`` is the message's own id, so a receiver can drop repeats."""
        self.load()
        if not _NAME.match(f"{0:012d}-{entry_id}{SUFFIX}"):
            raise ValueError(f"spool entry id {entry_id[:60]!r} is not a safe file name")
        with self._lock:
            if entry_id in self._entries:
                return self._entries[entry_id]
        if not self.has_room(len(payload)):
            raise SpoolFull(
                f"spool {self.directory} holds {len(self)} entries / {self.size} bytes "
                f"(bounds {self.max_entries} / {self.max_bytes})"
            )
        with self._lock:
            entry = SpoolEntry(self._next, entry_id, topic, bytes(payload), time.time())
            self._next += 1
        document = {
            "v": SPOOL_VERSION,
            "id": entry.id,
            "topic": entry.topic,
            "payload": entry.payload,
            "created": entry.created,
        }
        write_durably(self._path(entry), msgpack.packb(document, use_bin_type=True))
        with self._lock:
            self._entries[entry.id] = entry
        return entry

    def remove(self, entry_id: str) -> bool:
        """Forget an acknowledged entry; ``False`` if it was not there."""
        with self._lock:
            entry = self._entries.pop(entry_id, None)
        if entry is None:
            return False
        self._path(entry).unlink(missing_ok=True)
        fsync_directory(self.directory)
        return True

    def _path(self, entry: SpoolEntry) -> Path:
        return self.directory / f"{entry.sequence:012d}-{entry.id}{SUFFIX}"


def _problem(document: Any, name_id: str) -> str:
    if not isinstance(document, dict):
        return f"expected a map, got {type(document).__name__}"
    if document.get("v") != SPOOL_VERSION:
        return f"unknown spool format version {document.get('v')!r}"
    kinds: dict[str, tuple[type, ...]] = {
        "id": (str,),
        "topic": (str,),
        "payload": (bytes,),
        "created": (int, float),
    }
    for key, kind in kinds.items():
        if not isinstance(document.get(key), kind):
            return f"field {key!r} is missing or not {' or '.join(k.__name__ for k in kind)}"
    if document["id"] != name_id:
        return f"id {document['id'][:60]!r} does not match the file name"
    return ""

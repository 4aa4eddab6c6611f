"""The aggregator's checkpoints: what it has accepted, on disk before any receipt names it.

A checkpoint has three parts. The model part (:data:`MODEL_STATE`: the weights and the
server optimizer's state) changes only when the aggregator makes or follows a version, so it is
written once per such cut, in its own file named by the version and the cut's generation
(``v<version>-g<generation>.model.tensors``, written durably: temporary name, fsync, rename,
directory fsync). The version alone does not name a model: a middle aggregator makes its own
v + 1 from a batch it sends upstream, then follows the global v + 1, whose weights differ.
The ids of the updates applied before the aggregator's last cut (:data:`OLDER_IDS`, 3.3 MB at
the 100,000 it remembers) change at the same points: they are written once per cut, durably,
in a file named by its generation (``ids-g<generation>.tensors``). So a file a slot names
never changes under it. The newest few of both are kept. The rest (FedBuff's buffer or the
open FedAvg round, the counters, the ids applied since the cut) and a small JSON of metadata
change with every accepted update and are written on every group commit, so they go into one
of two slot files overwritten in place, in turn, with one ``pwritev`` and one ``fdatasync``.

A slot is whole or it is not believed: its header carries a sequence number, the lengths of
its two parts and a CRC-32 over all of it, and a write that a crash or a power cut tore fails
the check. The newer slot that passes wins; the other still holds the commit before it, so
the last acknowledged state survives a write torn at any byte (the double buffer of
LMDB's meta pages and of SQLite's rollback journal header, with a checksum in the place of
their ordering). Against writing a new file per commit, with a rename and two directory syncs
for it and its pointer, a 4 MB commit costs 1.2 ms instead of 6 ms of wall time and a seventh
of the CPU here (bench/aggregate: every receipt waits for it).

A save is two steps, :meth:`Checkpoints.write` and :meth:`Checkpoints.sync`: the slot can be
written from views of the live state (the kernel copies them into the page cache, so the state
may change as soon as ``write`` returns), and the ``fdatasync`` waits without holding the state
still. The aggregator does so between cuts: no copy of the buffer per commit (44 MB for an
11 M-parameter model); its serve loop waits while the slot goes into the page cache, where it
waited for that copy (14 against 30 ms for 11 M here, 64 against 100 ms for the whole commit).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.durable import fsync_directory, write_durably
from agent.protocol.codec import decode_tensors
from agent.protocol.msgpack_view import Buffer

try:
    # zlib-ng computes the same CRC-32 as zlib (slots written by either read back alike) about
    # ten times faster (carry-less multiply on x86-64, the CRC instructions on ARMv8): a 4 MB
    # slot is checked on every group commit.
    from zlib_ng.zlib_ng import crc32 as crc32
except ImportError:  # no zlib-ng wheel for this platform (32-bit Arm): the standard library's
    from zlib import crc32 as crc32

__all__ = [
    "KEEP_CHECKPOINTS",
    "MODEL_STATE",
    "OLDER_IDS",
    "Checkpoints",
    "WrittenSlot",
    "split_state",
]

KEEP_CHECKPOINTS = 3
"""Model files kept (the newest versions'), and older-ids files (the newest generations')."""

MODEL_STATE = ("weights/", "optimizer/")
"""State keys that change only when a version is made: the model and the server optimizer's
state. A checkpoint writes them once per version, the rest (buffer, counters, applied ids) on
every save."""

OLDER_IDS = "older_ids"
"""The state key of the ids applied before the last cut, written once per cut
(:meth:`~agent.learning.aggregation.BaseAggregator.state_dict`)."""

SLOT_MAGIC = b"EMBCKPT1"
SLOT_HEADER = struct.Struct("<8sQQQI")
"""magic, sequence number, metadata bytes, state bytes, CRC-32 of the header's first four
fields, the metadata and the state, in this order."""
SLOT_NAMES = ("state-a.slot", "state-b.slot")
IOV_MAX = 1024
"""Pieces one ``pwritev`` takes at most (Linux's ``UIO_MAXIOV``)."""
LEGACY_POINTER = "latest.json"
"""The pointer of the layout before slots (a state file per save): read when no slot is
whole, so an aggregator resumes across an upgrade, and removed by the first slot written."""


def split_state(
    state: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``state`` as (the part that changes only between versions, the older ids, the rest)."""
    model = {k: v for k, v in state.items() if k.startswith(MODEL_STATE)}
    older = {k: v for k, v in state.items() if k == OLDER_IDS}
    return model, older, {k: v for k, v in state.items() if k not in model and k not in older}


class Checkpoints:
    """Model versions and the state between them, on disk (tensor codec, never pickle): a
    model file per version, written once, and two slot files for the rest, overwritten in turn
    and checked with a CRC-32 when read (double-buffered commit, as LMDB's meta pages)."""

    def __init__(self, directory: Path, keep: int = KEEP_CHECKPOINTS) -> None:
        self.directory = directory
        self.keep = keep
        self._seq: int | None = None
        """The newest slot's sequence number once known (read by :meth:`load_latest`, or else
        by the first save)."""
        self._next = 0
        """The index of the slot the next save overwrites: never the newest whole one."""
        self._named: dict[int, set[str]] = {}
        """Slot index → the model and older-ids files its checkpoint names (never pruned)."""

    @staticmethod
    def model_name(version: int, generation: int | None = None) -> str:
        """The model file of ``version`` as made or followed at cut ``generation`` (``None``:
        the name before generations, read back still)."""
        if generation is None:
            return f"v{version:08d}.model.tensors"
        return f"v{version:08d}-g{generation:012d}.model.tensors"

    @staticmethod
    def ids_name(generation: int) -> str:
        return f"ids-g{generation:012d}.tensors"

    def save(
        self,
        version: int,
        state: Buffer | list[Buffer],
        meta: Mapping[str, Any],
        model: bytes | None = None,
        **parts: Any,
    ) -> Path:
        """:meth:`write`, then :meth:`sync`: on return the slot is on disk; returns its path."""
        return self.sync(self.write(version, state, meta, model, **parts))

    def write(
        self,
        version: int,
        state: Buffer | list[Buffer],
        meta: Mapping[str, Any],
        model: bytes | None = None,
        *,
        split: bool = False,
        older_ids: bytes | None = None,
        ids_generation: int | None = None,
    ) -> WrittenSlot:
        """Write ``state`` (and ``meta``) for ``version`` into the older slot, up to its
        ``fdatasync`` (:meth:`sync` finishes it; one written slot at a time). ``state`` may be
        the pieces of an encoding, views of live arrays: they are read only here, so the
        arrays may change once this returns. With ``split`` the model part is in the model
        file of this version and cut (``ids_generation``), written durably now from ``model``
        or by an earlier save of the same cut; with ``ids_generation`` the older ids are in
        that generation's file, written now from ``older_ids`` or by an earlier save."""
        self.directory.mkdir(parents=True, exist_ok=True)
        pointer = {**meta, "version": version}
        if split:
            model_path = self.directory / self.model_name(version, ids_generation)
            self._write_part(model_path, model, "a version's model part")
            pointer["model_file"] = model_path.name
        if ids_generation is not None:
            ids_path = self.directory / self.ids_name(ids_generation)
            self._write_part(ids_path, older_ids, "a generation's older ids")
            pointer["ids_file"] = ids_path.name
        seq = self._seq if self._seq is not None else self._newest_slot()[0]
        path = self.directory / SLOT_NAMES[self._next]
        pieces = state if isinstance(state, list) else [state]
        fd, created = self._write_slot(path, seq + 1, json.dumps(pointer).encode(), pieces)
        return WrittenSlot(path, fd, created, seq + 1, self._next, _named_files(pointer))

    @staticmethod
    def abandon(written: WrittenSlot) -> None:
        """Let go of a slot :meth:`write` wrote that will not be synced (its write was
        cancelled): the next write goes over the same slot."""
        os.close(written.fd)

    def sync(self, written: WrittenSlot) -> Path:
        """Put a slot :meth:`write` wrote on disk (``fdatasync``, and the directory's entry if
        the slot file is new); from now on it is the newest. Returns its path."""
        try:
            os.fdatasync(written.fd)
        finally:
            os.close(written.fd)
        if written.created:
            fsync_directory(written.path.parent)
        self._named[written.index] = written.named
        self._seq = written.seq
        self._next = 1 - written.index
        self._prune()
        return written.path

    @staticmethod
    def _write_part(path: Path, data: bytes | None, what: str) -> None:
        """``data`` into ``path`` durably; ``None``: ``path`` must be on disk already."""
        if data is not None:
            write_durably(path, data)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: {what} must be saved first")

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The newest whole checkpoint as (state, metadata), or ``None`` if there is none."""
        seq, meta_bytes, state_bytes = self._newest_slot()
        if not seq:  # no whole slot (sequence numbers start at 1): the layout before slots?
            legacy = self.directory / LEGACY_POINTER
            if not legacy.exists():
                return None
            meta_bytes = legacy.read_bytes()
            state_bytes = (self.directory / json.loads(meta_bytes)["file"]).read_bytes()
        meta = json.loads(meta_bytes)
        state = dict(decode_tensors(state_bytes, require_finite=False))
        for part in ("model_file", "ids_file"):
            if part in meta:
                data = (self.directory / meta[part]).read_bytes()
                state.update(decode_tensors(data, require_finite=False))
        return state, meta

    def _newest_slot(self) -> tuple[int, bytes, bytes]:
        """The newest whole slot's (sequence number, metadata, state), ``(0, b"", b"")`` if
        none is; and from now on the next save goes over the other slot. Read once, by
        :meth:`load_latest` or else by the first :meth:`save`."""
        newest: tuple[int, bytes, bytes] = (0, b"", b"")
        self._next = 0
        self._named = {}
        for index, name in enumerate(SLOT_NAMES):
            slot = _read_slot(self.directory / name)
            if slot is not None:
                self._named[index] = _named_files(json.loads(slot[1]))
            if slot is not None and slot[0] > newest[0]:
                newest, self._next = slot, 1 - index
        self._seq = newest[0]
        return newest

    @staticmethod
    def _write_slot(path: Path, seq: int, meta: bytes, state: list[Buffer]) -> tuple[int, bool]:
        """The slot written (not synced): its open descriptor, and whether the file is new."""
        created = not path.exists()
        state_len = sum(memoryview(piece).nbytes for piece in state)
        header = SLOT_HEADER.pack(SLOT_MAGIC, seq, len(meta), state_len, 0)
        check = crc32(meta, crc32(header[:-4]))
        for piece in state:
            check = crc32(piece, check)
        header = header[:-4] + struct.pack("<I", check)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            _pwrite_all(fd, path, [header, meta, *state])
        except BaseException:
            os.close(fd)
            raise
        return fd, created

    def _prune(self) -> None:
        """Keep the model and older-ids files either slot names, and the newest ``keep`` of
        each kind; drop the layout before slots. (Newest by name alone could drop a file a
        slot names: one a save wrote before a crash tore its slot has a newer name than the
        files the slots name after the restart, until a save writes that name again.)"""
        named = set().union(*self._named.values())
        for pattern in ("v*.model.tensors", "ids-g*.tensors"):
            for old in sorted(self.directory.glob(pattern))[: -self.keep]:
                if old.name not in named:
                    old.unlink(missing_ok=True)
        legacy = self.directory / LEGACY_POINTER
        if legacy.exists():
            legacy.unlink()
            for old in self.directory.glob("v*.tensors"):
                if not old.name.endswith(".model.tensors"):
                    old.unlink(missing_ok=True)


@dataclass(frozen=True)
class WrittenSlot:
    """A slot :meth:`Checkpoints.write` wrote and :meth:`Checkpoints.sync` has yet to sync."""

    path: Path
    fd: int
    created: bool
    seq: int
    index: int
    named: set[str]


def _pwrite_all(fd: int, path: Path, pieces: list[Buffer]) -> None:
    """``pieces`` one after another from the start of ``fd``, in ``pwritev`` calls of at most
    ``IOV_MAX`` pieces (a model of many tensors has more), each going on where the last one
    stopped (Linux writes at most 2 GiB in one call)."""
    views = [view for view in (memoryview(p).cast("B") for p in pieces) if view.nbytes]
    offset = first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + IOV_MAX], offset)
        if written <= 0:
            left = sum(view.nbytes for view in views[first:])
            raise OSError(f"{path}: short write ({left} bytes not written)")
        offset += written
        while written:  # past the pieces written whole, into the one written in part
            if written >= views[first].nbytes:
                written -= views[first].nbytes
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0


def _named_files(pointer: Mapping[str, Any]) -> set[str]:
    """The files a checkpoint's metadata names besides its slot."""
    return {str(pointer[part]) for part in ("model_file", "ids_file") if part in pointer}


def _read_slot(path: Path) -> tuple[int, bytes, bytes] | None:
    """A slot's (sequence number, metadata, state) if it is whole, else ``None``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < SLOT_HEADER.size:
        return None
    magic, seq, meta_len, state_len, check = SLOT_HEADER.unpack_from(data)
    end = SLOT_HEADER.size + meta_len + state_len
    if magic != SLOT_MAGIC or end > len(data):
        return None
    meta = data[SLOT_HEADER.size : SLOT_HEADER.size + meta_len]
    state = data[SLOT_HEADER.size + meta_len : end]
    if crc32(state, crc32(meta, crc32(data[: SLOT_HEADER.size - 4]))) != check:
        return None
    return seq, meta, state

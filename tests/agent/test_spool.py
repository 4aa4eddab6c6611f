"""The outgoing spool: durable across instances (a restarted agent), bounded, and robust to
files it cannot read."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from agent.spool import Spool, SpoolFull


def test_entries_survive_a_new_instance_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.load()
    spool.put("a1", "jobs/j/updates/pi", b"first")
    spool.put("b2", "jobs/j/updates/pi", b"second" * 100)
    spool.put("a1", "jobs/j/updates/pi", b"ignored: same id")
    again = Spool(tmp_path / "spool")
    entries = again.load()
    assert [(e.id, e.payload[:6]) for e in entries] == [("a1", b"first"), ("b2", b"second")]
    assert entries[0].topic == "jobs/j/updates/pi"
    again.remove("a1")
    again.put("c3", "t", b"third")
    assert [e.id for e in Spool(tmp_path / "spool").load()] == ["b2", "c3"]


def test_bounds_refuse_new_entries(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=2, max_bytes=100)
    spool.put("a", "t", b"x" * 60)
    assert not spool.has_room(60)
    with pytest.raises(SpoolFull, match="bounds 2 / 100"):
        spool.put("b", "t", b"x" * 60)
    spool.put("b", "t", b"x" * 10)
    with pytest.raises(SpoolFull):
        spool.put("c", "t", b"")
    assert spool.remove("a")
    assert not spool.remove("a")
    assert spool.has_room(60)
    # An update larger than the byte bound still goes out when it is alone.
    alone = Spool(tmp_path / "alone", max_bytes=10)
    alone.put("big", "t", b"x" * 1000)
    assert len(alone) == 1


def test_unreadable_files_are_moved_aside_not_fatal(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put("good", "t", b"ok")
    (tmp_path / "000000000007-junk.msgpack").write_bytes(b"\xc1not msgpack")
    (tmp_path / "000000000008-mismatch.msgpack").write_bytes(
        msgpack.packb({"v": 1, "id": "other", "topic": "t", "payload": b"", "created": 0.0})
    )
    (tmp_path / "000000000009-pickle.msgpack").write_bytes(
        b"\x80\x04\x95"  # a pickle is just bytes that are not a spool map
    )
    (tmp_path / "000000000010-x.msgpack.tmp").write_bytes(b"torn write")
    entries = Spool(tmp_path).load()
    assert [e.id for e in entries] == ["good"]
    assert sorted(p.name for p in tmp_path.glob("*.bad")) == [
        "000000000007-junk.bad",
        "000000000008-mismatch.bad",
        "000000000009-pickle.bad",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    # New entries are numbered after the entries kept.
    assert Spool(tmp_path).put("next", "t", b"").sequence == 2


def test_ids_must_be_safe_file_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="safe file name"):
        Spool(tmp_path).put("../escape", "t", b"")

"""The SQLite store: WAL, migrations, round trips, and nothing lost when the process is killed."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from coordinator.store import (
    SCHEMA_VERSION,
    AssignmentRecord,
    EnrolmentToken,
    JobRecord,
    Store,
    StoreError,
)


def job(job_id: str = "digits-abc123", **changes: object) -> JobRecord:
    record = JobRecord(
        id=job_id, name="digits", spec={"name": "digits", "stop": {"max_updates": 5}}
    )
    for key, value in changes.items():
        setattr(record, key, value)
    return record


async def test_round_trip_and_reopen(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    try:
        record = job(metrics={"accuracy": 0.5}, artifacts={"eval.onnx": "ab" * 32})
        a = AssignmentRecord(
            job=record.id,
            agent="pi-1",
            role="trainer",
            state="pending",
            dataset="digits",
            samples=300,
        )
        await store.save(
            jobs=[record], assignments=[a], events=[(record.id, "submitted", {"name": "digits"})]
        )
        record.phase = "running"
        a.state = "running"
        await store.save(
            jobs=[record],
            assignments=[a],
            events=[(record.id, "running", {})],
            model_version=(record.id, 3, 30, {"accuracy": 0.7}),
        )
    finally:
        await store.close()
    store = await Store.open(tmp_path)
    try:
        [loaded] = await store.load_jobs()
        assert loaded == record
        [got] = await store.load_assignments(record.id)
        assert got == a
        assert [e.kind for e in await store.events(record.id)] == ["submitted", "running"]
        assert (await store.events(record.id))[0].to_dict()["name"] == "digits"
        [version] = await store.model_versions(record.id)
        assert (version["version"], version["updates_applied"]) == (3, 30)
        assert version["metrics"] == {"accuracy": 0.7}
    finally:
        await store.close()


async def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "assignments", "events", "model_versions", "applied_updates"} <= tables


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="schema version"):
        await Store.open(tmp_path)


async def test_sqlite_runs_on_its_own_thread(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    try:
        with pytest.raises(AssertionError, match=r"store is not open|off the store's thread"):
            _ = store.db  # the event loop's thread may not touch the connection
        seen: list[str] = []
        await store._call(lambda: seen.append(threading.current_thread().name))
        assert seen[0].startswith("ember-store")
    finally:
        await store.close()


async def test_blobs_are_content_addressed(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    try:
        digest = await store.put_blob(b"model bytes")
        assert await store.put_blob(b"model bytes") == digest
        assert await store.get_blob(digest) == b"model bytes"
        store.blob_path(digest).write_bytes(b"tampered")
        with pytest.raises(StoreError, match="corrupt"):
            await store.get_blob(digest)
        with pytest.raises(ValueError, match="SHA-256"):
            store.blob_path("../etc/passwd")
    finally:
        await store.close()


CRASH = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from coordinator.store import AssignmentRecord, JobRecord, Store

    async def main() -> None:
        store = await Store.open(Path(sys.argv[1]))
        for i in range(20):
            record = JobRecord(id=f"job-{i}", name="job", spec={"i": i}, phase="running")
            await store.save(
                jobs=[record],
                assignments=[
                    AssignmentRecord(job=record.id, agent="a", role="trainer", state="running")
                ],
                events=[(record.id, "running", {})],
            )
        print("saved", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: a crash

    asyncio.run(main())
    """
)


async def test_nothing_committed_is_lost_when_killed(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == -9
    assert out.strip().endswith(b"saved")
    assert (tmp_path / "state.db-wal").exists()  # the WAL was never checkpointed
    store = await Store.open(tmp_path)
    try:
        jobs = await store.load_jobs()
        assert [j.id for j in jobs] == [f"job-{i}" for i in range(20)]
        assert all(j.phase == "running" for j in jobs)
        assert len(await store.load_assignments()) == 20
        assert len(await store.events(limit=100)) == 20
    finally:
        await store.close()


async def test_saving_a_job_again_keeps_its_assignments_and_versions(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    try:
        record = job()
        a = AssignmentRecord(job=record.id, agent="a", role="trainer", state="running")
        await store.save(jobs=[record], assignments=[a], model_version=(record.id, 1, 10, {}))
        record.phase = "completed"
        await store.save(jobs=[record])
        assert [x.agent for x in await store.load_assignments(record.id)] == ["a"]
        assert len(await store.model_versions(record.id)) == 1
        assert (await store.load_jobs())[0].phase == "completed"
    finally:
        await store.close()


async def test_a_version_reported_again_keeps_what_was_recorded_of_it(tmp_path: Path) -> None:
    """The aggregator's completed event names its last version with fewer metrics (no
    trainers' loss): the version's record keeps them, and its time."""
    store = await Store.open(tmp_path)
    try:
        record = job()
        first = {"accuracy": 0.94, "loss": 0.25, "train_loss": 0.33}
        await store.save(jobs=[record], model_version=(record.id, 6, 12, first))
        [before] = await store.model_versions(record.id)
        await asyncio.sleep(0.01)
        await store.save(model_version=(record.id, 6, 13, {"accuracy": 0.95}))
        [after] = await store.model_versions(record.id)
        assert after["metrics"] == {"accuracy": 0.95, "loss": 0.25, "train_loss": 0.33}
        assert after["updates_applied"] == 13
        assert after["ts"] == before["ts"]
    finally:
        await store.close()


async def test_a_version_1_database_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    from coordinator.store import MIGRATIONS

    with sqlite3.connect(tmp_path / "state.db") as db:  # what Ember with schema 1 wrote
        db.executescript(MIGRATIONS[0])
        db.execute(
            "INSERT INTO jobs (id, name, spec, phase, submitted_at, updated_at) "
            "VALUES ('old-1', 'old', '{}', 'completed', 1.0, 1.0)"
        )
        db.execute("PRAGMA user_version=1")
    store = await Store.open(tmp_path)
    try:
        [old] = await store.load_jobs()
        assert (old.id, old.phase) == ("old-1", "completed")
        assert await store.job_weights("old-1") is None
        kept = await store.keep_weights("old-1", 4, b"weights v4", final=False)
        assert kept is not None
        assert await store.get_blob(kept.digest) == b"weights v4"
        old.reason = "saved again"
        await store.save(jobs=[old])  # the job upsert leaves the weights alone
        assert await store.job_weights("old-1") == kept
        assert await store.keep_weights("old-1", 3, b"older", final=True) is None
        final = await store.keep_weights("old-1", 4, b"weights v4, final", final=True)
        assert final is not None
        assert not store.blob_path(kept.digest).exists()  # superseded and unused: deleted
        with pytest.raises(LookupError, match="no job"):
            await store.keep_weights("nobody", 1, b"x", final=True)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_an_enrolment_token_is_spent_once_and_never_after_it_expires(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path)
    try:
        await store.add_token(EnrolmentToken("t1", "s" * 32, expires_at=100.0, created_at=0.0))
        await store.add_token(EnrolmentToken("t2", "s" * 32, expires_at=50.0, created_at=0.0))
        assert await store.token("nope") is None
        first, second = await asyncio.gather(
            store.spend_token("t1", "pi-a", 10.0), store.spend_token("t1", "pi-b", 10.0)
        )
        assert sorted([first, second]) == [False, True]
        spent = await store.token("t1")
        assert spent is not None
        assert spent.used_at == 10.0
        assert spent.used_by in ("pi-a", "pi-b")
        assert not await store.spend_token("t2", "pi-c", 50.0)  # expired
    finally:
        await store.close()
    store = await Store.open(tmp_path)  # kept across restarts
    try:
        kept = await store.token("t1")
        assert kept is not None
        assert kept.used_by in ("pi-a", "pi-b")
    finally:
        await store.close()

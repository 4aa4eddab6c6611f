"""The coordinator's durable state: SQLite in WAL mode, plus content-addressed blobs on disk.

Jobs, assignments (which agent runs which role of which job, and how it is doing), an event
log, model versions, the newest weights kept of each job's model and, later, applied update
ids live in one SQLite database
(``state.db``) in write-ahead-log mode with ``synchronous=FULL``: every committed transaction
survives the process being killed at any instant (SQLite's WAL documentation, "Atomic Commit").
The schema carries a version (``PRAGMA user_version``) and is brought up to date by ordered
migrations when the database is opened.

Every SQLite call runs on one dedicated thread, never on the event loop: :class:`Store`'s
methods are coroutines that hand their work to that thread. Blobs (model artifacts, signed
bundles) are files named by their SHA-256 under ``blobs/``, written to a temporary name,
fsynced and renamed, so a blob is either whole or absent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("ember.store")

T = TypeVar("T")

SCHEMA_VERSION = 4

MIGRATIONS: tuple[str, ...] = (
    # 1: jobs, assignments, events, model versions, applied updates.
    """
    CREATE TABLE jobs (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL,
        spec            TEXT NOT NULL,
        phase           TEXT NOT NULL,
        reason          TEXT NOT NULL DEFAULT '',
        model_version   INTEGER NOT NULL DEFAULT 0,
        updates_applied INTEGER NOT NULL DEFAULT 0,
        metrics         TEXT NOT NULL DEFAULT '{}',
        artifacts       TEXT NOT NULL DEFAULT '{}',
        request_id      TEXT UNIQUE,
        submitted_at    REAL NOT NULL,
        started_at      REAL,
        finished_at     REAL,
        updated_at      REAL NOT NULL
    );
    CREATE TABLE assignments (
        job           TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        agent         TEXT NOT NULL,
        role          TEXT NOT NULL,
        state         TEXT NOT NULL,
        reason        TEXT NOT NULL DEFAULT '',
        dataset       TEXT,
        samples       INTEGER,
        bundle        TEXT,
        message_id    TEXT,
        attempts      INTEGER NOT NULL DEFAULT 0,
        dispatched_at REAL,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        PRIMARY KEY (job, agent, role)
    );
    CREATE TABLE events (
        seq   INTEGER PRIMARY KEY AUTOINCREMENT,
        job   TEXT,
        ts    REAL NOT NULL,
        kind  TEXT NOT NULL,
        data  TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_by_job ON events (job, seq);
    CREATE TABLE model_versions (
        job             TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        version         INTEGER NOT NULL,
        updates_applied INTEGER NOT NULL DEFAULT 0,
        metrics         TEXT NOT NULL DEFAULT '{}',
        ts              REAL NOT NULL,
        PRIMARY KEY (job, version)
    );
    CREATE TABLE applied_updates (
        job        TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        update_id  TEXT NOT NULL,
        version    INTEGER NOT NULL,
        ts         REAL NOT NULL,
        PRIMARY KEY (job, update_id)
    );
    """,
    # 2: the newest weights the coordinator keeps of each job's model (a tensor-codec blob),
    # written only by Store.save_weights: the job upsert leaves these columns alone.
    """
    ALTER TABLE jobs ADD COLUMN weights_version INTEGER;
    ALTER TABLE jobs ADD COLUMN weights_digest TEXT;
    ALTER TABLE jobs ADD COLUMN weights_final INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN weights_at REAL;
    """,
    # 3: one-time enrolment tokens (ember agents token / ember-agent enroll).
    """
    CREATE TABLE enrolment_tokens (
        id          TEXT PRIMARY KEY,
        secret      TEXT NOT NULL,
        agent       TEXT,
        aggregator  INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,
        used_at     REAL,
        used_by     TEXT
    );
    """,
    # 4: sharded jobs: which slice of the parameters an aggregator shard owns.
    """
    ALTER TABLE assignments ADD COLUMN shard INTEGER;
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION

TERMINAL_PHASES = frozenset({"completed", "failed", "cancelled"})
PHASES = ("planned", "dispatching", "running", "completed", "failed", "cancelled")


@dataclass(frozen=True)
class EnrolmentToken:
    """A one-time token an agent enrols with (the secret is kept: both sides derive the
    request's HMAC key and the reply's encryption key from it)."""

    id: str
    secret: str
    expires_at: float
    created_at: float
    agent: str | None = None
    """Only this agent id may enrol with it, when set."""
    aggregator: bool = False
    """The enrolled agent's login may host aggregator roles."""
    used_at: float | None = None
    used_by: str | None = None


def _token_from_row(row: sqlite3.Row) -> EnrolmentToken:
    return EnrolmentToken(
        id=row["id"],
        secret=row["secret"],
        expires_at=float(row["expires_at"]),
        created_at=float(row["created_at"]),
        agent=row["agent"],
        aggregator=bool(row["aggregator"]),
        used_at=row["used_at"],
        used_by=row["used_by"],
    )


class StoreError(RuntimeError):
    """The state directory cannot be used (newer schema, locked, unreadable)."""


@dataclass
class JobRecord:
    """One job as stored (the service keeps these in memory and writes every change through)."""

    id: str
    name: str
    spec: dict[str, Any]
    phase: str = "planned"
    reason: str = ""
    model_version: int = 0
    updates_applied: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    """Artifact name → SHA-256 of its blob."""
    request_id: str | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


@dataclass
class AssignmentRecord:
    """One role of one job on one agent."""

    job: str
    agent: str
    role: str
    state: str
    reason: str = ""
    dataset: str | None = None
    samples: int | None = None
    bundle: str | None = None
    message_id: str | None = None
    attempts: int = 0
    dispatched_at: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    shard: int | None = None
    """An aggregator shard's slice of the parameters (sharded jobs); ``None`` for other roles."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.job, self.agent, self.role)


_SELECT_JOBS = (
    "SELECT id, name, spec, phase, reason, model_version, updates_applied, metrics, artifacts, "
    "request_id, submitted_at, started_at, finished_at, updated_at FROM jobs"
)
# Upserts, never INSERT OR REPLACE: a replace deletes the row first, and the delete would
# cascade to the job's assignments and model versions.
_UPSERT_JOB = (
    "INSERT INTO jobs (id, name, spec, phase, reason, model_version, updates_applied, "
    "metrics, artifacts, request_id, submitted_at, started_at, finished_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "name = excluded.name, spec = excluded.spec, phase = excluded.phase, "
    "reason = excluded.reason, model_version = excluded.model_version, "
    "updates_applied = excluded.updates_applied, metrics = excluded.metrics, "
    "artifacts = excluded.artifacts, request_id = excluded.request_id, "
    "submitted_at = excluded.submitted_at, started_at = excluded.started_at, "
    "finished_at = excluded.finished_at, updated_at = excluded.updated_at"
)
_SELECT_ASSIGNMENTS = (
    "SELECT job, agent, role, state, reason, dataset, samples, bundle, message_id, attempts, "
    "dispatched_at, created_at, updated_at, shard FROM assignments"
)
_UPSERT_ASSIGNMENT = (
    "INSERT INTO assignments (job, agent, role, state, reason, dataset, samples, "
    "bundle, message_id, attempts, dispatched_at, created_at, updated_at, shard) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (job, agent, role) DO UPDATE SET "
    "state = excluded.state, reason = excluded.reason, dataset = excluded.dataset, "
    "samples = excluded.samples, bundle = excluded.bundle, message_id = excluded.message_id, "
    "attempts = excluded.attempts, dispatched_at = excluded.dispatched_at, "
    "created_at = excluded.created_at, updated_at = excluded.updated_at, shard = excluded.shard"
)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _job_row(job: JobRecord) -> tuple[Any, ...]:
    return (
        job.id,
        job.name,
        _dumps(job.spec),
        job.phase,
        job.reason,
        job.model_version,
        job.updates_applied,
        _dumps(job.metrics),
        _dumps(job.artifacts),
        job.request_id,
        job.submitted_at,
        job.started_at,
        job.finished_at,
        job.updated_at,
    )


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        name=row["name"],
        spec=json.loads(row["spec"]),
        phase=row["phase"],
        reason=row["reason"],
        model_version=row["model_version"],
        updates_applied=row["updates_applied"],
        metrics=json.loads(row["metrics"]),
        artifacts=json.loads(row["artifacts"]),
        request_id=row["request_id"],
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
    )


def _assignment_row(a: AssignmentRecord) -> tuple[Any, ...]:
    return (
        a.job,
        a.agent,
        a.role,
        a.state,
        a.reason,
        a.dataset,
        a.samples,
        a.bundle,
        a.message_id,
        a.attempts,
        a.dispatched_at,
        a.created_at,
        a.updated_at,
        a.shard,
    )


def _assignment_from_row(row: sqlite3.Row) -> AssignmentRecord:
    return AssignmentRecord(**{k: row[k] for k in row.keys()})  # noqa: SIM118 (sqlite3.Row)


@dataclass(frozen=True)
class StoredWeights:
    """The newest model weights kept for a job: a tensor-codec blob and the version it is."""

    job: str
    version: int
    digest: str
    """SHA-256 of the blob (``encode_tensors`` of the model's parameters)."""
    final: bool
    """Whether this is the job's last version (the aggregator's ``final`` model version)."""
    stored_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "digest": self.digest,
            "final": self.final,
            "stored_at": self.stored_at,
        }


@dataclass(frozen=True)
class Event:
    """One entry of the event log."""

    seq: int
    job: str | None
    ts: float
    kind: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "job": self.job, "ts": self.ts, "kind": self.kind, **self.data}


class Store:
    """SQLite (WAL) and blob storage under one state directory; every call off the event loop.

    Open with ``await Store.open(state_dir)``; close with ``await store.close()``.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.db_path = self.state_dir / "state.db"
        self.blob_dir = self.state_dir / "blobs"
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ember-store"
        )
        self._db: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    async def open(cls, state_dir: Path) -> Store:
        store = cls(state_dir)
        try:
            await store._call(store._open)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._close)
        self._executor.shutdown(wait=True)

    # thread plumbing ---------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        assert threading.current_thread() is self._thread, "SQLite used off the store's thread"
        return self._db

    def _open(self) -> None:
        self._thread = threading.current_thread()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(exist_ok=True)
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.db_path}: cannot switch to WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            self._migrate(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"{self.db_path}: {exc}") from None
        except BaseException:
            db.close()
            raise
        self._db = db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.db_path} has schema version {version}; this Ember knows up to "
                f"{SCHEMA_VERSION} (upgrade Ember, or use another --state-dir)"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(MIGRATIONS[target - 1]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={target}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            log.info("store_migrated", path=str(self.db_path), version=target)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # jobs --------------------------------------------------------------------------------------
    async def load_jobs(self) -> list[JobRecord]:
        def run() -> list[JobRecord]:
            rows = self.db.execute(_SELECT_JOBS + " ORDER BY submitted_at, id")
            return [_job_from_row(r) for r in rows]

        return await self._call(run)

    async def load_assignments(self, job: str | None = None) -> list[AssignmentRecord]:
        def run() -> list[AssignmentRecord]:
            order = " ORDER BY job, created_at, agent, role"
            if job is None:
                rows = self.db.execute(_SELECT_ASSIGNMENTS + order)
            else:
                rows = self.db.execute(_SELECT_ASSIGNMENTS + " WHERE job = ?" + order, (job,))
            return [_assignment_from_row(r) for r in rows]

        return await self._call(run)

    async def job_for_request(self, request_id: str) -> str | None:
        def run() -> str | None:
            row = self.db.execute(
                "SELECT id FROM jobs WHERE request_id = ?", (request_id,)
            ).fetchone()
            return None if row is None else str(row["id"])

        return await self._call(run)

    async def save(
        self,
        *,
        jobs: Iterable[JobRecord] = (),
        assignments: Iterable[AssignmentRecord] = (),
        events: Iterable[tuple[str | None, str, Mapping[str, Any]]] = (),
        model_version: tuple[str, int, int, Mapping[str, Any]] | None = None,
    ) -> None:
        """Write jobs and assignments (insert or replace), append events and record a model
        version (merged into its record if it has one), atomically."""
        job_rows = [_job_row(j) for j in jobs]
        assignment_rows = [_assignment_row(a) for a in assignments]
        now = time.time()
        event_rows = [(job, now, kind, _dumps(dict(data))) for job, kind, data in events]

        def run(db: sqlite3.Connection) -> None:
            db.executemany(_UPSERT_JOB, job_rows)
            db.executemany(_UPSERT_ASSIGNMENT, assignment_rows)
            db.executemany(
                "INSERT INTO events (job, ts, kind, data) VALUES (?, ?, ?, ?)", event_rows
            )
            if model_version is not None:
                job, version, updates, metrics = model_version
                # A version reported again (the aggregator's completed event names its last
                # one) adds to what was recorded of it: its metrics and time stay.
                known = db.execute(
                    "SELECT metrics, ts FROM model_versions WHERE job = ? AND version = ?",
                    (job, version),
                ).fetchone()
                merged = {**json.loads(known["metrics"]), **metrics} if known else dict(metrics)
                db.execute(
                    "INSERT OR REPLACE INTO model_versions (job, version, updates_applied, "
                    "metrics, ts) VALUES (?, ?, ?, ?, ?)",
                    (job, version, updates, _dumps(merged), known["ts"] if known else now),
                )

        await self._call(self._tx, run)

    async def events(self, job: str | None = None, *, limit: int = 50) -> list[Event]:
        """The latest ``limit`` events (of one job, or of all), oldest first."""

        def run() -> list[Event]:
            if job is None:
                rows = self.db.execute(
                    "SELECT * FROM events ORDER BY seq DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self.db.execute(
                    "SELECT * FROM events WHERE job = ? ORDER BY seq DESC LIMIT ?", (job, limit)
                ).fetchall()
            return [
                Event(r["seq"], r["job"], r["ts"], r["kind"], json.loads(r["data"]))
                for r in reversed(rows)
            ]

        return await self._call(run)

    async def model_versions(self, job: str) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            rows = self.db.execute(
                "SELECT version, updates_applied, metrics, ts FROM model_versions "
                "WHERE job = ? ORDER BY version",
                (job,),
            )
            return [
                {
                    "version": r["version"],
                    "updates_applied": r["updates_applied"],
                    "metrics": json.loads(r["metrics"]),
                    "ts": r["ts"],
                }
                for r in rows
            ]

        return await self._call(run)

    # model weights -----------------------------------------------------------------------------
    async def keep_weights(
        self, job: str, version: int, data: bytes, *, final: bool
    ) -> StoredWeights | None:
        """Keep ``data`` (tensor-codec weights) as the job's newest weights: written as a blob,
        recorded in the job, and the blob it supersedes deleted unless something else names it.

        Nothing happens (``None``) when the job already has a newer version, or this version
        final. All of it runs on the store's thread, so no other store call sees it half done.
        """
        now = time.time()

        def run() -> StoredWeights | None:
            db = self.db
            row = db.execute(
                "SELECT weights_version, weights_digest, weights_final FROM jobs WHERE id = ?",
                (job,),
            ).fetchone()
            if row is None:
                raise LookupError(f"no job {job!r}")
            known = row["weights_version"]
            if known is not None and (known, bool(row["weights_final"])) >= (version, final):
                return None
            digest = self._put_blob(data)

            def record(db: sqlite3.Connection) -> None:
                db.execute(
                    "UPDATE jobs SET weights_version = ?, weights_digest = ?, weights_final = ?, "
                    "weights_at = ? WHERE id = ?",
                    (version, digest, int(final), now, job),
                )

            self._tx(record)
            previous = row["weights_digest"]
            if previous and previous != digest:
                self._drop_blob_unless_used(previous)
            return StoredWeights(job, version, digest, final, now)

        return await self._call(run)

    async def job_weights(self, job: str) -> StoredWeights | None:
        """The newest weights kept for ``job``, or ``None``."""

        def run() -> StoredWeights | None:
            row = self.db.execute(
                "SELECT weights_version, weights_digest, weights_final, weights_at FROM jobs "
                "WHERE id = ?",
                (job,),
            ).fetchone()
            if row is None or row["weights_digest"] is None:
                return None
            return StoredWeights(
                job=job,
                version=int(row["weights_version"]),
                digest=str(row["weights_digest"]),
                final=bool(row["weights_final"]),
                stored_at=float(row["weights_at"]),
            )

        return await self._call(run)

    def _drop_blob_unless_used(self, digest: str) -> bool:
        """Delete a blob no job names any more (as an artifact or as its weights).

        Blobs are content-addressed, so superseded weights may share their blob with an
        artifact (version 0 is the job's initial weights) or another job's weights."""
        used = self.db.execute(
            "SELECT 1 FROM jobs WHERE weights_digest = ? OR instr(artifacts, ?) > 0 LIMIT 1",
            (digest, digest),
        ).fetchone()
        if used is not None:
            return False
        self.blob_path(digest).unlink(missing_ok=True)
        return True

    # enrolment tokens --------------------------------------------------------------------------
    async def add_token(self, token: EnrolmentToken) -> None:
        def run() -> None:
            self.db.execute(
                "INSERT INTO enrolment_tokens (id, secret, agent, aggregator, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token.id,
                    token.secret,
                    token.agent,
                    int(token.aggregator),
                    token.created_at,
                    token.expires_at,
                ),
            )

        await self._call(run)

    async def token(self, token_id: str) -> EnrolmentToken | None:
        def run() -> EnrolmentToken | None:
            row = self.db.execute(
                "SELECT * FROM enrolment_tokens WHERE id = ?", (token_id,)
            ).fetchone()
            return None if row is None else _token_from_row(row)

        return await self._call(run)

    async def spend_token(self, token_id: str, agent: str, now: float) -> bool:
        """Mark an unexpired, unused token used by ``agent``; ``False`` if it was not (any
        more) both. Atomic: of two requests racing with one token, one wins."""

        def run() -> bool:
            cursor = self.db.execute(
                "UPDATE enrolment_tokens SET used_at = ?, used_by = ? "
                "WHERE id = ? AND used_at IS NULL AND expires_at > ?",
                (now, agent, token_id, now),
            )
            return cursor.rowcount == 1

        return await self._call(run)

    # blobs -------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self.blob_dir / digest

    async def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its SHA-256 (hex), durably; returns the digest."""
        return await self._call(self._put_blob, data)

    def _put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if path.exists() and path.stat().st_size == len(data):
            return digest
        tmp = path.with_name(f".{digest}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.blob_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return digest

    async def get_blob(self, digest: str) -> bytes:
        def run() -> bytes:
            data = self.blob_path(digest).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise StoreError(f"blob {digest[:12]} is corrupt")
            return data

        return await self._call(run)


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (they hold no string literals with ';')."""
    return [s.strip() for s in script.split(";") if s.strip()]

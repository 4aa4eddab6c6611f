"""Following jobs from submission to the end: placement, dispatch, watching, replacing, stopping.

The lifecycle (Flame's job/role model, run on our agents)::

    submit → planned → dispatching → running → completed | failed | cancelled

* **planned**: the job is stored; it waits here, re-planned whenever the fleet changes, until
  the planner finds an aggregator and at least ``min_trainers`` trainers.
* **dispatching**: every chosen role gets a signed :class:`~agent.protocol.bundle.RoleBundle`
  in an ``assign_role`` command on its agent's inbox (chunked by the transport when large). An
  agent that does not report the role in its retained ``agents/<id>/roles`` document within the
  dispatch timeout is asked again, then given up on and replaced.
* **running**: the aggregator and ``min_trainers`` trainers report ``running``. Trainers that go
  offline are replaced from the standby agents in ``async`` mode (FedBuff keeps ``concurrency``
  clients busy) and dropped from the next round in ``sync`` mode (FedAvg rounds). Trainers
  that refuse or fail are replaced and never asked again for this job. Metric events from the
  roles on ``jobs/<id>/metrics/<agent>`` are folded into the job (model version, updates applied,
  latest accuracy and loss) and the stop rules are checked.
* The end: the aggregator finishes or says ``completed``, a stop rule is met, the aggregator
  fails, or the operator cancels; remaining roles get ``cancel_role``.

Every change is written to SQLite (:class:`~coordinator.store.Store`) *before* it is announced
(commands sent, retained ``jobs/<id>/state`` published), so after a crash ``ember serve``
reloads the jobs, re-publishes their states and resumes following them: a role is dispatched
again only when its agent's roles document says it is not running.

All decisions run under one lock, in :meth:`Dispatcher.reconcile`, which compares what the
store says should run with what the agents report, so every event (a document, a tick, a
restart) leads to the same place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.messages import AssignRole, CancelRole, new_message_id
from agent.protocol.topics import Topics
from agent.tasks import cancel_and_wait, wait_event
from agent.transport import Inbound, NotConnectedError, Subscription, Transport
from coordinator import planner
from coordinator.bundles import build_bundle, check_artifacts, sign
from coordinator.registry import AgentView, Registry, RoleState
from coordinator.spec import JobSpec, SpecError, parse_spec
from coordinator.store import AssignmentRecord, JobRecord, Store

log = structlog.get_logger("ember.dispatcher")

JOB_STATE_VERSION = 1
ACTIVE = frozenset({"pending", "running"})
"""Assignment states of a role that is (or is about to be) at work."""
GIVEN_UP = frozenset({"failed", "refused", "finished"})
"""Trainer assignment states after which the agent is not asked again for this job."""
NOT_METRICS = frozenset(
    {
        "event",
        "version",
        "updates_applied",
        "ts",
        "v",
        "agent",
        "job",
        "role",
        "elapsed",
        "trainers",
    }
)
"""Numeric fields of a ``model_version`` event that are not model metrics."""
SHOWN_VERSIONS = 20
"""Model versions ``jobs.show`` lists unless asked for every one."""
HISTORY_POINTS = 50
"""Model versions listed in a job state's ``history`` (evenly spread, first and last kept)."""
RECENT_REJECTIONS = 20
"""Refused updates listed, with their reasons, in a job state's ``rejected``."""
REFUSALS = {
    "update_rejected": "rejected",
    "update_stale": "stale",
    "update_late": "late",
    "update_duplicate": "duplicate",
}
"""Aggregator events about an update that was not applied, and their kind in the job state."""
JOB_EVENTS = frozenset({"model_version", "completed", "failed"})
"""Metric events that move a job: believed only from the job's aggregator (as are
:data:`REFUSALS`)."""
MAX_METRICS_BYTES = 256 * 1024
"""A metric event is a small JSON object; anything larger is refused unread."""
CODE_PREFIX = "code:"
"""Artifact-name prefix under which Python sources are kept in the job's blobs."""


Command = tuple[str, bytes] | AssignmentRecord
"""An inbox message to send (topic, payload), or an assignment whose bundle is to be sent."""


class JobError(ValueError):
    """An operation on a job that cannot be done (unknown id, already finished, ...)."""


@dataclass(frozen=True)
class Timings:
    """How patient the dispatcher is. Tests shrink these; the defaults suit a real fleet."""

    settle: float = 1.5
    """After (re)start, wait this long for the retained agent documents before acting."""
    tick: float = 1.0
    """Re-check every job at least this often (timeouts, stop rules)."""
    dispatch_timeout: float = 20.0
    """Ask an agent again when it has not reported an assigned role within this time."""
    max_attempts: int = 3
    """Give up on an agent after this many unanswered assignments."""
    finish_grace: float = 5.0
    """Once the aggregator's role reports ``finished``, wait this long for its ``completed``
    event (which carries the final version and the stop reason) before completing the job from
    the role's state alone. The two travel apart: the state on the agent's retained roles
    topic, read by the registry, the event on the job's metrics topic, read by another task that
    saves each event before it takes the next, so the state can overtake the last events."""


@dataclass
class _Job:
    record: JobRecord
    spec: JobSpec
    assignments: dict[tuple[str, str], AssignmentRecord] = field(default_factory=dict)
    bundles: dict[tuple[str, str | None, str, int | None], tuple[str, bytes]] = field(
        default_factory=dict
    )
    """(role, dataset, backend, shard) → (content digest, signed bundle bytes), built once per
    job run."""
    backends: dict[str, str] = field(default_factory=dict)
    """Bundle digest → the backend it trains with."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One point per model version: version, ts, updates_applied and its metrics."""
    stragglers: list[str] = field(default_factory=list)
    """As the aggregator named them in its latest model_version event."""
    counters: dict[str, int] = field(default_factory=dict)
    """The aggregator's update counters from its latest model_version event."""
    rejected_codes: dict[str, int] = field(default_factory=dict)
    """The aggregator's totals of refused messages by reason code (``rejected`` of its
    ``model_version`` events): exact, where the refusal events are rate limited."""
    refused: dict[str, int] = field(default_factory=dict)
    """Updates not applied, by kind, as seen in the aggregator's events since start."""
    recent_refusals: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=RECENT_REJECTIONS)
    )


def _now() -> float:
    return time.time()


class Dispatcher:
    """Jobs and their role assignments, kept in the store and matched against the fleet."""

    def __init__(
        self,
        *,
        transport: Transport,
        topics: Topics,
        store: Store,
        registry: Registry,
        key: Ed25519PrivateKey,
        timings: Timings | None = None,
        prefer_aggregator: str | None = None,
        clock: Callable[[], float] = _now,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.store = store
        self.registry = registry
        self.key = key
        self.timings = timings or Timings()
        self.prefer_aggregator = prefer_aggregator
        self.clock = clock
        self.jobs: dict[str, _Job] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._settled = False
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics: Subscription | None = None
        self.metrics_refused = 0
        """Metric events refused (malformed, or a job event from another agent than the
        job's aggregator)."""
        self._listeners: list[Callable[[str, str], None]] = []

    # lifecycle ---------------------------------------------------------------------------------
    def listen(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(job_id, phase)`` whenever a job changes (from the event loop)."""
        self._listeners.append(callback)

    async def start(self) -> None:
        """Reload every job from the store, re-publish their states, start following them."""
        records = await self.store.load_jobs()
        assignments = await self.store.load_assignments()
        for record in records:
            try:
                spec = parse_spec(record.spec)
            except SpecError as exc:  # stored by an older version with other rules
                log.error("stored_spec_invalid", job=record.id, error=str(exc))
                continue
            self.jobs[record.id] = _Job(record=record, spec=spec)
        for a in assignments:
            job = self.jobs.get(a.job)
            if job is not None:
                job.assignments[(a.agent, a.role)] = a
        for job in self.jobs.values():
            for row in await self.store.model_versions(job.record.id):
                job.history.append(
                    history_point(row["version"], row["ts"], row["updates_applied"], row["metrics"])
                )
        self._dirty.update(self.jobs)
        self._dirty_event.set()
        self.registry.listen(lambda agent, leaf: self._wake.set())
        self.transport.on_connect(self._on_connect)
        self._metrics = await self.transport.subscribe(
            self.topics.all_job_metrics(), 0, max_messages=100_000
        )
        self._tasks = [
            asyncio.create_task(self._follow(), name="dispatcher-follow"),
            asyncio.create_task(self._publish_states(), name="dispatcher-states"),
            asyncio.create_task(self._send_commands(), name="dispatcher-outbox"),
            asyncio.create_task(self._read_metrics(self._metrics), name="dispatcher-metrics"),
        ]
        active = sum(1 for j in self.jobs.values() if not j.record.terminal)
        log.info("jobs_loaded", jobs=len(self.jobs), active=active)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None

    async def _on_connect(self, _session: int) -> None:
        # Retained states may be gone (a broker restarted without persistence): publish all.
        self._dirty.update(self.jobs)
        self._dirty_event.set()

    async def _follow(self) -> None:
        await asyncio.sleep(self.timings.settle)
        self._settled = True
        log.info("dispatcher_settled", agents=len(self.registry))
        while True:
            async with self._lock:
                for job in list(self.jobs.values()):
                    try:
                        await self._reconcile(job)
                    except Exception:
                        log.exception("reconcile_failed", job=job.record.id)
            self._wake.clear()
            await wait_event(self._wake, self.timings.tick)

    # queries -----------------------------------------------------------------------------------
    def trainer_backends(self, job_id: str) -> dict[str, str]:
        """Agent → the backend of the trainer bundle it was sent (``backend: auto`` mixes)."""
        job = self.find(job_id)
        return {
            a.agent: job.backends[a.bundle]
            for a in job.assignments.values()
            if a.role == "trainer" and a.bundle in job.backends
        }

    def find(self, job_id: str) -> _Job:
        """A job by id or unique id prefix (or unique name)."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        matches = [j for j in self.jobs.values() if j.record.id.startswith(job_id)]
        if not matches:
            matches = [j for j in self.jobs.values() if j.record.name == job_id]
            live = [j for j in matches if not j.record.terminal]
            matches = live if len(live) == 1 else matches
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise JobError(f"no job {job_id!r}")
        ids = ", ".join(sorted(j.record.id for j in matches)[:5])
        raise JobError(f"{job_id!r} matches several jobs: {ids}")

    def plan(self, spec: JobSpec) -> planner.Plan:
        return planner.plan(
            self.registry.snapshot(), spec, prefer_aggregator=self.prefer_aggregator
        )

    def summary(self, job: _Job) -> dict[str, Any]:
        r = job.record
        trainers = [a for a in job.assignments.values() if a.role == "trainer"]
        return {
            "job": r.id,
            "name": r.name,
            "phase": r.phase,
            "reason": r.reason,
            "mode": job.spec.algorithm.mode,
            "model_version": r.model_version,
            "updates_applied": r.updates_applied,
            "metrics": dict(r.metrics),
            "progress": progress(job.spec, r, self.clock()),
            "trainers": _count(a.state for a in trainers),
            "submitted": r.submitted_at,
            "started": r.started_at,
            "finished": r.finished_at,
        }

    def state_document(self, job: _Job) -> dict[str, Any]:
        """The retained ``jobs/<id>/state`` JSON, for dashboards and ``ember jobs watch``."""
        agents: dict[str, dict[str, Any]] = {}
        for a in sorted(job.assignments.values(), key=lambda a: (a.agent, a.role)):
            agents.setdefault(a.agent, {})[a.role] = {
                "state": a.state,
                "reason": a.reason,
                "dataset": a.dataset,
                "samples": a.samples,
                **({} if a.shard is None else {"shard": a.shard}),
            }
        participants = {
            a.agent
            for a in job.assignments.values()
            if a.role == "trainer" and a.state == "running"
        }
        return {
            "v": JOB_STATE_VERSION,
            **self.summary(job),
            "stop": {k: v for k, v in vars(job.spec.stop).items() if v is not None},
            "agents": agents,
            "participants": sorted(participants),
            "stragglers": list(job.stragglers),
            "counters": dict(job.counters),
            "rejected": {
                "count": sum(job.refused.values()),
                "by_kind": dict(job.refused),
                "by_code": dict(job.rejected_codes),
                "recent": list(job.recent_refusals),
            },
            "history": history_summary(job.history),
            "ts": round(self.clock(), 3),
        }

    async def detail(self, job: _Job, *, versions: int | None = SHOWN_VERSIONS) -> dict[str, Any]:
        """The job's state with its spec, assignments, latest events and its newest
        ``versions`` model versions (every one with ``None``: a report's learning curve)."""
        events = await self.store.events(job.record.id, limit=40)
        kept = await self.store.model_versions(job.record.id)
        return {
            **self.state_document(job),
            "spec": job.record.spec,
            "assignments": [
                {
                    "agent": a.agent,
                    "role": a.role,
                    "shard": a.shard,
                    "state": a.state,
                    "reason": a.reason,
                    "dataset": a.dataset,
                    "samples": a.samples,
                    "bundle": a.bundle,
                    "attempts": a.attempts,
                    "updated": a.updated_at,
                }
                for a in sorted(job.assignments.values(), key=lambda a: (a.role, a.agent))
            ],
            "events": [e.to_dict() for e in events],
            "model_versions": kept if versions is None else kept[-versions:] if versions else [],
        }

    # operations --------------------------------------------------------------------------------
    async def submit(
        self,
        spec: JobSpec,
        artifacts: Mapping[str, bytes],
        *,
        code: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> _Job:
        """Store a new job (phase ``planned``) and try to place it at once."""
        check_artifacts(artifacts)
        if request_id is not None:
            existing = await self.store.job_for_request(request_id)
            if existing is not None and existing in self.jobs:
                return self.jobs[existing]
        digests: dict[str, str] = {}
        for name, data in sorted(artifacts.items()):
            digests[name] = await self.store.put_blob(bytes(data))
        for name, source in sorted((code or {}).items()):
            digests[CODE_PREFIX + name] = await self.store.put_blob(source.encode())
        async with self._lock:
            job_id = self._new_id(spec.name)
            now = self.clock()
            record = JobRecord(
                id=job_id,
                name=spec.name,
                spec=json.loads(json.dumps(spec.to_dict(), sort_keys=True)),
                phase="planned",
                artifacts=digests,
                request_id=request_id,
                submitted_at=now,
                updated_at=now,
            )
            job = _Job(record=record, spec=spec)
            await self.store.save(
                jobs=[record], events=[(job_id, "submitted", {"name": spec.name})]
            )
            self.jobs[job_id] = job
            self._announce(job)
            log.info("job_submitted", job=job_id, name=spec.name)
            if self._settled:
                await self._reconcile(job)
        return job

    async def cancel(self, job_id: str, reason: str = "") -> _Job:
        async with self._lock:
            job = self.find(job_id)
            if job.record.terminal:
                raise JobError(f"job {job.record.id} is already {job.record.phase}")
            await self._finish(job, "cancelled", reason or "cancelled by the operator")
        return job

    def _new_id(self, name: str) -> str:
        while True:
            job_id = f"{name}-{secrets.token_hex(3)}"
            if job_id not in self.jobs:
                return job_id

    # reconciliation ----------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Bring every job up to date now (the follow loop does this on every change)."""
        async with self._lock:
            for job in list(self.jobs.values()):
                await self._reconcile(job)

    async def _reconcile(self, job: _Job) -> None:
        record = job.record
        if record.terminal:
            await self._cancel_surplus(job)
            return
        if record.phase == "planned":
            await self._place(job)
            return
        now = self.clock()
        changed: list[AssignmentRecord] = []
        events: list[tuple[str | None, str, Mapping[str, Any]]] = []
        commands: list[Command] = []
        for a in list(job.assignments.values()):
            agent = self.registry.get(a.agent)
            observed = self._observed(job, a, agent)
            before = (a.state, a.reason)
            self._follow_assignment(job, a, agent, observed, now, commands)
            if (a.state, a.reason) != before or a.updated_at == now:
                a.updated_at = now
                changed.append(a)
                if (a.state, a.reason) != before:
                    events.append(
                        (
                            record.id,
                            "assignment",
                            {
                                "agent": a.agent,
                                "role": a.role,
                                "state": a.state,
                                "reason": a.reason,
                            },
                        )
                    )
        if changed:
            await self.store.save(assignments=changed, events=events)
            self._announce(job)
        await self._send_all(commands)
        # The aggregator decides the job's fate; a sharded job also fails with any of its shards
        # (a shard's slice of the model lives only in its checkpoints).
        agg = self._aggregator(job)
        if agg is not None and agg.state == "finished":
            waited = now - agg.updated_at
            if waited >= self.timings.finish_grace or waited < 0:  # < 0: the clock went back
                await self._finish(job, "completed", "the aggregator finished")
            return
        ended = ("failed", "refused", "cancelled")
        lost = next((a for a in self._aggregation(job) if a.state in ended), None)  # lead first
        if lost is not None:
            where = f"{_role_name(lost)} on {lost.agent} {lost.state}"
            await self._finish(job, "failed", f"{where}: {lost.reason}" if lost.reason else where)
            return
        await self._fill_trainers(job)
        await self._fill_middles(job)
        await self._cancel_surplus(job)
        await self._advance(job)

    def _observed(
        self, job: _Job, a: AssignmentRecord, agent: AgentView | None
    ) -> RoleState | None:
        """What the agent reports about this assignment's role, if it is about this bundle."""
        if agent is None:
            return None
        state = agent.roles.get(f"{job.record.id}/{a.role}")
        if state is None:
            return None
        if a.bundle and state.bundle and state.bundle != a.bundle:
            return None  # about an older bundle of this role
        return state

    def _follow_assignment(
        self,
        job: _Job,
        a: AssignmentRecord,
        agent: AgentView | None,
        observed: RoleState | None,
        now: float,
        commands: list[Command],
    ) -> None:
        online = agent is not None and agent.online
        mode = job.spec.algorithm.mode
        if a.state in ACTIVE and observed is not None and observed.state == "cancelled":
            # The coordinator cancels only roles it no longer wants; one it still wants was
            # cancelled by its agent stopping (SIGTERM, or the embedded agent going down with
            # a killed coordinator). Not the role's end: it is sent again once the agent is back.
            observed = None
        if a.state in ACTIVE:
            if observed is not None and observed.state in ("running", "starting"):
                if a.state != "running":
                    a.state, a.reason = "running", ""
            elif observed is not None and observed.state in (
                "finished",
                "failed",
                "refused",
                "cancelled",
            ):
                a.state, a.reason = observed.state, observed.reason
                return
            if not online:
                if a.role == "trainer":
                    a.state = "replaced" if mode == "async" else "dropped"
                    a.reason = "agent offline"
                    commands.append(self._cancel_command(job, a, "replaced while offline"))
                elif a.role == "middle_aggregator":
                    # Its group's trainers wait for it: another agent of the group takes over.
                    a.state, a.reason = "replaced", "agent offline"
                    commands.append(self._cancel_command(job, a, "replaced while offline"))
                return
            if a.state == "running" and observed is None:
                # The agent is online and does not list the role: it lost it (restarted
                # without its state, or never got it before we crashed). Send it again.
                a.state, a.reason = "pending", "agent does not report the role; sending again"
                a.attempts = 0
                a.dispatched_at = None
            if a.state == "pending" and observed is None:
                waited = now - (a.dispatched_at or 0.0)
                if a.dispatched_at is None or waited >= self.timings.dispatch_timeout:
                    if a.attempts >= self.timings.max_attempts:
                        a.state = "failed"
                        a.reason = f"no answer from the agent after {a.attempts} assignments"
                        return
                    self._mark_dispatched(a, now)
                    commands.append(a)
        elif a.state == "dropped" and online:
            # Sync mode: a dropped trainer that comes back takes part again.
            if observed is not None and observed.state in ("running", "starting"):
                a.state, a.reason = "running", "back online"
            elif observed is None or observed.state not in GIVEN_UP:
                a.state, a.reason = "pending", "back online"
                a.attempts = 0
                a.dispatched_at = None

    def _mark_dispatched(self, a: AssignmentRecord, now: float) -> None:
        a.attempts += 1
        a.dispatched_at = now
        a.updated_at = now
        a.message_id = new_message_id()

    def _cancel_command(self, job: _Job, a: AssignmentRecord, reason: str) -> tuple[str, bytes]:
        message = CancelRole(job=job.record.id, role=a.role, reason=reason)
        return (self.topics.agent_inbox(a.agent), message.to_msgpack())

    async def _commit_assignments(
        self, job: _Job, changed: list[AssignmentRecord], commands: list[Command]
    ) -> None:
        """Store ``changed`` assignments with an event each, announce the job, then send
        ``commands`` (the store first: a crash after sending must not forget a dispatch)."""
        if not changed:
            return
        events: list[tuple[str | None, str, Mapping[str, Any]]] = [
            (
                job.record.id,
                "assignment",
                {"agent": a.agent, "role": a.role, "state": a.state, "reason": a.reason},
            )
            for a in changed
        ]
        await self.store.save(assignments=changed, events=events)
        self._announce(job)
        await self._send_all(commands)

    async def _send_all(self, commands: list[Command]) -> None:
        """Queue commands for the outbox; assignments become signed ``assign_role`` messages."""
        for command in commands:
            if not isinstance(command, AssignmentRecord):
                self._outbox.put_nowait(command)
                continue
            a = command
            job = self.jobs.get(a.job)
            if job is None:
                continue
            try:
                signed = await self._bundle(job, a)
            except Exception as exc:
                log.exception("bundle_failed", job=a.job, agent=a.agent, role=a.role)
                a.state, a.reason = "failed", f"cannot build the bundle: {exc}"
                await self.store.save(assignments=[a])
                continue
            message = AssignRole(
                id=a.message_id or new_message_id(), job=a.job, role=a.role, bundle=signed
            )
            log.info(
                "role_dispatched",
                job=a.job,
                agent=a.agent,
                role=a.role,
                attempt=a.attempts,
                bundle=(a.bundle or "")[:12],
                bytes=len(signed),
            )
            self._outbox.put_nowait((self.topics.agent_inbox(a.agent), message.to_msgpack()))

    async def _bundle(self, job: _Job, a: AssignmentRecord) -> bytes:
        """The signed bundle for one assignment (built once per role, dataset and backend)."""
        backend = job.spec.backend
        agent = self.registry.get(a.agent)
        if a.role == "trainer" and agent is not None and agent.info is not None:
            backend = planner.trainer_backend(agent.info, backend)
        key = (a.role, a.dataset, backend, a.shard)
        cached = job.bundles.get(key)
        if cached is None:
            artifacts: dict[str, bytes] = {}
            code: dict[str, str] = {}
            for name, digest in job.record.artifacts.items():
                data = await self.store.get_blob(digest)
                if name.startswith(CODE_PREFIX):
                    code[name[len(CODE_PREFIX) :]] = data.decode()
                else:
                    artifacts[name] = data
            bundle = build_bundle(
                job=job.record.id,
                role=a.role,
                spec=job.record.spec,
                artifacts=artifacts,
                code=code,
                dataset=key[1],
                prefix=self.topics.prefix,
                created=job.record.submitted_at,
                backend=backend,
                shard=a.shard,
            )
            signed = sign(bundle, self.key)
            cached = (signed.digest, signed.to_bytes())
            job.bundles[key] = cached
            job.backends[signed.digest] = bundle.backend
        digest, data = cached
        if a.bundle != digest:
            a.bundle = digest
            await self.store.save(assignments=[a])
        return data

    def _aggregator(self, job: _Job) -> AssignmentRecord | None:
        """The job's lead: its aggregator, or a sharded job's assembler."""
        found = [a for a in job.assignments.values() if a.role in planner.LEAD_ROLES]
        live = [a for a in found if a.state in ACTIVE]
        return (live or found)[-1] if found else None

    def _shards(self, job: _Job) -> list[AssignmentRecord]:
        """A sharded job's aggregator shards, by shard index."""
        found = [a for a in job.assignments.values() if a.role == planner.SHARD_ROLE]
        return sorted(found, key=lambda a: (a.shard or 0, a.agent))

    def _aggregation(self, job: _Job) -> list[AssignmentRecord]:
        """The roles the job's aggregation needs: its lead and, sharded, every shard."""
        lead = self._aggregator(job)
        return ([lead] if lead is not None else []) + self._shards(job)

    # placement ---------------------------------------------------------------------------------
    def _excluded(self, job: _Job) -> set[str]:
        return {
            a.agent for a in job.assignments.values() if a.role == "trainer" and a.state in GIVEN_UP
        }

    async def _place(self, job: _Job) -> None:
        """planned → dispatching once the fleet can take the job."""
        record = job.record
        result = planner.plan(
            self.registry.snapshot(),
            job.spec,
            prefer_aggregator=self.prefer_aggregator,
            exclude=self._excluded(job),
        )
        if not result.feasible:
            reason = "waiting: " + "; ".join(result.problems)
            if record.reason != reason:
                record.reason = reason
                record.updated_at = self.clock()
                await self.store.save(
                    jobs=[record], events=[(record.id, "waiting", {"reason": reason})]
                )
                self._announce(job)
            return
        now = self.clock()
        new: list[AssignmentRecord] = []
        commands: list[Command] = []
        for chosen in result.selected:
            a = AssignmentRecord(
                job=record.id,
                agent=chosen.agent,
                role=chosen.role,
                state="standby" if chosen.standby else "pending",
                dataset=chosen.dataset,
                samples=chosen.samples,
                created_at=now,
                updated_at=now,
                shard=chosen.shard,
            )
            if not chosen.standby:
                self._mark_dispatched(a, now)
                commands.append(a)
            job.assignments[(a.agent, a.role)] = a
            new.append(a)
        record.phase, record.reason, record.updated_at = "dispatching", "", now
        plan_event = {
            "selected": [s.to_dict() for s in result.selected],
            "rejected": [r.to_dict() for r in result.rejected],
        }
        await self.store.save(
            jobs=[record], assignments=new, events=[(record.id, "planned", plan_event)]
        )
        self._announce(job)
        log.info(
            "job_placed",
            job=record.id,
            aggregator=result.aggregator.agent if result.aggregator else None,
            shards=[s.agent for s in result.shards],
            trainers=[s.agent for s in result.trainers if not s.standby],
            standby=[s.agent for s in result.trainers if s.standby],
        )
        await self._send_all(commands)

    async def _fill_trainers(self, job: _Job) -> None:
        """Keep ``concurrency`` trainers at work (async) or every eligible agent (sync).

        A trainer replaced while offline that comes back still running its role is taken back
        first, if there is room; then new agents are dispatched, biggest datasets first."""
        spec = job.spec
        trainers = {a.agent: a for a in job.assignments.values() if a.role == "trainer"}
        active = {agent for agent, a in trainers.items() if a.state in ACTIVE}
        target = spec.algorithm.active_trainers
        if len(active) >= target:
            return
        now = self.clock()
        changed: list[AssignmentRecord] = []
        commands: list[Command] = []
        for agent_id, a in sorted(trainers.items()):
            if len(active) >= target:
                break
            agent = self.registry.get(agent_id)
            observed = self._observed(job, a, agent)
            if (
                a.state == "replaced"
                and agent is not None
                and agent.online
                and observed is not None
                and observed.state in ("running", "starting")
            ):
                a.state, a.reason, a.updated_at = "running", "back online", now
                active.add(agent_id)
                changed.append(a)
        if len(active) < target:
            agg = self._aggregator(job)
            result = planner.plan(
                self.registry.snapshot(),
                spec,
                prefer_aggregator=self.prefer_aggregator,
                exclude=self._excluded(job),
                aggregator=agg.agent if agg else None,
            )
            candidates = [
                s
                for s in result.trainers
                if s.agent not in active
                and (s.agent not in trainers or trainers[s.agent].state in ("standby", "replaced"))
            ]
            room = len(candidates) if target is math.inf else int(target) - len(active)
            for chosen in candidates[:room]:
                a = trainers.get(chosen.agent) or AssignmentRecord(
                    job=job.record.id,
                    agent=chosen.agent,
                    role="trainer",
                    state="standby",
                    created_at=now,
                )
                a.state = "pending"
                a.reason = "replacement" if job.record.phase == "running" else ""
                a.dataset, a.samples = chosen.dataset, chosen.samples
                a.attempts = 0
                self._mark_dispatched(a, now)
                job.assignments[(a.agent, a.role)] = a
                active.add(a.agent)
                changed.append(a)
                commands.append(a)
        await self._commit_assignments(job, changed, commands)

    async def _fill_middles(self, job: _Job) -> None:
        """Hierarchical and hybrid jobs: a middle aggregator at work for every group with a
        trainer at work (a group a replacement trainer opened, or whose middle aggregator
        went offline, failed or refused), placed as the planner places them; an agent whose
        middle aggregator role failed or refused is not asked again."""
        spec = job.spec
        group_by = spec.topology.group_by
        if group_by is None:
            return

        def group_of(agent_id: str) -> str | None:
            agent = self.registry.get(agent_id)
            return None if agent is None or agent.info is None else agent.info.labels.get(group_by)

        middles = [a for a in job.assignments.values() if a.role == "middle_aggregator"]
        covered = {group_of(a.agent) for a in middles if a.state in ACTIVE}
        orphans = [
            planner.Selected(
                agent=a.agent, role="trainer", samples=a.samples, group=group_of(a.agent)
            )
            for a in job.assignments.values()
            if a.role == "trainer" and a.state in ACTIVE
        ]
        orphans = [t for t in orphans if t.group is not None and t.group not in covered]
        if not orphans:
            return
        given_up = {a.agent for a in middles if a.state in ("failed", "refused")}
        chosen = planner.place_middle_aggregators(
            self.registry.snapshot(), spec, orphans, exclude=given_up
        )
        now = self.clock()
        changed: list[AssignmentRecord] = []
        for selected in chosen:
            a = job.assignments.get((selected.agent, "middle_aggregator")) or AssignmentRecord(
                job=job.record.id,
                agent=selected.agent,
                role="middle_aggregator",
                state="pending",
                created_at=now,
            )
            a.state, a.reason, a.attempts = "pending", "replacement", 0
            self._mark_dispatched(a, now)
            job.assignments[(a.agent, a.role)] = a
            changed.append(a)
        await self._commit_assignments(job, changed, list(changed))

    async def _cancel_surplus(self, job: _Job) -> None:
        """Roles an agent still runs though their assignment ended (replaced, cancelled)."""
        now = self.clock()
        commands: list[Command] = []
        touched: list[AssignmentRecord] = []
        for a in job.assignments.values():
            if a.state in ACTIVE or a.state in ("standby", "dropped"):
                continue
            agent = self.registry.get(a.agent)
            if agent is None or not agent.online:
                continue
            observed = agent.roles.get(f"{job.record.id}/{a.role}")
            if observed is None or observed.state not in ("running", "starting"):
                continue
            if now - (a.dispatched_at or 0.0) >= self.timings.dispatch_timeout:
                a.dispatched_at = now
                touched.append(a)
                reason = f"job {job.record.phase}" if job.record.terminal else a.reason
                commands.append(self._cancel_command(job, a, reason or "no longer assigned"))
        if touched:
            await self.store.save(assignments=touched)
            await self._send_all(commands)

    async def _advance(self, job: _Job) -> None:
        """dispatching → running, stop rules, and failing a job nobody can train."""
        record = job.record
        now = self.clock()
        trainers = [a for a in job.assignments.values() if a.role == "trainer"]
        running = [a for a in trainers if a.state == "running"]
        agg = self._aggregator(job)
        if record.phase == "dispatching":
            aggregation = self._aggregation(job)
            if (
                agg is not None
                and all(a.state == "running" for a in aggregation)
                and (len(running) >= job.spec.algorithm.min_trainers)
            ):
                record.phase, record.reason = "running", ""
                record.started_at = record.started_at or now
                record.updated_at = now
                await self.store.save(jobs=[record], events=[(record.id, "running", {})])
                self._announce(job)
                log.info("job_running", job=record.id, trainers=len(running))
                return
            pending = [a for a in trainers if a.state in ACTIVE]
            given_up = [a for a in trainers if a.state in ("failed", "refused")]
            if not pending and given_up and not self._has_candidates(job):
                last = given_up[-1]
                await self._finish(
                    job,
                    "failed",
                    f"no trainer could run the job (last: {last.agent} {last.state}"
                    + (f": {last.reason})" if last.reason else ")"),
                )
                return
        if record.phase == "running":
            notes = []
            for a in self._aggregation(job):
                agent = self.registry.get(a.agent)
                if agent is None or not agent.online:
                    notes.append(f"{_role_name(a)} {a.agent} offline")
            if not any(a.state in ACTIVE for a in trainers):
                notes.append("no trainer at work: waiting for an eligible agent")
            note = "; ".join(notes)
            if record.reason != note:
                record.reason = note
                record.updated_at = now
                await self.store.save(jobs=[record])
                self._announce(job)
        stop = job.spec.stop
        started = record.started_at
        if (
            stop.max_minutes is not None
            and started is not None
            and (now - started >= stop.max_minutes * 60)
        ):
            await self._finish(job, "completed", f"max_minutes reached ({stop.max_minutes:g})")

    def _has_candidates(self, job: _Job) -> bool:
        agg = self._aggregator(job)
        result = planner.plan(
            self.registry.snapshot(),
            job.spec,
            exclude=self._excluded(job),
            aggregator=agg.agent if agg else None,
        )
        return bool(result.trainers)

    # the end -----------------------------------------------------------------------------------
    async def _finish(self, job: _Job, phase: str, reason: str) -> None:
        record = job.record
        now = self.clock()
        record.phase, record.reason = phase, reason
        record.finished_at = now
        record.updated_at = now
        changed: list[AssignmentRecord] = []
        commands: list[Command] = []
        for a in job.assignments.values():
            if a.state in ACTIVE or a.state in ("standby", "dropped"):
                was_active = a.state in ACTIVE
                a.state = "cancelled" if was_active else a.state
                a.reason = f"job {phase}"
                a.updated_at = now
                a.dispatched_at = now
                changed.append(a)
                if was_active:
                    commands.append(self._cancel_command(job, a, f"job {phase}: {reason}"))
        await self.store.save(
            jobs=[record], assignments=changed, events=[(record.id, phase, {"reason": reason})]
        )
        self._announce(job)
        log.info("job_finished", job=record.id, phase=phase, reason=reason)
        await self._send_all(commands)

    # metrics -----------------------------------------------------------------------------------
    async def _read_metrics(self, sub: Subscription) -> None:
        async for message in sub:
            try:
                await self.apply_metrics(message)
            except Exception:
                log.exception("metrics_event_failed", topic=message.topic)

    async def apply_metrics(self, message: Inbound) -> None:
        """Fold one metric event from ``jobs/<id>/metrics/<agent>`` into its job.

        Events that move a job (``model_version``, ``completed``, ``failed``) and the
        aggregator's refusals count only from the agent assigned the job's aggregator, named by
        the topic (which broker ACLs let only that agent write); anything else is logged with
        its reason, counted in :attr:`metrics_refused` and dropped."""
        sender = self.topics.metrics_sender(message.topic)
        if sender is None:
            self._refuse_metrics(message.topic, "not a jobs/<job>/metrics/<agent> topic")
            return
        job_id, agent = sender
        job = self.jobs.get(job_id)
        if job is None or job.record.terminal:
            # Late events of an ended job are normal: noted, not refused.
            log.debug("metrics_event_ignored", topic=message.topic, reason="no such running job")
            return
        size = memoryview(message.payload).nbytes
        if size > MAX_METRICS_BYTES:
            self._refuse_metrics(message.topic, f"{size} bytes, above {MAX_METRICS_BYTES}")
            return
        try:
            event = json.loads(bytes(message.payload))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._refuse_metrics(message.topic, f"invalid JSON: {exc}")
            return
        if not isinstance(event, dict):
            self._refuse_metrics(
                message.topic, f"expected a JSON object, got {type(event).__name__}"
            )
            return
        kind = event.get("event")
        if not isinstance(kind, str) or (kind not in JOB_EVENTS and kind not in REFUSALS):
            # Informational (trainer events): dashboards read them, the coordinator does not.
            log.debug("metrics_event_ignored", topic=message.topic, reason="not a job event")
            return
        # A refusal names the trainer whose update it was; a job event names its own sender.
        named = event.get("agent", agent)
        if kind in JOB_EVENTS and named != agent:
            self._refuse_metrics(message.topic, f"{kind} names agent {_text(named)!r:.80}")
            return
        async with self._lock:
            if job.record.terminal:
                log.debug("metrics_event_ignored", topic=message.topic, reason="the job ended")
                return
            aggregator = self._aggregator(job)
            shards = {a.agent for a in self._shards(job)} if kind in REFUSALS else set()
            if aggregator is None or (aggregator.agent != agent and agent not in shards):
                holder = aggregator.agent if aggregator is not None else "nobody"
                self._refuse_metrics(
                    message.topic,
                    f"{kind} from {agent!r}, but the job's aggregator is {holder!r}",
                )
                return
            if kind == "model_version":
                await self._model_version(job, event)
            elif kind == "completed":
                if isinstance(event.get("version"), int):
                    await self._model_version(job, event, check_stop=False)
                await self._finish(job, "completed", _text(event.get("reason")) or "completed")
            elif kind == "failed":
                await self._finish(
                    job, "failed", _text(event.get("reason")) or "the aggregator failed"
                )
            else:
                self._refusal(job, REFUSALS[kind], event)

    def _refusal(self, job: _Job, kind: str, event: Mapping[str, Any]) -> None:
        """An update the aggregator did not apply: counted and listed with its reason."""
        job.refused[kind] = job.refused.get(kind, 0) + 1
        ts = event.get("ts")
        topic = _text(event.get("topic"))
        # An undecodable message names no sender: its topic's last level does (the
        # envelope's ``agent`` is then the aggregator's host).
        agent = topic.rsplit("/", 1)[-1] if topic else _text(event.get("agent"))
        job.recent_refusals.append(
            {
                "ts": ts if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None,
                "kind": kind,
                "agent": agent,
                "update": _text(event.get("update")),
                "topic": topic,
                "reason": _text(event.get("reason")),
            }
        )
        self._announce(job)

    def _refuse_metrics(self, topic: str, reason: str) -> None:
        self.metrics_refused += 1
        log.warning("metrics_event_refused", topic=topic, reason=reason)

    async def _model_version(
        self, job: _Job, event: Mapping[str, Any], *, check_stop: bool = True
    ) -> None:
        record = job.record
        version = event.get("version")
        if (
            not isinstance(version, int)
            or isinstance(version, bool)
            or version < record.model_version
        ):
            return
        updates = event.get("updates_applied")
        metrics = {
            k: v
            for k, v in event.items()
            if k not in NOT_METRICS
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
        }
        record.model_version = version
        if isinstance(updates, int) and not isinstance(updates, bool):
            record.updates_applied = max(record.updates_applied, updates)
        record.metrics = {**record.metrics, **metrics}
        record.updated_at = self.clock()
        point = history_point(version, record.updated_at, record.updates_applied, metrics)
        if job.history and job.history[-1]["version"] == version:
            job.history[-1] = {**job.history[-1], **point}  # e.g. the completed event
        else:
            job.history.append(point)
        stragglers = event.get("stragglers")
        if isinstance(stragglers, list):
            job.stragglers = [_text(a) for a in stragglers if isinstance(a, str)][:1000]
        counters = event.get("counters")
        if isinstance(counters, dict):
            job.counters = {
                str(k)[:64]: v
                for k, v in counters.items()
                if isinstance(v, int) and not isinstance(v, bool)
            }
        codes = event.get("rejected")
        if isinstance(codes, dict):
            job.rejected_codes = {
                str(k)[:64]: v
                for k, v in list(codes.items())[:100]
                if isinstance(v, int) and not isinstance(v, bool)
            }
        if record.phase == "dispatching" and record.started_at is None:
            record.started_at = record.updated_at
        await self.store.save(
            jobs=[record],
            model_version=(record.id, version, record.updates_applied, metrics),
        )
        self._announce(job)
        reason = stop_reason(job.spec, record) if check_stop else ""
        if reason:
            await self._finish(job, "completed", reason)

    # announcing --------------------------------------------------------------------------------
    def _announce(self, job: _Job) -> None:
        self._dirty.add(job.record.id)
        self._dirty_event.set()
        for callback in self._listeners:
            try:
                callback(job.record.id, job.record.phase)
            except Exception:
                log.exception("job_listener_failed", job=job.record.id)

    async def _publish_states(self) -> None:
        """Publish the retained state of every job that changed, coalescing bursts."""
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            while self._dirty:
                job_id = self._dirty.pop()
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                payload = json.dumps(self.state_document(job), separators=(",", ":"))
                try:
                    await self.transport.publish(
                        self.topics.job_state(job_id), payload, qos=1, retain=True, timeout=None
                    )
                except Exception as exc:
                    log.warning("job_state_publish_failed", job=job_id, error=str(exc))
                    self._dirty.add(job_id)
                    await asyncio.sleep(1.0)

    async def _send_commands(self) -> None:
        while True:
            topic, payload = await self._outbox.get()
            try:
                await self.transport.publish(topic, payload, qos=1, timeout=60)
            except NotConnectedError as exc:
                # The dispatch timeout sends it again; nothing is lost by dropping it here.
                log.warning("command_not_sent", topic=topic, error=str(exc))
            except Exception:
                log.exception("command_failed", topic=topic)
            finally:
                self._outbox.task_done()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until queued commands and states are out (for a clean stop)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._outbox.join(), timeout)


# -- pure helpers --------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value[:1024] if isinstance(value, str) else ""


def _count(states: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in states:
        out[state] = out.get(state, 0) + 1
    return out


def history_point(
    version: int, ts: float, updates_applied: int, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """One model version in a job's ``history``: when, how many updates, accuracy and loss."""
    point: dict[str, Any] = {
        "version": version,
        "ts": round(ts, 3),
        "updates_applied": updates_applied,
    }
    for name in ("accuracy", "loss", "train_loss"):
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            point[name] = round(float(value), 6)
    return point


def history_summary(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A job's accuracy and loss history, small enough for a retained document: the best and
    latest values and at most :data:`HISTORY_POINTS` points spread evenly over the versions."""
    with_accuracy = [p for p in points if "accuracy" in p]
    with_loss = [p for p in points if "loss" in p]
    best = max(with_accuracy, key=lambda p: (p["accuracy"], -p["version"]), default=None)
    lowest = min(with_loss, key=lambda p: (p["loss"], p["version"]), default=None)
    count = len(points)
    if count > HISTORY_POINTS:
        step = (len(points) - 1) / (HISTORY_POINTS - 1)
        points = [points[round(i * step)] for i in range(HISTORY_POINTS)]
    return {
        "versions": count,
        "best_accuracy": None if best is None else best["accuracy"],
        "best_accuracy_version": None if best is None else best["version"],
        "lowest_loss": None if lowest is None else lowest["loss"],
        "points": [dict(p) for p in points],
    }


def stop_reason(spec: JobSpec, record: JobRecord) -> str:
    """The stop rule a job's progress has met, or ``""``."""
    stop = spec.stop
    accuracy = record.metrics.get("accuracy")
    if (
        stop.target_accuracy is not None
        and isinstance(accuracy, (int, float))
        and accuracy >= stop.target_accuracy
    ):
        return f"target_accuracy reached ({accuracy:.4g} ≥ {stop.target_accuracy:g})"
    if stop.max_updates is not None and record.updates_applied >= stop.max_updates:
        return f"max_updates reached ({record.updates_applied})"
    if stop.max_versions is not None and record.model_version >= stop.max_versions:
        return f"max_versions reached ({record.model_version})"
    return ""


def progress(spec: JobSpec, record: JobRecord, now: float) -> float:
    """How far the job is towards its nearest stop rule, in [0, 1] (accuracy counts only when
    it is the only rule)."""
    if record.phase == "completed":
        return 1.0
    stop = spec.stop
    parts = [0.0]
    if stop.max_updates:
        parts.append(record.updates_applied / stop.max_updates)
    if stop.max_versions:
        parts.append(record.model_version / stop.max_versions)
    if stop.max_minutes and record.started_at is not None:
        end = record.finished_at or now
        parts.append((end - record.started_at) / (stop.max_minutes * 60))
    accuracy = record.metrics.get("accuracy")
    if len(parts) == 1 and stop.target_accuracy and isinstance(accuracy, (int, float)):
        # Accuracy starts high and creeps: it says little about progress unless it is the
        # only rule there is.
        parts.append(accuracy / stop.target_accuracy)
    return round(min(1.0, max(parts)), 4)


def _role_name(a: AssignmentRecord) -> str:
    """How a job's reason names an assignment's role: ``aggregator``, ``aggregator shard 1``."""
    name = a.role.replace("_", " ")
    return name if a.shard is None else f"{name} {a.shard}"

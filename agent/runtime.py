"""The role runtime: the agent's inbox, and the roles it hosts off the event loop.

Commands arrive as msgpack on ``<prefix>/agents/<id>/inbox`` at QoS 1 (at least once). Each is
validated by :func:`~agent.protocol.messages.decode_message`; anything malformed is logged with
the precise reason and dropped, never raised. Every command carries an id, and an id already
handled is ignored, so a redelivered command is applied once.

* ``ping``: answered with a msgpack ``pong`` on ``reply_to``.
* ``assign_role``: the bundle is verified (Ed25519 signature by a trusted coordinator key, code
  only where ``allow_code``; :func:`~agent.protocol.bundle.verify_bundle`) in a worker thread,
  its role class looked up in :data:`~agent.roles.base.ROLE_TYPES` and :meth:`Role.run` started
  as a task. The same job and role with the same bundle digest is a no-op while the role runs
  or after it finished; a different digest replaces the running role.
* ``cancel_role``: the role's task is cancelled.

A role's CPU-bound work goes through ``ctx.run_cpu`` to a thread pool (numpy and onnxruntime
release the GIL while they compute), so the loop keeps answering pings, sending telemetry and
feeding the systemd watchdog. A role that raises is logged with its traceback and reported
``failed`` with the exception text; the daemon goes on.

Every role's state is kept retained on ``<prefix>/agents/<id>/roles`` as JSON::

    {"v": 1, "agent": "pi-kitchen", "ts": 1717000000.0,
     "roles": {"<job>/<role>": {"job": ..., "role": ..., "state": "running|finished|failed|
               refused|cancelled", "reason": "...", "bundle": "<sha256 of the bundle content>",
               "since": <ts>}}}

Refusals (bad signature, untrusted key, code not allowed, unknown role, missing dataset) are
recorded there too, so the coordinator learns why an agent did not take a role.

What each started role is doing right now is kept retained on
``<prefix>/jobs/<job>/agents/<id>/progress`` (one JSON document per job, a map from role name to
the fields the role reports through ``ctx.progress``, with ``state`` set by the runtime to
``starting`` and to the role's end state), published at most once per second per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog

from agent.protocol.errors import ProtocolError
from agent.protocol.messages import AssignRole, CancelRole, Ping, Pong, decode_message
from agent.protocol.topics import Topics, check_segment
from agent.tasks import cancel_and_wait
from agent.transport import NotConnectedError, Subscription, Transport

if TYPE_CHECKING:  # imported lazily at run time: cryptography costs memory on an idle agent
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.protocol.bundle import RoleBundle
    from agent.roles.base import LocalDataset, Role

log = structlog.get_logger("ember.runtime")

T = TypeVar("T")
RoleState = Literal["running", "finished", "failed", "refused", "cancelled"]
ROLES_VERSION = 1
HISTORY = 50
"""Ended roles kept in the retained roles document (running ones are always there)."""
SEEN_IDS = 4096
CANCEL_GRACE = 10.0
PROGRESS_VERSION = 1
PROGRESS_INTERVAL = 1.0
"""Seconds between two publications of one job's progress document (the last one wins)."""


@dataclass
class RoleRecord:
    job: str
    role: str
    state: RoleState
    bundle: str
    since: float
    reason: str = ""
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return f"{self.job}/{self.role}"

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "role": self.role,
            "state": self.state,
            "reason": self.reason,
            "bundle": self.bundle,
            "since": round(self.since, 3),
        }


class RoleRuntime:
    """Hosts roles for one agent: validated inbox commands (at-least-once delivery, applied once
    by message id), supervised role tasks, CPU work in worker threads, retained role states."""

    def __init__(
        self,
        *,
        agent_id: str,
        topics: Topics,
        transport: Transport,
        state_dir: Path,
        datasets: Mapping[str, LocalDataset],
        trusted_keys: Sequence[str],
        allow_code: bool = False,
        role_types: Mapping[str, type[Role]] | None = None,
        max_workers: int | None = None,
        role_extras: Mapping[str, Any] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.topics = topics
        self.transport = transport
        self.state_dir = state_dir
        self.datasets = datasets
        self.trusted_keys = tuple(trusted_keys)
        self.allow_code = allow_code
        self.records: dict[str, RoleRecord] = {}
        self.handled = 0
        self.rejected = 0
        self._role_types = role_types
        self._role_extras = dict(role_extras or {})
        self._trusted: dict[str, Ed25519PublicKey] | None = None
        self._max_workers = max_workers or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._inbox: Subscription | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dirty = asyncio.Event()
        self._stopping = False
        self._progress: dict[str, dict[str, dict[str, Any]]] = {}
        """job → role → the role's progress fields."""
        self._progress_topics: dict[str, Topics] = {}
        self._progress_dirty: set[str] = set()
        self._progress_event = asyncio.Event()
        self.updates_sent = 0
        """Updates the trainers hosted here have sent since the agent started."""

    # lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the inbox and publish role states after every (re)connection."""
        self.transport.on_connect(self._on_connect)
        self._inbox = await self.transport.subscribe(self.topics.agent_inbox(self.agent_id), qos=1)
        self._spawn(self._serve_inbox(self._inbox), "inbox")
        self._spawn(self._publish_states(), "roles-publisher")
        self._spawn(self._publish_progress(), "progress-publisher")

    async def stop(self, reason: str = "agent stopping", grace: float = 5.0) -> None:
        """Cancel every running role, wait up to ``grace`` seconds for them, stop the inbox."""
        self._stopping = True
        running = [r for r in self.records.values() if r.task is not None and not r.task.done()]
        for record in running:
            record.reason = reason
            assert record.task is not None
            record.task.cancel()
        if running:
            _, pending = await asyncio.wait([r.task for r in running if r.task], timeout=grace)
            for task in pending:
                log.warning("role_ignores_cancel", task=task.get_name())
        if self._inbox is not None:
            await self._inbox.close()
        await cancel_and_wait(self._tasks, suppress=(Exception,))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def cpu_busy(self) -> int:
        """Worker threads still computing (they cannot be interrupted, only waited for)."""
        return self._busy

    def running(self) -> list[str]:
        return sorted(k for k, r in self.records.items() if r.state == "running")

    # the retained roles document ---------------------------------------------------------------
    def snapshot(self) -> bytes:
        ended = sorted(
            (r for r in self.records.values() if r.state != "running"), key=lambda r: r.since
        )
        for old in ended[:-HISTORY] if len(ended) > HISTORY else []:
            del self.records[old.key]
            if not any(r.job == old.job for r in self.records.values()):
                self._progress.pop(old.job, None)
                self._progress_topics.pop(old.job, None)
                self._progress_dirty.discard(old.job)
        document = {
            "v": ROLES_VERSION,
            "agent": self.agent_id,
            "ts": round(time.time(), 3),
            "roles": {key: record.to_json() for key, record in sorted(self.records.items())},
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @property
    def roles_topic(self) -> str:
        return self.topics.agent_roles(self.agent_id)

    async def _on_connect(self, _session: int) -> None:
        await self.transport.publish(self.roles_topic, self.snapshot(), qos=1, retain=True)
        # Retained progress may be gone (a broker restarted without persistence).
        self._progress_dirty.update(self._progress)
        self._progress_event.set()

    def final_publishes(self) -> list[tuple[str, bytes, bool]]:
        """What to publish before a clean disconnect: the roles document and every progress
        document not yet out (the roles were just cancelled)."""
        final = [(self.roles_topic, self.snapshot(), True)]
        final += [(*self._progress_message(job), True) for job in sorted(self._progress_dirty)]
        self._progress_dirty.clear()
        return final

    # per-job progress --------------------------------------------------------------------------
    def _report_progress(
        self, topics: Topics, job: str, role: str, fields: Mapping[str, Any]
    ) -> None:
        """A role says how it is doing (``ctx.progress``); published by the progress task."""
        roles = self._progress.setdefault(job, {})
        old = roles.get(role, {})
        sent = fields.get("updates_sent")
        if isinstance(sent, int) and not isinstance(sent, bool):
            before = old.get("updates_sent", 0)
            self.updates_sent += max(0, sent - (before if isinstance(before, int) else 0))
        new = {**old, **_finite(dict(fields))}
        if new.get("state") != old.get("state"):
            new["since"] = round(time.time(), 3)
        roles[role] = new
        self._progress_topics[job] = topics
        self._progress_dirty.add(job)
        self._progress_event.set()

    def _progress_message(self, job: str) -> tuple[str, bytes]:
        roles = {
            role: {k: _finite(v()) if callable(v) else v for k, v in fields.items()}
            for role, fields in self._progress.get(job, {}).items()
        }
        document = {
            "v": PROGRESS_VERSION,
            "job": job,
            "agent": self.agent_id,
            "ts": round(time.time(), 3),
            "roles": roles,
        }
        topic = self._progress_topics[job].job_progress(job, self.agent_id)
        return topic, json.dumps(document, separators=(",", ":")).encode()

    async def _publish_progress(self) -> None:
        while True:
            await self._progress_event.wait()
            self._progress_event.clear()
            if not self.transport.connected:
                continue  # everything is marked again on connect
            for job in sorted(self._progress_dirty):
                self._progress_dirty.discard(job)
                topic, payload = self._progress_message(job)
                try:
                    await self.transport.publish(topic, payload, qos=1, retain=True, timeout=30)
                except NotConnectedError:
                    self._progress_dirty.add(job)
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def _publish_states(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not self.transport.connected:
                continue  # published by _on_connect
            try:
                await self.transport.publish(
                    self.roles_topic, self.snapshot(), qos=1, retain=True, timeout=30
                )
            except NotConnectedError:
                continue

    def _set(self, record: RoleRecord, state: RoleState, reason: str | None = None) -> None:
        record.state = state
        if reason is not None:
            record.reason = reason
        record.since = time.time()
        self.records[record.key] = record
        self._dirty.set()
        if state != "refused" and self._progress_topics.get(record.job) is not None:
            ended: dict[str, str] = {"state": state} if state != "running" else {}
            if state != "running" and record.reason:
                ended["reason"] = record.reason
            if ended:
                self._report_progress(
                    self._progress_topics[record.job], record.job, record.role, ended
                )
        log.info(
            "role_state",
            job=record.job,
            role=record.role,
            state=state,
            reason=record.reason,
            bundle=record.bundle[:12],
        )

    # the inbox ---------------------------------------------------------------------------------
    async def _serve_inbox(self, inbox: Subscription) -> None:
        async for message in inbox:
            try:
                await self.handle(message.payload)
            except Exception:  # a bug here must not end the inbox
                log.exception("inbox_handler_failed", topic=message.topic)

    async def handle(self, payload: bytes | bytearray | memoryview) -> None:
        """Validate and apply one inbox command; log (and drop) anything invalid."""
        try:
            command = decode_message(payload, expect=(AssignRole, CancelRole, Ping))
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("inbox_rejected", reason=str(exc), bytes=memoryview(payload).nbytes)
            return
        if command.id in self._seen:
            log.info(
                "inbox_duplicate", type=command.TYPE, id=command.id, reason="id already handled"
            )
            return
        self._seen[command.id] = None
        while len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        self.handled += 1
        if isinstance(command, Ping):
            self._answer(command)
        elif isinstance(command, AssignRole):
            await self._assign(command)
        elif isinstance(command, CancelRole):
            await self._cancel(command)

    def _answer(self, ping: Ping) -> None:
        if not ping.reply_to:
            log.info("ping", id=ping.id)
            return
        head = self.topics.rpc_replies("x")[:-1]
        client = ping.reply_to[len(head) :] if ping.reply_to.startswith(head) else ""
        try:
            check_segment(client, "reply_to")
        except ValueError:
            # Pongs go to RPC reply topics only: a ping must not make the agent write elsewhere.
            self.rejected += 1
            log.warning(
                "ping_rejected", reason=f"reply_to {ping.reply_to[:200]!r} is not a reply topic"
            )
            return
        pong = Pong(ping_id=ping.id, agent=self.agent_id).to_msgpack()
        self._spawn(self._reply(ping.reply_to, pong), "pong")

    async def _reply(self, topic: str, payload: bytes) -> None:
        try:
            await self.transport.publish(topic, payload, qos=1, timeout=30)
        except (NotConnectedError, ValueError) as exc:
            log.warning("pong_failed", topic=topic, error=str(exc))

    async def _assign(self, command: AssignRole) -> None:
        key = f"{command.job}/{command.role}"
        existing = self.records.get(key)
        bundle, digest, refusal = await asyncio.to_thread(self._verify, command.bundle)
        if bundle is None:
            self._refuse(command, existing, digest, refusal)
            return
        if (
            existing is not None
            and existing.bundle == digest
            and existing.state in ("running", "finished")
        ):
            log.info("assign_duplicate", job=command.job, role=command.role, state=existing.state)
            return
        reason = self._check_fit(command, bundle)
        if reason:
            self._refuse(command, existing, digest, reason)
            return
        if existing is not None and existing.task is not None and not existing.task.done():
            await self._stop_task(existing, f"replaced by bundle {digest[:12]}")
        if self._stopping:
            return
        await self._start(command, bundle, digest)

    def _verify(self, data: bytes) -> tuple[RoleBundle | None, str, str]:
        """``(bundle, digest, "")`` or ``(None, digest or "", reason)``. Runs in a worker thread:
        hashing and checking the signature of a large bundle takes a while."""
        from agent.protocol.bundle import SignedBundle, verify_bundle

        try:
            digest = SignedBundle.from_bytes(data).digest
        except ValueError as exc:  # BundleRejected is a ValueError
            return None, "", str(exc)
        try:
            bundle = verify_bundle(data, self._trusted_keys(), allow_code=self.allow_code)
        except ValueError as exc:
            return None, digest, str(exc)
        return bundle, digest, ""

    def _trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        if self._trusted is None:
            from agent.protocol.bundle import key_id, public_key_from_text

            keys = [public_key_from_text(text) for text in self.trusted_keys]
            self._trusted = {key_id(k): k for k in keys}
        return self._trusted

    def _role_classes(self) -> Mapping[str, type[Role]]:
        if self._role_types is None:
            from agent.roles import ROLE_TYPES

            return ROLE_TYPES
        return self._role_types

    def _check_fit(self, command: AssignRole, bundle: RoleBundle) -> str:
        if (bundle.job, bundle.role) != (command.job, command.role):
            return (
                f"bundle is for {bundle.job}/{bundle.role}, "
                f"but the command assigns {command.job}/{command.role}"
            )
        classes = self._role_classes()
        if bundle.role not in classes:
            have = ", ".join(sorted(classes)) or "none"
            return f"role {bundle.role!r} is not available on this agent (available: {have})"
        wanted = bundle.dataset.get("name")
        if wanted is not None and wanted not in self.datasets:
            have = ", ".join(sorted(self.datasets)) or "none"
            return f"dataset {wanted!r} is not on this agent (datasets: {have})"
        return ""

    def _refuse(
        self, command: AssignRole, existing: RoleRecord | None, digest: str, reason: str
    ) -> None:
        log.warning("role_refused", job=command.job, role=command.role, reason=reason)
        if existing is not None and existing.state == "running":
            existing.reason = f"refused replacement bundle {digest[:12]}: {reason}"
            self._dirty.set()
            return
        record = RoleRecord(command.job, command.role, "refused", digest, time.time(), reason)
        self._set(record, "refused")

    async def _start(self, command: AssignRole, bundle: RoleBundle, digest: str) -> None:
        from agent.roles.base import RoleContext

        role_dir = self.state_dir / "roles" / command.job / command.role
        await asyncio.to_thread(role_dir.mkdir, parents=True, exist_ok=True)
        role_topics = Topics(bundle.prefix)
        context = RoleContext(
            agent_id=self.agent_id,
            bundle=bundle,
            transport=self.transport,
            topics=role_topics,
            state_dir=role_dir,
            datasets=self.datasets,
            run_cpu=self.run_cpu,
            report=functools.partial(self._report, role_topics, command.job, command.role),
            extras=dict(self._role_extras),
            progress=functools.partial(
                self._report_progress, role_topics, command.job, command.role
            ),
        )
        self._progress.setdefault(command.job, {}).pop(command.role, None)
        self._report_progress(role_topics, command.job, command.role, {"state": "starting"})
        record = RoleRecord(command.job, command.role, "running", digest, time.time())
        try:
            role = self._role_classes()[bundle.role](context)
        except Exception as exc:
            log.exception("role_init_failed", job=command.job, role=command.role)
            self._set(record, "failed", f"{type(exc).__name__}: {exc}")
            return
        record.task = asyncio.create_task(self._supervise(record, role), name=f"role-{record.key}")
        self._set(record, "running", "")

    async def _supervise(self, record: RoleRecord, role: Role) -> None:
        try:
            await role.run()
        except asyncio.CancelledError:
            self._set(record, "cancelled", record.reason or "cancelled")
        except Exception as exc:
            log.exception("role_crashed", job=record.job, role=record.role)
            self._set(record, "failed", f"{type(exc).__name__}: {exc}"[:1024])
        else:
            self._set(record, "finished", "")

    async def _cancel(self, command: CancelRole) -> None:
        record = self.records.get(f"{command.job}/{command.role}")
        if record is None or record.task is None or record.task.done():
            log.info(
                "cancel_ignored",
                job=command.job,
                role=command.role,
                reason="not running" if record else "unknown role",
            )
            return
        await self._stop_task(record, command.reason or "cancelled by coordinator")

    async def _stop_task(self, record: RoleRecord, reason: str) -> None:
        assert record.task is not None
        record.reason = reason
        record.task.cancel()
        done, _ = await asyncio.wait([record.task], timeout=CANCEL_GRACE)
        if not done:
            log.warning("role_ignores_cancel", job=record.job, role=record.role)

    # what roles get ----------------------------------------------------------------------------
    async def run_cpu(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread; the event loop stays free."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix="ember-cpu")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self._counted, fn, *args, **kwargs)
        )

    def _counted(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._busy_lock:
            self._busy += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._busy_lock:
                self._busy -= 1

    async def _report(self, topics: Topics, job: str, role: str, event: Mapping[str, Any]) -> None:
        document = {
            "v": 1,
            "agent": self.agent_id,
            "job": job,
            "role": role,
            "ts": round(time.time(), 3),
            **_finite(dict(event)),
        }
        with contextlib.suppress(NotConnectedError):
            await self.transport.publish(
                topics.job_metrics(job, self.agent_id),
                json.dumps(document, separators=(",", ":")),
                qos=0,
            )

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=f"runtime-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such metrics become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value

"""The coordinator keeps the newest weights of every job's global model.

The aggregator publishes each model version on ``jobs/<job>/model/global`` (msgpack, chunked),
and a last one with ``final=True`` when the job ends; trainers' receipts (``update_ack``) travel
on the same topic. :class:`ModelKeeper` follows that topic for every job that is dispatching or
running (from the moment the dispatcher places it, or from a restart of ``ember serve``), keeps
the newest version in memory and persists it in the store as a tensor-codec blob recorded in
the job (:meth:`~coordinator.store.Store.keep_weights`):

* a ``final`` version at once;
* intermediate versions at most once every ``interval`` seconds (a trailing write, so the
  newest version is on disk at most ``interval`` seconds after it arrived): a large model does
  not cost a disk write per version.

When the job ends the topic is followed ``final_grace`` seconds longer, unless the final
version is already stored: the dispatcher may end a job (a stop rule met by a metric event)
moments before the aggregator's final version arrives. Then whatever newer version is pending
is written and the topic is left.

Decoding large payloads and encoding the blob run in threads and the blob is written on the
store's thread: the event loop only moves references. A malformed message is logged and
counted (:class:`KeeperStats`), never fatal. This is a watcher beside the learning road: the
aggregator never waits for the coordinator.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from agent.protocol.codec import encode_tensors
from agent.protocol.errors import ProtocolError
from agent.protocol.limits import DEFAULT_LIMITS, KiB, ProtocolLimits
from agent.protocol.messages import ModelVersion, UpdateAck, decode_message
from agent.protocol.topics import Topics
from agent.tasks import cancel_and_wait, wait_event
from agent.transport import Inbound, Subscription, Transport
from coordinator.store import TERMINAL_PHASES, Store, StoredWeights

log = structlog.get_logger("ember.model_keeper")

DEFAULT_INTERVAL = 30.0
"""Seconds between writes of intermediate versions of one job's model."""
DEFAULT_FINAL_GRACE = 15.0
"""Seconds a job's model topic is still followed after the job ended, for its final version."""
FOLLOWED_PHASES = frozenset({"dispatching", "running"})
"""Job phases in which an aggregator may publish model versions."""
_DECODE_INLINE = 64 * KiB
"""Messages up to this size are decoded on the event loop (a thread costs more)."""
_RETRY = 2.0


@dataclass
class KeeperStats:
    """Counters for logs and tests."""

    messages: int = 0
    versions: int = 0
    acks: int = 0
    stale: int = 0
    invalid: int = 0
    stored: int = 0
    store_failures: int = 0


@dataclass(eq=False)
class _Follower:
    job: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    latest: ModelVersion | None = None
    newest: tuple[int, bool] | None = None
    """(version, final) of the newest version seen or stored."""
    stored: tuple[int, bool] | None = None
    last_write: float = -math.inf
    ended_at: float | None = None
    task: asyncio.Task[None] | None = None

    def pending(self) -> ModelVersion | None:
        latest = self.latest
        if latest is None:
            return None
        if self.stored is not None and (latest.version, latest.final) <= self.stored:
            return None
        return latest


class ModelKeeper:
    """Follows the model topic of every active job and keeps its newest weights in the store."""

    def __init__(
        self,
        *,
        transport: Transport,
        topics: Topics,
        store: Store,
        interval: float = DEFAULT_INTERVAL,
        final_grace: float = DEFAULT_FINAL_GRACE,
        limits: ProtocolLimits = DEFAULT_LIMITS,
    ) -> None:
        if interval < 0 or final_grace < 0:
            raise ValueError("interval and final_grace must be ≥ 0")
        self.transport = transport
        self.topics = topics
        self.store = store
        self.interval = interval
        self.final_grace = final_grace
        self.limits = limits
        self.stats = KeeperStats()
        self._followers: dict[str, _Follower] = {}
        self._stopping = False

    # lifecycle ---------------------------------------------------------------------------------
    def start(self, jobs: Iterable[tuple[str, str]]) -> None:
        """Follow the jobs (id, phase) that are active, e.g. those reloaded after a restart."""
        for job, phase in jobs:
            self.job_changed(job, phase)

    def job_changed(self, job: str, phase: str) -> None:
        """A job's phase (a dispatcher listener): follow active jobs, let ended ones go."""
        if self._stopping:
            return
        follower = self._followers.get(job)
        if phase in FOLLOWED_PHASES:
            if follower is None:
                follower = _Follower(job)
                self._followers[job] = follower
                follower.task = asyncio.create_task(self._run(follower), name=f"keeper-{job}")
                follower.task.add_done_callback(functools.partial(self._forget, follower))
                log.debug("model_followed", job=job)
        elif phase in TERMINAL_PHASES and follower is not None and follower.ended_at is None:
            follower.ended_at = asyncio.get_running_loop().time()
            follower.wake.set()

    def _forget(self, follower: _Follower, _task: object = None) -> None:
        if self._followers.get(follower.job) is follower:
            del self._followers[follower.job]

    @property
    def following(self) -> list[str]:
        return sorted(self._followers)

    async def wait_following(self, job: str, timeout: float = 10.0) -> None:
        """Wait until the job's model topic is subscribed (``LookupError`` if not followed)."""
        follower = self._followers.get(job)
        if follower is None:
            raise LookupError(f"job {job!r} is not followed")
        if not await wait_event(follower.subscribed, timeout):
            raise asyncio.TimeoutError

    async def flush(self, job: str) -> None:
        """Write the job's newest version now if it is newer than the stored one."""
        follower = self._followers.get(job)
        if follower is not None:
            await self._write(follower)

    async def stop(self, timeout: float = 10.0) -> None:
        """Write every pending version, then stop following."""
        self._stopping = True
        followers = list(self._followers.values())
        now = asyncio.get_running_loop().time()
        for follower in followers:
            follower.ended_at = now - self.final_grace  # no grace: flush and leave
            follower.wake.set()
        tasks = [f.task for f in followers if f.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            await cancel_and_wait(late)

    # one job -----------------------------------------------------------------------------------
    async def _run(self, f: _Follower) -> None:
        try:
            await self._follow(f)
        except Exception:
            log.exception("model_follow_failed", job=f.job)

    async def _follow(self, f: _Follower) -> None:
        stored = await self.store.job_weights(f.job)
        if stored is not None:
            f.stored = f.newest = (stored.version, stored.final)
        sub = await self.transport.subscribe(self.topics.job_model(f.job), 1, max_messages=10_000)
        reader = asyncio.create_task(self._read(f, sub), name=f"keeper-read-{f.job}")
        f.subscribed.set()
        try:
            await self._write_loop(f)
        finally:
            await cancel_and_wait([reader])
            await sub.close()
            log.debug("model_unfollowed", job=f.job, stored=f.stored)

    async def _read(self, f: _Follower, sub: Subscription) -> None:
        async for message in sub:
            try:
                self._accept(f, message, await self._decode(message))
            except ProtocolError as exc:
                self.stats.invalid += 1
                log.warning(
                    "model_message_invalid",
                    job=f.job,
                    topic=message.topic,
                    reason=str(exc),
                    invalid_total=self.stats.invalid,
                )
            except Exception:  # never let one message end the job's follower
                self.stats.invalid += 1
                log.exception("model_message_failed", job=f.job, topic=message.topic)

    async def _decode(self, message: Inbound) -> ModelVersion | UpdateAck:
        self.stats.messages += 1
        if memoryview(message.payload).nbytes <= _DECODE_INLINE:
            return self._decode_now(message)
        return await asyncio.to_thread(self._decode_now, message)

    def _decode_now(self, message: Inbound) -> ModelVersion | UpdateAck:
        decoded = decode_message(
            message.payload, expect=(ModelVersion, UpdateAck), limits=self.limits
        )
        assert isinstance(decoded, (ModelVersion, UpdateAck))
        return decoded

    def _accept(self, f: _Follower, message: Inbound, decoded: ModelVersion | UpdateAck) -> None:
        if isinstance(decoded, UpdateAck):
            self.stats.acks += 1
            return
        if decoded.job != f.job:
            raise ProtocolError(f"model_version.job: {decoded.job!r} on the topic of {f.job!r}")
        self.stats.versions += 1
        key = (decoded.version, decoded.final)
        if f.newest is not None and key <= f.newest:
            self.stats.stale += 1  # a re-publication, or older than what is kept
            return
        f.latest, f.newest = decoded, key
        f.wake.set()
        log.debug("model_version_seen", job=f.job, version=decoded.version, final=decoded.final)

    async def _write_loop(self, f: _Follower) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            pending = f.pending()
            ended = f.ended_at is not None
            if ended and (
                (f.stored is not None and f.stored[1])
                or now >= (f.ended_at or now) + self.final_grace
            ):
                if pending is not None:
                    await self._write(f)
                return
            timeout: float | None = None
            if pending is not None:
                due = f.last_write + self.interval
                if pending.final or now >= due:
                    if not await self._write(f):
                        await asyncio.sleep(_RETRY)
                    continue
                timeout = due - now
            if ended:
                left = (f.ended_at or now) + self.final_grace - now
                timeout = left if timeout is None else min(timeout, left)
            f.wake.clear()
            await wait_event(f.wake, timeout)

    async def _write(self, f: _Follower) -> bool:
        """Persist the newest version if it is newer than the stored one; False on failure."""
        async with f.lock:
            message = f.pending()
            if message is None:
                return True
            started = time.perf_counter()
            try:
                data = await asyncio.to_thread(encode_tensors, message.tensors)
                kept = await self.store.keep_weights(
                    f.job, message.version, data, final=message.final
                )
            except Exception as exc:
                self.stats.store_failures += 1
                log.error(
                    "model_weights_not_stored",
                    job=f.job,
                    version=message.version,
                    error=str(exc) or type(exc).__name__,
                )
                f.last_write = asyncio.get_running_loop().time()
                return False
            f.last_write = asyncio.get_running_loop().time()
            f.stored = (message.version, message.final)
            if kept is not None:
                self.stats.stored += 1
                log.info(
                    "model_weights_stored",
                    job=f.job,
                    version=message.version,
                    final=message.final,
                    bytes=len(data),
                    digest=kept.digest[:12],
                    seconds=round(time.perf_counter() - started, 3),
                )
            return True

    async def stored(self, job: str) -> StoredWeights | None:
        """The weights kept for ``job`` (after writing a pending newer version)."""
        await self.flush(job)
        return await self.store.job_weights(job)

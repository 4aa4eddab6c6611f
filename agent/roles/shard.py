"""One shard of a sharded FedBuff aggregator: owns a slice of the parameters.

Sharded aggregation (FedBuff, Nguyen et al. 2022, with the server partitioned as a parameter
server is, Li et al. 2014) splits the aggregator into S shards, each in its own process. Shard
``s`` owns slice ``s`` of the :class:`~agent.learning.shards.SlicePlan`; trainers send it only
their slice of every delta, on ``jobs/<job>/shards/<s>/updates/<agent>``, so it receives 1/S of
the bytes. It:

1. validates each part against its slice (names, dtypes, shapes, finite values), writes it
   durably to its part store and only then names it in its :class:`~agent.protocol.ShardHeld`
   report to the assembler (``jobs/<job>/shards/<s>/held``);
2. on the assembler's :class:`~agent.protocol.ShardCommit` for version t+1, folds the committed
   K parts in the committed order into its FedBuff server at version t (the same staleness
   weights on every shard), applies the server optimizer to its slice (every server optimizer
   is coordinate-wise), checkpoints, and publishes its slice of version t+1 on
   ``jobs/<job>/shards/<s>/slice``, which the assembler (:mod:`agent.roles.assembler`) joins;
3. stops on a final commit.

The shard neither evaluates nor acknowledges: the assembler acknowledges an update once every
shard holds it, evaluates the assembled model and applies the stop rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.durable import fsync_directory, write_durably
from agent.learning.aggregation import ModelSpec, Status
from agent.learning.clipping import Rejection
from agent.learning.fedavg import SyncFedAvg
from agent.learning.fedbuff import FedBuffAggregator
from agent.learning.shards import SlicePlan
from agent.protocol import (
    ModelUpdate,
    ModelVersion,
    ProtocolError,
    ShardCommit,
    ShardHeld,
    decode_message,
)
from agent.protocol.codec import TensorMap
from agent.protocol.msgpack_view import Buffer
from agent.roles.aggregator import Aggregator
from agent.roles.base import RoleContext, pump, register_role
from agent.roles.trainer import RoleError
from agent.tasks import cancel_and_wait
from agent.transport import Inbound

log = structlog.get_logger("ember.shard")

REPORT_INTERVAL = 1.0
"""Seconds between two held reports when nothing changed (the assembler's heartbeat)."""
REFUSALS_KEPT = 1024
PART_WORKERS = 4
"""Parts checked and written at once."""
PENDING_PER_TRAINER = 4
"""Parts held per trainer of the job's concurrency, at most: beyond, new parts wait (refused,
not acknowledged, so their trainers send them again)."""


@dataclass(frozen=True, slots=True)
class PendingPart:
    """A held part of a sharded FedBuff update (Nguyen et al. 2022): its update's id, trainer
    and base version, on disk at ``path``."""

    update_id: str
    agent: str
    base_version: int
    path: Path


class PartStore:
    """Held parts of sharded FedBuff updates (Nguyen et al. 2022), one durable file each (the
    received message as it came: tensor codec, never pickle; written as
    :mod:`agent.durable` writes checkpoints), until a commit folds them or they are dropped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.parts: dict[str, PendingPart] = {}

    def write(self, update: ModelUpdate, payload: Buffer) -> PendingPart:
        """Write one part durably (a worker thread may; the caller then adds it to
        :attr:`parts` on its own thread)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{update.id}.msgpack"
        write_durably(path, bytes(payload))
        return PendingPart(update.id, update.agent, update.base_version, path)

    def read(self, update_id: str) -> ModelUpdate:
        part = self.parts[update_id]
        decoded = decode_message(part.path.read_bytes(), expect=ModelUpdate)
        assert isinstance(decoded, ModelUpdate)
        return decoded

    def drop(self, update_ids: list[str]) -> None:
        for update_id in update_ids:
            part = self.parts.pop(update_id, None)
            if part is not None:
                part.path.unlink(missing_ok=True)
        if update_ids and self.directory.exists():
            fsync_directory(self.directory)

    def load(self) -> list[str]:
        """The parts a previous run left (unreadable files are dropped); their ids."""
        for path in sorted(self.directory.glob("*.msgpack")) if self.directory.exists() else []:
            try:
                update = decode_message(path.read_bytes(), expect=ModelUpdate)
            except (OSError, ProtocolError) as exc:
                log.warning("shard_part_unreadable", path=str(path), reason=str(exc))
                path.unlink(missing_ok=True)
                continue
            assert isinstance(update, ModelUpdate)
            self.parts[update.id] = PendingPart(update.id, update.agent, update.base_version, path)
        return list(self.parts)


@register_role
class AggregatorShard(Aggregator):
    """One of S shards of a FedBuff aggregator (Nguyen et al. 2022) owning one slice of the
    parameters (parameter-server partitioning, Li et al. 2014); see the module docstring."""

    kind = "aggregator_shard"

    def __init__(self, ctx: RoleContext) -> None:
        super().__init__(ctx)
        shard = ctx.bundle.config.get("shard")
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
            raise RoleError(f"shard: expected an integer ≥ 0 in the bundle, got {shard!r}")
        if shard >= self.plan.shards:
            raise RoleError(f"shard {shard} of a job with algorithm.shards {self.plan.shards}")
        if self.plan.mode != "async":
            raise RoleError("sharded aggregation runs with algorithm.mode: async")
        self.shard = shard
        self.store = PartStore(ctx.state_dir / "parts")
        self.folded = 0
        """Updates this shard has folded into versions."""
        self._inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        self._held_changed = asyncio.Event()
        """Set when the held parts or the version changed: the reporter sends a report."""
        self._final = False
        self._workers = asyncio.Semaphore(PART_WORKERS)
        self._receiving: set[str] = set()
        """Ids of the parts being checked and written now."""
        self._holding: set[asyncio.Task[None]] = set()
        self._max_pending = PENDING_PER_TRAINER * self.plan.concurrency
        self._last_metrics: dict[str, float] = {}
        """The train metrics the current version's slice went out with."""
        self.refused: dict[str, str] = {}
        """Updates whose part this shard refused (the newest :data:`REFUSALS_KEPT`), id →
        trainer: named in every report, so the assembler acknowledges them and the other shards
        drop their parts."""

    def _make_algorithm(self, initial: TensorMap) -> FedBuffAggregator | SyncFedAvg:
        self.slices = SlicePlan(ModelSpec.of(initial), self.plan.shards)
        return super()._make_algorithm(self.slices.cut(initial, self.shard))

    @property
    def fedbuff(self) -> FedBuffAggregator:
        assert isinstance(self.algo, FedBuffAggregator)
        return self.algo

    def _updates_topic(self, agent: str) -> str:
        return self.ctx.topics.shard_updates(self.ctx.bundle.job, self.shard, agent)

    def _extra_meta(self) -> dict[str, Any]:
        return {"shard": self.shard, "folded": self.folded}

    def _resume_meta(self, meta: Mapping[str, Any]) -> None:
        self.folded = int(meta.get("folded", 0))

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        ctx, job = self.ctx, self.ctx.bundle.job
        await self.prepare()
        left = await ctx.run_cpu(self.store.load)
        folded = [i for i in left if i in self.fedbuff.applied_ids]
        await ctx.run_cpu(self.store.drop, folded)  # folded, then the process died
        updates = await self._subscribe_updates(ctx.topics.all_shard_updates(job, self.shard))
        commits = await ctx.transport.subscribe(ctx.topics.shard_commits(job), max_messages=1024)
        pumps = [
            asyncio.create_task(pump(updates, self._inbox.put_nowait), name=f"{job}-shard-updates"),
            asyncio.create_task(pump(commits, self._inbox.put_nowait), name=f"{job}-shard-commits"),
            asyncio.create_task(self._reporter(), name=f"{job}-shard-reports"),
        ]

        async def announce(_session: int) -> None:
            self._held_changed.set()  # the assembler hears from us again after a reconnect

        ctx.transport.on_connect(announce)
        try:
            self._progress()
            await self._publish_slice({})
            self._held_changed.set()
            await self._loop()
        finally:
            await cancel_and_wait([*pumps, *self._holding])
            await updates.close()
            await commits.close()

    async def _loop(self) -> None:
        commits_topic = self.ctx.topics.shard_commits(self.ctx.bundle.job)
        while not self._final:
            message = await self._inbox.get()
            if message.topic == commits_topic:
                await self._on_commit(message)
            else:
                await self._on_part(message)
        log.info(
            "shard_stopped", job=self.ctx.bundle.job, shard=self.shard, version=self.algo.version
        )

    # -- parts ---------------------------------------------------------------------------------
    async def _on_part(self, message: Inbound) -> None:
        """One trainer's part: checked against this shard's slice, then held durably."""
        update = await self._admit(message, ModelUpdate)
        if update is None:
            return
        assert isinstance(update, ModelUpdate)
        self.trainers.add(update.agent)
        known = update.id in self.store.parts or update.id in self.refused
        if known or update.id in self.fedbuff.applied_ids:
            self._held_changed.set()  # a resend: the assembler may have missed our report
            return
        if update.base_version > self.algo.version:
            reason = f"base version {update.base_version} is ahead of {self.algo.version}"
            await self._refuse_part(message.topic, update, reason, "version")
            return
        if update.id in self._receiving:
            return  # a resend of a part being checked and written now
        if len(self.store.parts) + len(self._receiving) >= self._max_pending:
            log.warning("shard_part_deferred", job=update.job, shard=self.shard, update=update.id)
            return  # not held, so not acknowledged: its trainer sends it again
        # Checking and writing a part take a few tens of milliseconds in worker threads: parts
        # that arrive together (the broker interleaves their chunks) are taken side by side.
        await self._workers.acquire()
        self._receiving.add(update.id)
        task = asyncio.create_task(self._hold(message.topic, update, message.payload))
        self._holding.add(task)
        task.add_done_callback(self._holding.discard)

    async def _hold(self, topic: str, update: ModelUpdate, payload: Buffer) -> None:
        try:
            verdict = await self.ctx.run_cpu(self.algo.spec.examine, update.tensors)
            if isinstance(verdict, Rejection):
                await self._refuse_part(topic, update, verdict.reason, verdict.code)
                return
            part = await self.ctx.run_cpu(self.store.write, update, payload)
            self.store.parts[update.id] = part
            self._held_changed.set()
        except Exception:  # not held, so not acknowledged: its trainer sends it again
            log.exception("shard_part_failed", job=update.job, shard=self.shard, update=update.id)
        finally:
            self._receiving.discard(update.id)
            self._workers.release()

    async def _refuse_part(self, topic: str, update: ModelUpdate, reason: str, code: str) -> None:
        """A well-formed message whose part cannot be aggregated: refused, and named in the
        reports so the update is acknowledged (its trainer goes on) and dropped everywhere."""
        await self._refuse(topic, f"{update.id}: {reason}", code)
        self.refused[update.id] = update.agent
        for old in list(self.refused)[:-REFUSALS_KEPT]:
            del self.refused[old]
        self._held_changed.set()

    async def _reporter(self) -> None:
        """Held reports, apart from the loop: a report's PUBACK waits behind the parts the
        broker is sending this shard on the same connection, and the parts must not wait for
        it. Changes during a send make one more report; without any, one a second."""
        while True:
            # asyncio.wait, not wait_for: Python 3.10/3.11's wait_for can swallow a cancellation
            # that arrives as the event is set (agent.roles.delivery).
            waiter = asyncio.ensure_future(self._held_changed.wait())
            try:
                await asyncio.wait({waiter}, timeout=REPORT_INTERVAL)
            finally:
                waiter.cancel()
            self._held_changed.clear()
            await self._report()

    async def _report(self) -> None:
        parts = list(self.store.parts.values())
        held = ShardHeld(
            job=self.ctx.bundle.job,
            shard=self.shard,
            version=self.algo.version,
            agents={p.update_id: p.agent for p in parts},
            bases={p.update_id: p.base_version for p in parts},
            refused=dict(self.refused),
        )
        await self.ctx.publish(
            self.ctx.topics.shard_held(self.ctx.bundle.job, self.shard), held.to_msgpack()
        )

    # -- commits -------------------------------------------------------------------------------
    async def _on_commit(self, message: Inbound) -> None:
        try:
            commit = decode_message(message.payload, expect=ShardCommit)
        except ProtocolError as exc:
            log.warning("shard_commit_rejected", topic=message.topic, reason=str(exc))
            return
        assert isinstance(commit, ShardCommit)
        if commit.job != self.ctx.bundle.job:
            log.warning("shard_commit_rejected", topic=message.topic, reason="another job")
            return
        if commit.final:
            self._final = True
            return
        version = self.algo.version
        if commit.version == version and commit.slices:
            await self._publish_slice(self._last_metrics)
            return
        if commit.version != version + 1:
            # Already folded (a resend), or one was missed: the report says where we are and
            # the assembler sends the next commit again.
            self._held_changed.set()
            return
        missing = [i for i in commit.ids if i not in self.store.parts]
        if missing:
            log.error(
                "shard_commit_unfoldable", shard=self.shard, version=commit.version, missing=missing
            )
            self._held_changed.set()
            return
        metrics = await self.ctx.run_cpu(self._fold, commit)
        if metrics is None:
            return
        self._progress()
        await self._checkpoint()
        gone = list(commit.ids) + list(commit.dropped) + self._too_stale()
        await self.ctx.run_cpu(self.store.drop, gone)
        await self._publish_slice(metrics)
        self._held_changed.set()
        log.info("shard_version", job=commit.job, shard=self.shard, version=self.algo.version)

    def _fold(self, commit: ShardCommit) -> dict[str, float] | None:
        """Offer the committed parts, in order, to the FedBuff server at version t: the last
        one makes version t+1 (K = the commit's size). The mean train metrics, or ``None``."""
        fedbuff = self.fedbuff
        for update_id in commit.ids:
            update = self.store.read(update_id)
            outcome = fedbuff.offer(
                update.id, update.base_version, update.tensors, update.num_samples, update.metrics
            )
            if outcome.status is not Status.APPLIED:
                # Cannot happen when every shard held the part (the assembler drops what FedBuff
                # would find too stale); if it does, this shard's slice is wrong: say so loudly.
                log.error(
                    "shard_fold_refused",
                    shard=self.shard,
                    update=update_id,
                    status=outcome.status.value,
                    reason=outcome.reason,
                )
            if outcome.version is not None:
                self.folded += len(commit.ids)
                return dict(outcome.metrics)
        log.error("shard_fold_short", shard=self.shard, version=commit.version)
        return None

    def _too_stale(self) -> list[str]:
        fedbuff = self.fedbuff
        return [
            p.update_id
            for p in self.store.parts.values()
            if fedbuff.staleness.too_stale(fedbuff.version - p.base_version)
        ]

    async def _publish_slice(self, metrics: Mapping[str, float]) -> None:
        self._last_metrics = dict(metrics)
        message = ModelVersion(
            job=self.ctx.bundle.job,
            version=self.algo.version,
            tensors=dict(self.algo.weights),
            metrics=dict(metrics),
        )
        payload = await self.ctx.run_cpu(message.to_msgpack)
        await self.ctx.publish(
            self.ctx.topics.shard_slice(self.ctx.bundle.job, self.shard), payload
        )

    def _progress(self) -> None:
        self.ctx.progress(
            {
                "state": "aggregating",
                "mode": "async",
                "shard": self.shard,
                "model_version": self.algo.version,
                "held": len(self.store.parts),
                "folded": self.folded,
            }
        )

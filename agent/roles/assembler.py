"""The assembler of a sharded FedBuff aggregator: membership, receipts and whole versions.

Sharded aggregation (FedBuff, Nguyen et al. 2022, over S shards each owning a slice of the
parameters: :mod:`agent.roles.shard`) needs one small step that sees all shards. This role is
that step, on the coordinator's side (``ember serve``'s embedded agent, or any agent):

* it reads every shard's :class:`~agent.protocol.ShardHeld` report into a
  :class:`~agent.learning.shard_commit.CommitLedger`, acknowledges an update to its trainer
  (:class:`~agent.protocol.UpdateAck` on the job's model topic, as an unsharded aggregator does)
  once every shard holds it, and commits each version's K update ids
  (:class:`~agent.protocol.ShardCommit`) so every shard folds the same ones;
* it joins the shards' slices of each version into an ordinary
  :class:`~agent.protocol.ModelVersion` on the job's model topic, so trainers receive models as
  from any aggregator; it evaluates them, checkpoints, applies the stop rules and answers model
  requests: all of it the :class:`~agent.roles.aggregator.Aggregator`'s own code, run on an
  :class:`~agent.learning.assembly.AssembledFedBuff` model;
* a final version ends the job, and a final commit stops the shards.

It receives no update data: S small reports per held part and S slices per version.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog

from agent.durable import write_durably
from agent.learning.aggregation import ModelSpec
from agent.learning.assembly import AssembledFedBuff
from agent.learning.fedavg import SyncFedAvg
from agent.learning.fedbuff import FedBuffAggregator
from agent.learning.shard_commit import Commit, CommitLedger, Held
from agent.learning.shards import SlicePlan
from agent.learning.staleness import make_staleness
from agent.protocol import (
    ModelUpdate,
    ModelVersion,
    ProtocolError,
    ShardCommit,
    ShardHeld,
    decode_message,
)
from agent.protocol.codec import TensorMap
from agent.roles.aggregator import Aggregator
from agent.roles.base import RoleContext, pump, register_role
from agent.roles.trainer import RoleError
from agent.tasks import cancel_and_wait, queue_get
from agent.transport import Inbound

log = structlog.get_logger("ember.assembler")

RESEND_INTERVAL = 1.0
"""Seconds before a commit a shard has not folded is sent to it again."""


@register_role
class ShardAssembler(Aggregator):
    """Commits, receipts and whole model versions for a sharded FedBuff aggregator (Nguyen et
    al. 2022); see the module docstring."""

    kind = "shard_assembler"

    def __init__(self, ctx: RoleContext) -> None:
        super().__init__(ctx)
        if self.plan.mode != "async":
            raise RoleError("sharded aggregation runs with algorithm.mode: async")
        self.ledger = CommitLedger(
            self.plan.shards,
            self.plan.buffer_size,
            staleness=make_staleness(
                self.plan.staleness_weight, max_staleness=self.plan.staleness_max
            ),
        )
        self._slices: dict[int, dict[int, ModelVersion]] = {}
        """Slices of versions not assembled yet: version → shard → slice."""
        self.commit_log = ctx.state_dir / "commits.json"
        """The recent commits, written before each is sent (a restart must not commit a
        version number twice)."""
        self._inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        self._resent: dict[int, tuple[int, float]] = {}
        """Per shard: the commit last sent again and when (monotonic)."""

    def _make_algorithm(self, initial: TensorMap) -> FedBuffAggregator | SyncFedAvg:
        self.slices = SlicePlan(ModelSpec.of(initial), self.plan.shards)
        return AssembledFedBuff(initial, buffer_size=self.plan.buffer_size)

    @property
    def assembled(self) -> AssembledFedBuff:
        assert isinstance(self.algo, AssembledFedBuff)
        return self.algo

    async def prepare(self) -> bool:
        """The aggregator's resume, and the commits sent before a restart: shards may have
        folded versions this assembler had not assembled yet."""
        resumed = await super().prepare()
        commits = await self.ctx.run_cpu(self._load_commits)
        self.ledger.resume(max([self.algo.version, *commits]), commits)
        return resumed

    def _load_commits(self) -> dict[int, list[str]]:
        if not self.commit_log.exists():
            return {}
        return {int(k): list(v) for k, v in json.loads(self.commit_log.read_text()).items()}

    def _save_commits(self) -> None:
        commits = {str(k): v for k, v in self.ledger.recent_commits().items()}
        write_durably(self.commit_log, json.dumps(commits).encode())

    # -- the loop (Aggregator.run subscribes the trainers' requests and calls this) ------------
    async def _serve(self, updates: Any) -> None:
        ctx, job = self.ctx, self.ctx.bundle.job
        model_bytes = sum(int(t.nbytes) for t in self.algo.weights.values())
        held = await ctx.transport.subscribe(ctx.topics.all_shard_held(job), max_messages=100_000)
        slices = await ctx.transport.subscribe(
            ctx.topics.all_shard_slices(job),
            max_messages=1024,
            max_bytes=max(ctx.transport.config.queue_bytes, 4 * model_bytes),
        )
        pumps = [
            asyncio.create_task(pump(sub, self._inbox.put_nowait), name=f"{job}-assembler-{i}")
            for i, sub in enumerate((updates, held, slices))
        ]
        try:
            last = self.ledger.recent_commits().get(self.ledger.version)
            if last is not None:
                # After a restart: a shard that missed the last commit folds it, and every shard
                # at it publishes its slice again, so this assembler can catch up.
                await self._send_commit(
                    ShardCommit(job=job, version=self.ledger.version, ids=last, slices=True)
                )
            await self._loop()
        finally:
            await cancel_and_wait(pumps)
            await held.close()
            await slices.close()

    async def _loop(self) -> None:
        topics, job = self.ctx.topics, self.ctx.bundle.job
        while True:
            stop = self._stop_reason()
            if stop is not None:
                await self._finish(stop)
                await self._send_commit(ShardCommit(job=job, version=self.algo.version, final=True))
                return
            try:
                message = await queue_get(self._inbox, 5.0)
            except asyncio.TimeoutError:
                continue
            shard = topics.shard_of(message.topic)
            if shard is None:
                await self.handle(message)  # a trainer's model request
            elif message.topic == topics.shard_held(job, shard):
                await self._on_held(shard, message)
            elif message.topic == topics.shard_slice(job, shard):
                await self._on_slice(shard, message)
            if self._acks_pending:
                # At once, not when the inbox is empty as an unsharded aggregator batches them
                # (it saves its buffer before receipts; the assembler has nothing to save): with
                # shards reporting all the time the inbox may never be empty, and trainers
                # waiting for receipts send their parts again, which makes more reports.
                await self._send_acks()

    async def _on_update(self, update: ModelUpdate) -> None:
        # A whole delta on the job's updates topic: this job's trainers send slices to shards.
        reason = f"update {update.id} from {update.agent!r}: the job is sharded"
        await self._refuse(self._updates_topic(update.agent), reason, "sharded")

    # -- membership ----------------------------------------------------------------------------
    async def _on_held(self, shard: int, message: Inbound) -> None:
        try:
            report = decode_message(message.payload, expect=ShardHeld)
        except ProtocolError as exc:
            await self._refuse(message.topic, str(exc), "malformed")
            return
        assert isinstance(report, ShardHeld)
        if report.job != self.ctx.bundle.job or report.shard != shard:
            await self._refuse(message.topic, "held report for another job or shard", "sender")
            return
        if shard >= self.plan.shards or report.agents.keys() != report.bases.keys():
            await self._refuse(message.topic, "held report does not fit the job", "malformed")
            return
        self.ledger.report(
            shard,
            report.version,
            (Held(i, report.agents[i], report.bases[i]) for i in report.agents),
            report.refused,
        )
        acks = self.ledger.take_acks()
        if acks:
            self.trainers.update(acks)
            self._acks.update(acks)
            self._acks_pending = True
        now = time.monotonic()
        for behind, commit in self.ledger.behind():
            # A shard that missed a commit (away from the broker) gets it again, once a
            # second at most: a report may only have crossed the commit on its way.
            if self._resent.get(behind, (0, 0.0)) < (commit.version, now - RESEND_INTERVAL):
                self._resent[behind] = (commit.version, now)
                await self._send_commit(self._commit_message(commit))
        while (new := self.ledger.next_commit()) is not None:
            log.info("shard_commit", job=self.ctx.bundle.job, version=new.version)
            await self.ctx.run_cpu(self._save_commits)
            await self._send_commit(self._commit_message(new))

    def _commit_message(self, commit: Commit) -> ShardCommit:
        return ShardCommit(
            job=self.ctx.bundle.job,
            version=commit.version,
            ids=list(commit.ids),
            dropped=list(commit.dropped),
        )

    async def _send_commit(self, commit: ShardCommit) -> None:
        await self.ctx.publish(
            self.ctx.topics.shard_commits(self.ctx.bundle.job), commit.to_msgpack()
        )

    # -- assembly ------------------------------------------------------------------------------
    async def _on_slice(self, shard: int, message: Inbound) -> None:
        try:
            part = decode_message(message.payload, expect=ModelVersion)
        except ProtocolError as exc:
            await self._refuse(message.topic, str(exc), "malformed")
            return
        assert isinstance(part, ModelVersion)
        problem = (
            self.slices.slice_spec(shard).problem(part.tensors)
            if shard < self.plan.shards
            else f"shard {shard} is not one of {self.plan.shards}"
        )
        if part.job != self.ctx.bundle.job or problem is not None:
            await self._refuse(
                message.topic, f"slice of version {part.version}: {problem}", "shape"
            )
            return
        current = self.algo.version
        if part.version <= current:
            return  # a shard's restart or a resend: assembled already
        self._slices.setdefault(part.version, {})[shard] = part
        complete = [v for v, got in self._slices.items() if len(got) == self.plan.shards]
        if not complete:
            return
        # The newest complete version: trainers need no older one (FedBuff trains on the newest).
        version = max(complete)
        commits = self.ledger.recent_commits()
        if any(v not in commits for v in range(current + 1, version + 1)):
            log.error("shard_slices_unexplained", job=part.job, version=version, have=current)
            return
        ids = [i for v in range(current + 1, version + 1) for i in commits[v]]
        got = self._slices[version]
        parts = [got[s].tensors for s in range(self.plan.shards)]
        weights = await self.ctx.run_cpu(self.slices.join, parts)
        await self.ctx.run_cpu(self.assembled.adopt, weights, version, ids)
        self._slices = {v: got for v, got in self._slices.items() if v > version}
        await self._new_version(got[0].metrics)

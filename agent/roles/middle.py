"""The middle aggregator: one group's aggregator in hierarchical FL, seen by the top as a trainer.

Client-edge-cloud hierarchical FL (Liu et al., ICC 2020) with κ2 = 1, Flame's hierarchical
topology: the trainers of a group (the agents sharing a ``group_by`` label value, e.g. one
site behind its own bridged broker) send their deltas to this role on
``jobs/<job>/groups/<group>/updates/<agent>``. It aggregates them with the very machinery of
the top :class:`~agent.roles.aggregator.Aggregator` (FedBuff with the topology's own K, or a
synchronous FedAvg round), except that its update rule is :class:`~agent.learning.hierarchy.
Forward`: where the top would publish a new model version, the middle sends the mean delta
upstream as one :class:`~agent.protocol.ModelUpdate` from its agent, with the group's sample
count and the global version it was aggregated at, spooled and resent until the top
acknowledges it (:class:`~agent.roles.delivery.Delivery`).

Global versions are relayed, not read by the trainers from the top: the middle takes every
version from ``jobs/<job>/model`` and republishes it on ``jobs/<job>/groups/<group>/model``
naming its own round's participants (sync) and with its own receipts. The group's trainers
therefore need only their group's topics, which is what a site broker bridged to the central
one must carry (the bridge carries ``jobs/+/model/#`` in and ``jobs/+/updates/#`` out for the
middle; the group's topics stay at the site).

In a hybrid job (Flame's hybrid topology) the group's trainers average among themselves by ring
all-reduce (:mod:`agent.learning.ring`): the middle, on the group leader's agent, names each
ring's members in the version it relays and forwards the ring's single result upstream (K = 1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import structlog

from agent.learning.clipping import norm_guards
from agent.learning.fedavg import SyncFedAvg
from agent.learning.fedbuff import FedBuffAggregator
from agent.learning.hierarchy import Forward, Topology, TopologyError
from agent.learning.staleness import make_staleness
from agent.protocol import (
    ModelRequest,
    ModelUpdate,
    ModelVersion,
    ProtocolError,
    UpdateAck,
    decode_message,
)
from agent.protocol.codec import TensorMap
from agent.roles.aggregator import Aggregator
from agent.roles.base import RoleContext, pump, register_role
from agent.roles.delivery import Delivery
from agent.roles.trainer import MODEL_REQUEST_INTERVAL, RoleError
from agent.tasks import cancel_and_wait, queue_get
from agent.transport import Inbound, Subscription

log = structlog.get_logger("ember.middle")


@register_role
class MiddleAggregator(Aggregator):
    """A group's aggregator (Liu et al. 2020, κ2 = 1): aggregates its trainers' deltas and
    sends the mean upstream as one trainer would; relays global versions to the group."""

    kind = "middle_aggregator"

    def __init__(self, ctx: RoleContext) -> None:
        super().__init__(ctx)
        self.topology = Topology.from_config(ctx.bundle.config)
        if not self.topology.grouped:
            raise RoleError("a middle aggregator needs a hierarchical or hybrid topology")
        try:
            self.group = self.topology.group_of(ctx.extras.get("labels", {}))
        except TopologyError as exc:
            raise RoleError(str(exc)) from None
        self.hybrid = self.topology.kind == "hybrid"
        # One update in flight upstream, as a trainer: the next group delta waits for the
        # top's receipt (and the group's trainers for ours), so a slow link to the top
        # cannot queue up deltas that would arrive too stale to count.
        self.delivery = Delivery.for_role(ctx, max_updates=1)
        self.forward = Forward()
        self.sent_upstream = 0
        self._global: ModelVersion | None = None
        self._relayed: ModelVersion | None = None
        """The last version relayed to the group (republished as it is on requests)."""
        self._final = False
        self._batch_samples = 0
        """Samples behind the deltas aggregated since the last upstream update."""
        self._round_done = -1
        """Sync: the global version this middle already sent its round's delta for."""
        self._ring_started = 0.0
        self._heard: dict[str, float] = {}
        """Hybrid: when each member last sent a request or an update."""
        self._absent: set[str] = set()
        """Hybrid: members silent through a ring that timed out, left out until heard again."""
        self._failed_ring = ""
        self._inbox: asyncio.Queue[Inbound | ModelVersion] = asyncio.Queue()
        self._arriving = 0
        """Samples of the update being offered (taken by the batch it completes)."""

    # -- the algorithm: the top's, with the Forward rule ----------------------------------------
    def _make_algorithm(self, initial: TensorMap) -> FedBuffAggregator | SyncFedAvg:
        plan = self.plan
        guards = norm_guards(max_norm=plan.max_norm, clip_norm=plan.clip_norm)
        if plan.mode == "sync" and not self.hybrid:
            return SyncFedAvg(initial, optimizer=self.forward, weighting="samples", guards=guards)
        return FedBuffAggregator(
            initial,
            # A hybrid group's ring delivers one already averaged update per ring.
            buffer_size=1 if self.hybrid else self.topology.buffer_size,
            optimizer=self.forward,
            staleness=make_staleness(plan.staleness_weight, max_staleness=plan.staleness_max),
            guards=guards,
        )

    def _updates_topic(self, agent: str) -> str:
        return self.ctx.topics.group_updates(self.ctx.bundle.job, self.group, agent)

    def _model_topic(self) -> str:
        return self.ctx.topics.group_model(self.ctx.bundle.job, self.group)

    def _upstream_topic(self) -> str:
        return self.ctx.topics.job_updates(self.ctx.bundle.job, self.ctx.agent_id)

    def _extra_meta(self) -> dict[str, Any]:
        return {
            "batch_samples": self._batch_samples,
            "round_done": self._round_done,
            "sent_upstream": self.sent_upstream,
        }

    def _resume_meta(self, meta: Mapping[str, Any]) -> None:
        self._batch_samples = int(meta.get("batch_samples", 0))
        self._round_done = int(meta.get("round_done", -1))
        self.sent_upstream = int(meta.get("sent_upstream", 0))

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        ctx, job = self.ctx, self.ctx.bundle.job
        await self.prepare()
        updates = await ctx.transport.subscribe(
            ctx.topics.all_group_updates(job, self.group), max_messages=100_000
        )
        models = await ctx.transport.subscribe(ctx.topics.job_model(job), max_messages=64)
        pumps = [
            asyncio.create_task(pump(updates, self._inbox.put_nowait), name=f"{job}-group-updates"),
            asyncio.create_task(self._pump_models(models), name=f"{job}-global-models"),
        ]
        try:
            left, _ = await self.delivery.start()
            if left:
                log.info("upstream_updates_resent", job=job, group=self.group, updates=left)
            self._progress()
            await self._request_global()
            await self._loop()
        finally:
            if self._final:
                await self.delivery.discard_all("the job ended")
            await self.delivery.close()
            await cancel_and_wait(pumps)
            await updates.close()
            await models.close()

    async def _pump_models(self, sub: Subscription) -> None:
        """Global versions into the loop; upstream receipts straight to the delivery, so they
        never wait behind the group's work (the delivery may be waiting for one)."""
        job, me = self.ctx.bundle.job, self.ctx.agent_id
        async for message in sub:
            try:
                decoded = decode_message(message.payload, expect=(ModelVersion, UpdateAck))
            except ProtocolError as exc:
                log.warning("global_model_rejected", topic=message.topic, reason=str(exc))
                continue
            assert isinstance(decoded, ModelVersion | UpdateAck)
            if decoded.job != job:
                log.warning("global_model_rejected", topic=message.topic, reason="another job")
            elif isinstance(decoded, UpdateAck):
                if me in decoded.acks:
                    self.delivery.acknowledged(decoded.acks[me])
            else:
                if decoded.final:
                    self._final = True  # also ends a wait for room upstream
                    self.delivery.pulse()
                self._inbox.put_nowait(decoded)

    async def _loop(self) -> None:
        last_request = time.monotonic()
        while not self._final:
            try:
                message = await queue_get(self._inbox, self._wait_budget())
            except asyncio.TimeoutError:
                await self._on_timer()
                if (
                    self._wants_global()
                    and time.monotonic() - last_request > MODEL_REQUEST_INTERVAL
                ):
                    last_request = time.monotonic()
                    await self._request_global()
                continue
            if isinstance(message, Inbound):
                await self.handle(message)
            else:
                await self._on_global(message)
            if self._acks_pending and self._inbox.empty():
                await self._send_acks()
        await self._finish("the job's final version")

    def _wait_budget(self) -> float:
        return min(super()._wait_budget(), MODEL_REQUEST_INTERVAL / 2)

    def _wants_global(self) -> bool:
        """Ask the top for its version: none yet, or (sync) between its rounds."""
        latest = self._global
        return latest is None or (self.plan.mode == "sync" and not latest.participants)

    async def _request_global(self) -> None:
        have = -1 if self._global is None else self._global.version
        request = ModelRequest(job=self.ctx.bundle.job, agent=self.ctx.agent_id, have_version=have)
        await self.ctx.publish(self._upstream_topic(), request.to_msgpack())

    # -- global versions -----------------------------------------------------------------------
    async def _on_global(self, decoded: ModelVersion) -> None:
        problem = self.algo.spec.problem(decoded.tensors)
        if problem is not None:
            log.warning("global_model_rejected", version=decoded.version, reason=problem)
            return
        self.delivery.model_arrived()
        previous = self._global
        if previous is not None and decoded.version < previous.version and not decoded.final:
            return
        self._global = decoded
        if decoded.final:
            self._final = True
            return
        new = previous is None or decoded.version != previous.version
        if new:
            await self.ctx.run_cpu(self.algo.follow, decoded.tensors, decoded.version)
            self._progress()
        opened = await self._open_round_if_ready()
        if opened or (new and not (self.hybrid and not self._ring_idle())):
            await self._publish(new_ring=self.hybrid)

    # -- rounds and rings ----------------------------------------------------------------------
    async def _open_round_if_ready(self, publish: bool = False) -> bool:
        """Sync: open this group's round on the global version once the top's round names
        this middle and it knows a trainer of its group."""
        latest, algo = self._global, self.algo
        if not isinstance(algo, SyncFedAvg) or algo.current_round is not None or latest is None:
            return False
        if self.ctx.agent_id not in latest.participants or self._round_done >= latest.version:
            return False
        if not self.trainers:
            return False
        count = min(self.plan.clients_per_round or len(self.trainers), len(self.trainers))
        algo.start_round(self.selector.select(sorted(self.trainers), count))
        self._round_opened = time.monotonic()
        self._progress()
        if publish:
            await self._publish()
        return True

    async def _on_request(self, request: ModelRequest) -> None:
        self._hear(request.agent)
        await super()._on_request(request)
        if self.hybrid and self._ring_idle():
            await self._publish(new_ring=True)  # a ring for the members known now

    def _hear(self, agent: str) -> None:
        self._heard[agent] = time.monotonic()
        self._absent.discard(agent)

    def _ring_idle(self) -> bool:
        """Hybrid: no ring is under way (none started, or the last one timed out)."""
        relayed = self._relayed
        if relayed is None or not relayed.participants:
            return True
        if time.monotonic() - self._ring_started < self.plan.round_timeout:
            return False
        if self._failed_ring != relayed.id:
            # Members not heard from since the ring began are left out of the next rings
            # until they ask for a version again (a live member of a stalled ring does so
            # once it gives the ring up).
            self._failed_ring = relayed.id
            started = self._ring_started
            silent = {m for m in relayed.participants if self._heard.get(m, 0.0) < started}
            self._absent |= silent
            log.info(
                "ring_timed_out",
                job=self.ctx.bundle.job,
                group=self.group,
                absent=sorted(self._absent),
            )
        return True

    def _ring_members(self) -> list[str]:
        """The next ring, in order: every known member not absent, this agent's first."""
        me = self.ctx.agent_id
        return sorted(self.trainers - self._absent, key=lambda agent: (agent != me, agent))

    async def _on_timer(self) -> None:
        await super()._on_timer()
        if self.hybrid and self._ring_members() and self._global is not None and self._ring_idle():
            await self._publish(new_ring=True)

    # -- "a new version" is "send an update upstream" ------------------------------------------
    async def _new_version(self, train_metrics: Mapping[str, float]) -> None:
        delta = self.forward.take()
        base = self.algo.version - 1  # the global version this batch was aggregated at
        samples = self._batch_samples + self._arriving
        self._batch_samples = self._arriving = 0
        if isinstance(self.algo, SyncFedAvg):
            self._round_done = base
        latest = self._global
        if latest is not None:
            await self.ctx.run_cpu(self.algo.follow, latest.tensors, latest.version)
        if delta is not None and samples > 0:
            update = ModelUpdate(
                job=self.ctx.bundle.job,
                agent=self.ctx.agent_id,
                base_version=base,
                num_samples=samples,
                tensors=delta,
                metrics={k: float(v) for k, v in train_metrics.items()},
            )
            payload = await self.ctx.run_cpu(update.to_msgpack)
            await self._checkpoint()
            spool = self.delivery.spool
            await self.delivery.wait(lambda: spool.has_room(len(payload)) or self._final, None)
            if self._final:
                return  # the job is over: nobody upstream applies it any more
            await self.delivery.put(update.id, self._upstream_topic(), payload, base)
            self.sent_upstream += 1
            await self.ctx.report(
                {
                    "event": "group_update",
                    "group": self.group,
                    "base_version": base,
                    "samples": samples,
                    "sent": self.sent_upstream,
                    **({"train_loss": train_metrics["loss"]} if "loss" in train_metrics else {}),
                }
            )
            log.info("group_update_sent", job=update.job, group=self.group, base=base)
        else:
            await self._checkpoint()
        self._progress()
        await self._publish(new_ring=self.hybrid)

    async def _on_update(self, update: ModelUpdate) -> None:
        self._hear(update.agent)
        applied = self.algo.counters.applied
        self._arriving = update.num_samples
        try:
            await super()._on_update(update)
        finally:
            arriving, self._arriving = self._arriving, 0
        if self.algo.counters.applied > applied:
            self._batch_samples += arriving  # 0 when its batch was sent already

    # -- relaying ------------------------------------------------------------------------------
    async def _publish(self, final: bool = False, new_ring: bool = False) -> None:
        """Relay the newest global version to the group, naming the open round's
        participants (sync) or a ring's members (hybrid)."""
        latest = self._global
        if latest is None:
            return
        relayed = self._relayed
        ending = final or latest.final
        # A ring under way keeps its message (its id names the ring) until it ends; else the
        # message changes when the global version or the round's participants do.
        keep = self.hybrid or self._unchanged(relayed)
        if relayed is None or ending or new_ring or not keep:
            participants: list[str] = []
            if isinstance(self.algo, SyncFedAvg) and self.algo.current_round is not None:
                participants = sorted(self.algo.current_round.participants)
            elif self.hybrid and not ending:
                # The ring's first member reports its result: this agent's trainer when it
                # is one (its update then stays on this agent's broker connection).
                participants = self._ring_members()
                self._ring_started = time.monotonic()
            relayed = ModelVersion(
                job=latest.job,
                version=latest.version,
                tensors=dict(latest.tensors),
                metrics=dict(latest.metrics),
                participants=participants,
                final=ending,
            )
        assert relayed is not None
        self._relayed = relayed
        payload = await self.ctx.run_cpu(relayed.to_msgpack)
        await self.ctx.publish(self._model_topic(), payload)
        self._last_publish = time.monotonic()

    def _unchanged(self, relayed: ModelVersion | None) -> bool:
        """The last relayed message still says what the group should hear: the newest
        global version, and (sync) the open round's participants."""
        latest = self._global
        current = self.algo.current_round if isinstance(self.algo, SyncFedAvg) else None
        participants = sorted(current.participants) if current is not None else []
        return (
            latest is not None
            and relayed is not None
            and relayed.version == latest.version
            and relayed.participants == participants
        )

    async def _finish(self, reason: str) -> None:
        if self._acks_pending:
            await self._send_acks()
        await self._publish(final=True)
        log.info("group_finished", job=self.ctx.bundle.job, group=self.group, reason=reason)

    def _stop_reason(self) -> str | None:
        return "the job's final version" if self._final else None

    def _progress(self) -> None:
        super()._progress()
        self.ctx.progress(
            {
                "state": "aggregating_group",
                "group": self.group,
                "sent_upstream": self.sent_upstream,
                "global_version": None if self._global is None else self._global.version,
            }
        )

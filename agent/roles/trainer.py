"""The trainer role: local training on data that never leaves the device.

FedBuff's client (Nguyen et al., AISTATS 2022): pull the newest global model version t_i, run
the local SGD steps on the bound dataset, and send Δ = y_Q − y_0 against the model it started
from, with t_i, the local sample count and training metrics. In asynchronous mode it then trains
again from the newest version it has; in synchronous FedAvg rounds (McMahan et al. 2017) it
trains once per version, and only on versions whose round names it. FedProx (Li et al. 2020)
and FedDyn (Acar et al. 2021) change only the local objective, inside the train-step graph;
FedDyn's client state is kept in the role's state directory across restarts. Each update
reports the local steps it ran and the steps the job planned, so an aggregator can tell a
straggler's partial work (``[simulation] partial_work`` plays one) from a full run.

Training runs through ``ctx.run_cpu`` so the agent's event loop keeps answering pings, sending
telemetry and watchdog pings while a step runs. Updates go out through
:class:`~agent.roles.delivery.Delivery`: spooled on disk until the aggregator acknowledges
them, resent after reconnects and restarts; training goes on while the broker is away until the
spool is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import zlib
from pathlib import Path

import numpy as np
import structlog

from agent.learning.aggregation import ModelSpec
from agent.learning.backend import Array, HyperParams, TrainingBackend
from agent.learning.clipping import Rejection
from agent.learning.feddyn import client_state_update, initial_client_state
from agent.learning.hierarchy import Topology, TopologyError
from agent.learning.loader import exported_model, make_backend
from agent.learning.plan import TrainingPlan
from agent.learning.ring import weighted_mean, weighted_vector
from agent.learning.shards import SlicePlan
from agent.protocol import (
    ModelRequest,
    ModelUpdate,
    ModelVersion,
    ProtocolError,
    UpdateAck,
    decode_message,
)
from agent.protocol.codec import TensorMap, decode_tensors, encode_tensors
from agent.roles.base import Role, RoleContext, register_role
from agent.roles.delivery import ACK_TIMEOUT, Delivery
from agent.roles.ring import RingError, RingMember
from agent.tasks import cancel_and_wait, wait_event
from agent.transport import Inbound, Subscription

log = structlog.get_logger("ember.trainer")

MODEL_REQUEST_INTERVAL = 2.0
"""Seconds between requests for the current model while none has arrived."""


class RoleError(RuntimeError):
    """The role cannot run as assigned; the runtime reports the message as the failure reason."""


@register_role
class Trainer(Role):
    """Trains on the bound local dataset and streams deltas (FedBuff client; FedAvg client)."""

    kind = "trainer"

    def __init__(self, ctx: RoleContext) -> None:
        super().__init__(ctx)
        self.plan = TrainingPlan.from_config(ctx.bundle.config)
        self.topology = Topology.from_config(ctx.bundle.config)
        self.ring: RingMember | None = None
        """Hybrid FL: this trainer's side of its group's ring all-reduce."""
        self._ring_done = ""
        """Hybrid FL: the ring (model version message id) this trainer took part in last."""
        self._latest: ModelVersion | None = None
        self._arrived = asyncio.Event()
        self.delivery = Delivery.for_role(ctx)
        self.updates_sent = 0
        self.rejected = 0
        """Messages on the model topic refused (malformed, another job's, wrong shapes)."""
        self.spec: ModelSpec | None = None
        self.slices: SlicePlan | None = None
        """A sharded aggregator's slices: each update goes out as one part per shard."""
        """The job's model: a version whose tensors do not match it is refused."""
        self._arrivals = 0
        self._latest_arrival = 0
        self._sent_arrival = 0
        """Model versions taken so far, the count when the newest came and when the last update
        went out: a FedBuff version naming its next starters counts only if it came later."""

    async def run(self) -> None:
        ctx = self.ctx
        bundle = ctx.bundle
        name = str(bundle.dataset.get("name", ""))
        dataset = ctx.datasets.get(name)
        if dataset is None:
            raise RoleError(f"dataset {name!r} is not on this agent (has {sorted(ctx.datasets)})")
        model = exported_model(bundle)
        self.spec = ModelSpec.of(model.initial_params)
        if self.plan.shards > 1:
            self.slices = SlicePlan(self.spec, self.plan.shards)
        backend: TrainingBackend = await ctx.run_cpu(make_backend, bundle, model)
        x, y = dataset.x, dataset.y
        topic, model_topic = self._channels()
        if self.topology.kind == "hybrid":
            self.ring = RingMember(ctx, self._group())
            await self.ring.start()  # before joining: chunks may come as soon as a ring forms
        models = await ctx.transport.subscribe(model_topic, max_messages=64)
        follower = asyncio.create_task(self._follow(models), name=f"{bundle.job}-models")
        state_path = ctx.state_dir / "feddyn_state.tensors"
        correction = self._load_state(state_path)
        ctx.progress(
            {
                "state": "waiting_model",
                "dataset": name,
                "samples": len(y),
                "updates_sent": 0,
                "model_version": None,
                "last_update": None,
            }
        )
        final = False
        try:
            left, self.updates_sent = await self.delivery.start()
            if left:
                log.info("spooled_updates_resent", job=bundle.job, updates=left)
            await self._request_model(topic, have=-1)
            trained_on = -1
            while True:
                version = await self._next_version(trained_on, topic)
                if version.final:
                    log.info("job_final_version", job=bundle.job, version=version.version)
                    final = True
                    return
                trained_on = version.version
                ctx.progress({"state": "training", "base_version": version.version})
                start = version.tensors
                if self.plan.feddyn_alpha and correction is None:
                    correction = initial_client_state(start)
                began = time.monotonic()
                seed = zlib.crc32(f"{ctx.agent_id}/{version.version}/{self.updates_sent}".encode())
                hyper = self._cut_short(dataclasses.replace(self.plan.client, seed=seed), len(y))
                result = await ctx.run_cpu(
                    backend.train, start, x, y, hyper, anchor=start, correction=correction
                )
                await self._simulate_slow_device(time.monotonic() - began)
                delta = await ctx.run_cpu(_delta, result.params, start)
                if self.plan.feddyn_alpha and correction is not None:
                    correction = client_state_update(
                        correction, result.params, start, alpha=self.plan.feddyn_alpha
                    )
                    await ctx.run_cpu(state_path.write_bytes, encode_tensors(correction))
                metrics = {
                    "loss": result.loss,
                    "steps": float(result.steps),
                    "planned_steps": float(self.plan.client.steps_for(len(y))),
                    "train_seconds": time.monotonic() - began,
                }
                if result.loss_sq_sum is not None and result.samples:
                    # Oort's statistical utility (Lai et al. 2021) from per-sample losses.
                    metrics["loss_sq_sum"] = result.loss_sq_sum
                    metrics["loss_samples"] = float(result.samples)
                samples = len(y)
                if self.ring is not None:
                    pooled = await self._ring_average(version, delta, samples)
                    if pooled is None:  # the leader reports the group's average, or it failed
                        ctx.progress({"state": "waiting_model"})
                        continue
                    delta, samples = pooled
                update = ModelUpdate(
                    job=bundle.job,
                    agent=ctx.agent_id,
                    base_version=version.version,
                    num_samples=samples,
                    tensors=delta,
                    metrics=metrics,
                )
                parts = await ctx.run_cpu(self._parts, update, topic)
                ctx.progress({"state": "sending"})
                await self.delivery.put_parts(update.id, parts, version.version)
                self._sent_arrival = self._arrivals
                self.updates_sent += 1
                ctx.progress(
                    {
                        "state": "waiting_ack",
                        "updates_sent": self.updates_sent,
                        "last_update": {
                            "ts": round(time.time(), 3),
                            "base_version": version.version,
                            "loss": result.loss,
                            "train_seconds": round(update.metrics["train_seconds"], 3),
                        },
                    }
                )
                log.debug("update_spooled", job=bundle.job, base=version.version, loss=result.loss)
                await self._wait_ack(update.id)
                ctx.progress({"state": "waiting_model"})
        finally:
            if final:  # nobody will apply what is left: say so in the ledger, free the disk
                await self.delivery.discard_all("the job ended")
            await self.delivery.close()
            await cancel_and_wait([follower])
            await models.close()
            if self.ring is not None:
                await self.ring.close()

    async def _ring_average(
        self, version: ModelVersion, delta: dict[str, Array], samples: int
    ) -> tuple[dict[str, Array], int] | None:
        """Hybrid FL: average ``delta`` with the ring the version names (weighted by sample
        count, by ring all-reduce); the group's mean and total samples for the ring's leader
        (its first member), ``None`` for the others or when the ring failed."""
        assert self.ring is not None
        self._ring_done = version.id
        members = list(version.participants)
        self.ctx.progress({"state": "ring_allreduce", "ring_members": len(members)})
        vector = await self.ctx.run_cpu(weighted_vector, delta, float(samples))
        ring = asyncio.create_task(
            self.ring.allreduce(version.id, members, vector, timeout=self.plan.round_timeout)
        )
        # A peer that saw the final version first will send nothing more: the ring is over.
        ended = asyncio.create_task(self.delivery.wait(self._job_ended, None))
        try:
            await asyncio.wait((ring, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            left = not ring.done()
            await cancel_and_wait([ring, ended], suppress=(RingError,))
        if left:
            log.info("ring_left", job=self.ctx.bundle.job, ring=version.id, reason="job ended")
            return None
        try:
            total = ring.result()
        except RingError as exc:
            log.warning("ring_failed", job=self.ctx.bundle.job, reason=str(exc))
            # Say at once that this member is alive: the middle keeps it in the next ring
            # rather than leaving it out with the member that failed the ring.
            await self._request_model(self._channels()[0], have=version.version)
            return None
        if members[0] != self.ctx.agent_id:
            return None
        mean, weight = await self.ctx.run_cpu(weighted_mean, total, delta)
        return mean, round(weight)

    def _parts(self, update: ModelUpdate, topic: str) -> list[tuple[str, bytes]]:
        """The messages ``update`` travels as: itself on ``topic``, or for a sharded aggregator
        one per shard on that shard's topic, each with the slice of the delta the shard owns
        (:class:`~agent.learning.shards.SlicePlan`) and the update's id, base and metrics."""
        if self.slices is None:
            return [(topic, update.to_msgpack())]
        ctx = self.ctx
        return [
            (
                ctx.topics.shard_updates(update.job, shard, ctx.agent_id),
                dataclasses.replace(update, tensors=part).to_msgpack(),
            )
            for shard, part in enumerate(self.slices.split(update.tensors))
        ]

    def _cut_short(self, hyper: HyperParams, samples: int) -> HyperParams:
        """``[simulation] partial_work``: stop after a seeded, uniformly random number of steps
        from 1 to one fewer than planned, as the FedProx paper's stragglers (Li et al. 2020)."""
        planned = hyper.steps_for(samples)
        if not self.ctx.extras.get("partial_work") or planned < 2:
            return hyper
        steps = int(np.random.default_rng(hyper.seed).integers(1, planned))
        return dataclasses.replace(hyper, local_steps=steps, local_epochs=None)

    def _channels(self) -> tuple[str, str]:
        """Where this trainer's updates go and its model versions come from: the top
        aggregator's topics, or in a hierarchical or hybrid job its group's middle
        aggregator's (the group is this agent's ``group_by`` label)."""
        ctx, job = self.ctx, self.ctx.bundle.job
        if not self.topology.grouped:
            return ctx.topics.job_updates(job, ctx.agent_id), ctx.topics.job_model(job)
        group = self._group()
        return (
            ctx.topics.group_updates(job, group, ctx.agent_id),
            ctx.topics.group_model(job, group),
        )

    def _group(self) -> str:
        try:
            return self.topology.group_of(self.ctx.extras.get("labels", {}))
        except TopologyError as exc:
            raise RoleError(str(exc)) from None

    async def _simulate_slow_device(self, trained_for: float) -> None:
        """``[simulation]`` in the agent's config: take ``slowdown`` times as long, and at
        least ``min_update_seconds``."""
        slowdown = float(self.ctx.extras.get("slowdown", 1.0))
        at_least = float(self.ctx.extras.get("min_update_seconds", 0.0))
        wait = max((slowdown - 1.0) * trained_for, at_least - trained_for)
        if wait > 0:
            await asyncio.sleep(wait)

    async def _follow(self, models: Subscription) -> None:
        async for message in models:
            self.handle(message)

    def handle(self, message: Inbound) -> None:
        """One message from the job's model topic: keep the newest model version (older ones
        are useless to a trainer) and the aggregator's receipts for this agent's updates.
        Anything malformed, for another job or not shaped like this job's model is logged with
        its reason, counted in :attr:`rejected` and dropped."""
        job, me = self.ctx.bundle.job, self.ctx.agent_id
        try:
            decoded = decode_message(message.payload, expect=(ModelVersion, UpdateAck))
        except ProtocolError as exc:
            self._reject(message.topic, str(exc))
            return
        assert isinstance(decoded, ModelVersion | UpdateAck)
        if decoded.job != job:
            self._reject(message.topic, f"{decoded.TYPE} for job {decoded.job!r}")
            return
        if isinstance(decoded, UpdateAck):
            if me in decoded.acks:
                self.delivery.acknowledged(decoded.acks[me])
            return
        verdict = self.spec.examine(decoded.tensors) if self.spec is not None else None
        if isinstance(verdict, Rejection):
            self._reject(message.topic, f"model_version {decoded.version}: {verdict.reason}")
            return
        self.delivery.model_arrived()
        latest = self._latest
        if latest is not None and latest.final:
            return  # the job is over: a late republish of the same version must not undo that
        # The same version comes again when a synchronous round opens on it (now naming
        # its trainers) or when the aggregator answers a request: take it too.
        if latest is None or decoded.version >= latest.version or decoded.final:
            self._latest = decoded
            self._arrivals += 1
            self._latest_arrival = self._arrivals
            self._arrived.set()
            self.delivery.pulse()
            if latest is None or decoded.version != latest.version:
                self.ctx.progress({"model_version": decoded.version})

    def _reject(self, topic: str, reason: str) -> None:
        self.rejected += 1
        log.warning("model_message_rejected", topic=topic, reason=reason)

    async def _wait_ack(self, update_id: str) -> None:
        """Flow control: train again once the aggregator acknowledged the update (it then
        publishes its newest version) or a final version came; after :data:`ACK_TIMEOUT` train
        on regardless (the update stays spooled and is sent again), so an absent broker or
        aggregator does not stop training until the spool is full."""
        if not await self.delivery.wait(
            lambda: self.delivery.is_acked(update_id) or self._job_ended(),
            ACK_TIMEOUT,
        ):
            log.info("update_not_yet_acknowledged", job=self.ctx.bundle.job, update=update_id)

    def _job_ended(self) -> bool:
        """The job's final version came (:meth:`handle` then wakes :meth:`Delivery.wait`)."""
        return bool(self._latest and self._latest.final)

    async def _next_version(self, trained_on: int, topic: str) -> ModelVersion:
        """The version to train on next: newer than ``trained_on`` in sync mode, and naming
        this agent when the round names participants; any newest in async mode."""
        announced = ""
        while True:
            latest = self._latest
            if latest is not None and (latest.final or self._usable(latest, trained_on)):
                return latest
            # A synchronous aggregator opens a round once it knows enough trainers: a version
            # without a round is the cue to say we are here (once per version, then every 2 s).
            between_rounds = (
                (self.plan.mode == "sync" or self.ring is not None)
                and latest is not None
                and not latest.participants
            )
            cue = self._presence_cue(latest, between_rounds)
            if cue and cue != announced:
                announced = cue
                await self._request_model(topic, have=trained_on)
            self._arrived.clear()
            slow = latest is not None and not between_rounds
            patience = MODEL_REQUEST_INTERVAL * (5 if slow else 1)
            if not await wait_event(self._arrived, patience):
                # Nothing (new) yet: the aggregator may have started after us, restarted, or
                # published while we were away. Asking again costs one small message.
                await self._request_model(topic, have=trained_on)

    def _presence_cue(self, latest: ModelVersion | None, between_rounds: bool) -> str:
        """What in ``latest`` asks this trainer to say it is here ("" for nothing): a version
        between rounds, or (hybrid) a ring that leaves this trainer out. Its group's middle
        leaves out the members it did not hear from through a ring that failed, until they
        ask again; new rings keep coming without them, so waiting for a quiet spell to ask
        could wait for the job's end."""
        if latest is None:
            return ""
        if between_rounds:
            return f"version {latest.version}"
        if self.ring is not None and self.ctx.agent_id not in latest.participants:
            return f"ring {latest.id}"
        return ""

    def _usable(self, version: ModelVersion, trained_on: int) -> bool:
        if self.ring is not None:  # hybrid: once per ring that names this trainer
            return self.ctx.agent_id in version.participants and version.id != self._ring_done
        if self.plan.mode == "async":
            # An aggregator choosing who starts next (Oort) names them; a naming that came
            # before this trainer's last update went out was for the run that update ended.
            return not version.participants or (
                self.ctx.agent_id in version.participants
                and self._latest_arrival > self._sent_arrival
            )
        # A synchronous round names its trainers; a version without names is published while
        # no round is open (too few trainers known yet): nothing to train on.
        return self.ctx.agent_id in version.participants and version.version > trained_on

    async def _request_model(self, topic: str, have: int) -> None:
        """Ask the aggregator to publish its current version (versions are not retained)."""
        request = ModelRequest(job=self.ctx.bundle.job, agent=self.ctx.agent_id, have_version=have)
        await self.ctx.publish(topic, request.to_msgpack())

    def _load_state(self, path: Path) -> TensorMap | None:
        if not self.plan.feddyn_alpha or not path.exists():
            return None
        try:
            return {k: np.array(v) for k, v in decode_tensors(path.read_bytes()).items()}
        except ProtocolError as exc:
            log.warning("feddyn_state_unreadable", path=str(path), reason=str(exc))
            return None


def _delta(new: TensorMap, start: TensorMap) -> dict[str, Array]:
    return {name: np.subtract(new[name], start[name]) for name in start}

"""The aggregator role: turns trainers' deltas into new global model versions.

Asynchronous mode is FedBuff (Nguyen et al., AISTATS 2022): every accepted delta enters a
staleness-weighted buffer and every K of them make a new version through the server optimizer
(FedAvg, FedAvgM, FedAdam, FedYogi, FedAdaGrad; Reddi et al., ICLR 2021). Synchronous mode is
FedAvg rounds (McMahan et al., AISTATS 2017) over sampled trainers with a round timeout, FedDyn's
server correction (Acar et al., ICLR 2021) where the job asks for it.

Each version is evaluated on the held-out dataset bound to this role (if any), checkpointed in
the role's state directory before it is announced (a restarted aggregator resumes from its last
version, its buffer and the ids of every update it applied, so none is applied twice), published
on the job's model topic, and summarised as a JSON event on the job's metrics topic, which the
coordinator folds into the job's state. The stop rules end the job with a final version.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import structlog

from agent.learning.aggregation import Outcome, Status
from agent.learning.backend import EvalResult, TrainingBackend
from agent.learning.clipping import norm_guards
from agent.learning.fedavg import SyncFedAvg
from agent.learning.fedbuff import FedBuffAggregator
from agent.learning.feddyn import FedDynServer
from agent.learning.hierarchy import Topology
from agent.learning.loader import exported_model, make_backend
from agent.learning.optimizers import ServerOptimizer, make_server_optimizer
from agent.learning.plan import TrainingPlan
from agent.learning.selection import OortSelector, RandomSelector, loss_sq_mean
from agent.learning.staleness import make_staleness
from agent.learning.stragglers import StragglerTracker
from agent.protocol import (
    Message,
    ModelRequest,
    ModelUpdate,
    ModelVersion,
    ProtocolError,
    UpdateAck,
    decode_message,
)
from agent.protocol.codec import TensorMap, encode_tensor_segments, encode_tensors
from agent.protocol.errors import PayloadTooLarge
from agent.ratelimit import TokenBucket
from agent.roles.base import Role, RoleContext, register_role
from agent.roles.checkpoints import Checkpoints, WrittenSlot, split_state
from agent.roles.trainer import RoleError
from agent.tasks import cancel_and_wait, wait_event
from agent.transport import Inbound, Subscription

T = TypeVar("T")
log = structlog.get_logger("ember.aggregator")


RECEIPT_SPACING_PER_TRAINER = 0.25e-3
RECEIPT_SPACING_MAX = 0.05
"""Seconds between the starts of two group commits (each ends in a receipt that every trainer
of the job receives), per trainer and at most: the receipts a trainer processes stay bounded
however many trainers there are. Without it, bench/aggregate's 64 simulated trainers of the 10K
model spent a whole core on receipts once the aggregator committed after every update or two
(80 commits a second: 5,000 receipts to handle), and the ingest fell to a fifth."""
REPUBLISH_INTERVAL = 0.5
"""Model requests within this many seconds of a publish are answered by that publish."""
GROUP_COMMIT_WAIT = 0.05
"""Seconds a commit waits at most for the updates queued when it began to be handled."""
INLINE_OFFER_BYTES = 8 * 1024 * 1024
"""Updates of up to this many tensor bytes are checked and added on the event loop: handing
the work to a thread and back cost more than the work itself (about half a millisecond for a
4 MB update; bench/aggregate measured the 1M ingest some 3 % faster inline), and the version
the K-th offer makes of a model this small takes a few milliseconds. Larger updates go to a
worker thread, so the loop never stands still for long."""
UPDATE_OVERHEAD = 64 * 1024
"""Bytes of an update besides its tensors (envelope, names, metrics), generously."""
REJECTION_REPORTS_PER_SECOND = 10
"""Refused messages are each logged and counted, but reported as events at most this often."""


@register_role
class Aggregator(Role):
    """Builds model versions from deltas: FedBuff (async) or FedAvg rounds (sync)."""

    kind = "aggregator"

    def __init__(self, ctx: RoleContext) -> None:
        super().__init__(ctx)
        self.plan = TrainingPlan.from_config(ctx.bundle.config)
        topology = Topology.from_config(ctx.bundle.config)
        if topology.grouped and self.kind == "aggregator":
            # The top aggregator's trainers are the groups' middle aggregators.
            self.plan = dataclasses.replace(self.plan, min_trainers=topology.min_groups)
        self.checkpoints = Checkpoints(ctx.state_dir / "checkpoints")
        self.trainers: set[str] = set()
        self.tracker = StragglerTracker()
        """Arrival statistics per trainer (not checkpointed: they describe this run)."""
        self.last_version: dict[str, Any] = {}
        """The newest version's record (version, elapsed, updates applied, held-out accuracy
        and loss), checkpointed: a resumed aggregator reports it again and ends with it. The
        whole curve is the coordinator's job history; as every commit writes this record, it
        is one entry, not one per version."""
        self.started_at = time.time()
        self.selector: RandomSelector | OortSelector = (
            OortSelector(
                preferred_duration=self.plan.oort_preferred_duration,
                blacklist_rounds=self.plan.oort_blacklist_rounds,
                seed=0,
            )
            if self.plan.selection == "oort"
            else RandomSelector(seed=0)
        )
        self.started: dict[str, float] = {}
        """FedBuff with Oort: the trainers started and not yet reported, with when (monotonic)."""
        self._last_publish = 0.0
        self._republish: asyncio.Task[None] | None = None
        self._finished = False
        """The final version is out: nothing may be published as a version after it."""
        self._round_opened = 0.0
        self._eval_result: EvalResult | None = None
        self._acks: dict[str, str] = {}
        """Agent → its update processed since the last receipts (each receipt names only
        those: with every trainer's last id ever, a receipt grew with the fleet and went to
        all of it)."""
        self._acks_pending = False
        self._unsaved = False
        """Updates went into the buffer since the last checkpoint."""
        self._state_lock = asyncio.Lock()
        """Held by the serve loop while a message or a timer changes the state, and by a
        checkpoint while it writes the slot: no checkpoint holds half an update."""
        self._save_lock = asyncio.Lock()
        """One checkpoint at a time, from its write to its sync: each slot is newer than the
        one before."""
        self._saver: asyncio.Task[None] | None = None
        self._last_commit = 0.0
        """When the last group commit began (the event loop's clock)."""
        self._model_on_disk: tuple[int, int] | None = None
        """The version and cut generation whose model part the checkpoint directory holds."""
        self._ids_on_disk = -1
        """The generation of older ids on disk (:data:`~agent.roles.checkpoints.OLDER_IDS`)."""
        self._handled = 0
        """Messages the serve loop has handled."""
        self._progressed = asyncio.Event()
        """Set each time the serve loop has handled a message."""
        self._queued: Callable[[], int] = lambda: 0
        """How many messages wait in the updates queue (set by the serve loop)."""
        self._report_budget = TokenBucket(
            REJECTION_REPORTS_PER_SECOND, 2 * REJECTION_REPORTS_PER_SECOND
        )
        self.rejections: dict[str, int] = {}
        """Refused messages on the updates topics by reason code (``malformed``, ``sender``,
        ``shape``, ``dtype``, ``non_finite``, ``norm``, ...), kept across restarts and sent
        with every ``model_version`` event."""

    # -- set-up --------------------------------------------------------------------------------
    async def run(self) -> None:
        ctx = self.ctx
        resumed = await self.prepare()
        updates = await self._subscribe_updates(ctx.topics.all_job_updates(ctx.bundle.job))
        serving = True

        async def announce(_session: int) -> None:
            # Updates sent while this agent was away from the broker are gone (clean
            # sessions): publishing the current version says the aggregator is back, and
            # trainers send again what it has not acknowledged (agent.roles.delivery).
            if serving:
                self._schedule_republish()

        ctx.transport.on_connect(announce)
        try:
            if resumed:
                # The event of the version it resumes at may not have gone out (a stop between
                # checkpoint and report): sent again, the coordinator merges a version it has.
                last = self.last_version
                same = last.get("version") == self.algo.version
                await self.ctx.report(self._version_event(last if same else {}))
            else:
                await self._evaluate_and_record(metrics={})
            await self._open_round_if_ready()
            self._progress()
            await self._publish()
            await self._serve(updates)
        finally:
            serving = False
            if self._republish is not None:
                self._republish.cancel()
            if self._saver is not None:
                await cancel_and_wait([self._saver])
            await updates.close()

    async def _subscribe_updates(self, topic_filter: str) -> Subscription:
        """The updates topics, with room for one update from every trainer at work both while
        it arrives in chunks and once whole (:meth:`_updates_queue_bytes`)."""
        room = self._updates_queue_bytes()
        self.ctx.transport.make_room(room)
        return await self.ctx.transport.subscribe(
            topic_filter, max_messages=100_000, max_bytes=room
        )

    def _updates_queue_bytes(self) -> int:
        """Room for one update from every trainer the plan keeps at work (each has at most one
        in flight until its receipt): with less, a burst of legitimate updates of a large model
        was dropped after the broker had acknowledged them (bench/aggregate, 11M parameters)."""
        update = sum(int(t.nbytes) for t in self.algo.weights.values()) + UPDATE_OVERHEAD
        trainers = max(self.plan.concurrency, self.plan.clients_per_round or 0) + 1
        return max(self.ctx.transport.config.queue_bytes, trainers * update)

    async def prepare(self) -> bool:
        """Load the model, the evaluator and the algorithm, resuming from the newest checkpoint
        if there is one (then True); after this :meth:`handle` can take messages."""
        ctx = self.ctx
        bundle = ctx.bundle
        model = exported_model(bundle)
        name = str(bundle.dataset.get("name", ""))
        holdout = ctx.datasets.get(name) if name else None
        if name and holdout is None:
            raise RoleError(f"evaluation dataset {name!r} is not on this agent")
        self.evaluator: TrainingBackend | None = None
        if holdout is not None:
            # Evaluation needs only the eval graph: onnxruntime, whatever the trainers use.
            self.evaluator = await ctx.run_cpu(make_backend, bundle, model, backend="onnxruntime")
        self.holdout = holdout
        self.algo = self._make_algorithm(model.initial_params)
        resumed = await ctx.run_cpu(self.checkpoints.load_latest)
        if resumed is not None:
            state, meta = resumed
            self.algo.load_state_dict(state)
            # The files the checkpoint named hold this version's model and this generation's
            # older ids: written again, with ids forgotten since, a crash before the next slot
            # would pair the older slot with fewer ids than it was written with.
            cut = (self.algo.version, self.algo.ids_generation)
            if meta.get("model_file") == Checkpoints.model_name(*cut):
                self._model_on_disk = cut  # else written anew, under this cut's name
            if "ids_file" in meta:
                self._ids_on_disk = self.algo.ids_generation
            self.last_version = last_version_of(meta)
            self.started_at = float(meta.get("started_at", self.started_at))
            self.trainers = set(meta.get("trainers", []))
            self.rejections = {str(k): int(v) for k, v in meta.get("rejections", {}).items()}
            self._resume_meta(meta)
            # A sync round that was open goes on with what it had; its timeout starts afresh
            # (the clock is per process) so the updates of its trainers can still arrive.
            self._round_opened = time.monotonic()
            log.info(
                "aggregator_resumed",
                job=bundle.job,
                version=self.algo.version,
                applied=self.algo.counters.applied,
            )
        return resumed is not None

    def _make_algorithm(self, initial: TensorMap) -> FedBuffAggregator | SyncFedAvg:
        plan = self.plan
        params = dict(plan.server_optimizer)
        name = str(params.pop("name", "fedavg"))
        optimizer: ServerOptimizer
        if name == "feddyn":
            # FedDyn's m is every device of the federation: the trainers the job placed.
            alpha = plan.feddyn_alpha or 0.01
            optimizer = FedDynServer(alpha=alpha, num_devices=plan.concurrency)
        else:
            optimizer = make_server_optimizer(name, **params)
        guards = norm_guards(max_norm=plan.max_norm, clip_norm=plan.clip_norm)
        if plan.mode == "sync":
            return SyncFedAvg(initial, optimizer=optimizer, guards=guards)
        return FedBuffAggregator(
            initial,
            buffer_size=plan.buffer_size,
            optimizer=optimizer,
            staleness=make_staleness(plan.staleness_weight, max_staleness=plan.staleness_max),
            guards=guards,
        )

    # -- the loop ------------------------------------------------------------------------------
    async def _serve(self, updates: Any) -> None:
        self._queued = updates.__len__
        while True:
            stop = self._stop_reason()
            if stop is not None:
                await self._finish(stop)
                return
            self._raise_saver_error()
            try:
                message = await updates.get(timeout=self._wait_budget())
            except asyncio.TimeoutError:
                async with self._state_lock:
                    await self._on_timer()
                continue
            async with self._state_lock:
                await self.handle(message)
            self._handled += 1
            self._progressed.set()
            if self._acks_pending:
                self._acknowledge_soon()

    async def handle(self, message: Inbound) -> None:
        """One message from the updates topics: validated, then applied or refused with its
        reason (logged, reported and counted by reason in :attr:`rejections`)."""
        # Finite values are checked by the algorithm's ModelSpec.examine, in the pass that
        # measures the delta's norms (code "non_finite"): the codec's own check would be a
        # second pass over every update.
        decoded = await self._admit(message, (ModelUpdate, ModelRequest), require_finite=False)
        if decoded is None:
            return
        assert isinstance(decoded, ModelUpdate | ModelRequest)
        if isinstance(decoded, ModelRequest):
            await self._on_request(decoded)
            return
        await self._on_update(decoded)
        self._acks[decoded.agent] = decoded.id
        self._acks_pending = True

    async def _admit(
        self,
        message: Inbound,
        expect: type[Message] | tuple[type[Message], ...],
        require_finite: bool = True,
    ) -> Message | None:
        """``message`` decoded as one of ``expect``, from the agent whose topic it came on, for
        this job; else ``None`` after refusing it with its reason."""
        job = self.ctx.bundle.job
        try:
            decoded = decode_message(message.payload, expect=expect, require_finite=require_finite)
        except PayloadTooLarge as exc:
            await self._refuse(message.topic, str(exc), "too_large")
            return None
        except ProtocolError as exc:
            await self._refuse(message.topic, str(exc), "malformed")
            return None
        agent, for_job = getattr(decoded, "agent", None), getattr(decoded, "job", None)
        if not isinstance(agent, str) or message.topic != self._updates_topic(agent):
            # Broker ACLs pin who may write each agent's updates topic; the agent named
            # inside the payload is only believed on that agent's own topic.
            reason = f"{decoded.TYPE} from {agent!r} arrived on {message.topic}"
            await self._refuse(message.topic, reason, "sender")
            return None
        if for_job != job:
            reason = f"{decoded.TYPE} for job {for_job!r} arrived on job {job!r}'s topic"
            await self._refuse(message.topic, reason, "job")
            return None
        return decoded

    def _updates_topic(self, agent: str) -> str:
        """The topic ``agent``'s updates and requests must arrive on (ACLs pin its writer)."""
        return self.ctx.topics.job_updates(self.ctx.bundle.job, agent)

    def _model_topic(self) -> str:
        """Where this aggregator's versions and receipts go."""
        return self.ctx.topics.job_model(self.ctx.bundle.job)

    async def _refuse(self, topic: str, reason: str, code: str) -> None:
        """A message on the updates topic that is not a usable update: log and report why."""
        self._count_rejection(code)
        log.warning("update_rejected", topic=topic, reason=reason, code=code)
        if self._report_budget.take():  # a flood is counted, not echoed event for event
            await self.ctx.report(
                {"event": "update_rejected", "topic": topic, "reason": reason, "code": code}
            )

    def _count_rejection(self, code: str) -> None:
        self.rejections[code] = self.rejections.get(code, 0) + 1

    async def _send_acks(self) -> None:
        """Receipts for every update processed since the last ones, in one small message, once
        they are on disk (an acknowledged update must survive a crash: its sender will not send
        it again). Waits for receipts already on their way."""
        if self._saver is not None:
            await asyncio.wait({self._saver})
            self._raise_saver_error()
        if self._unsaved:
            await self._checkpoint()
        ack = UpdateAck(job=self.ctx.bundle.job, version=self.algo.version, acks=self._acks)
        self._acks, self._acks_pending = {}, False
        await self.ctx.publish(self._model_topic(), ack.to_msgpack())

    def _acknowledge_soon(self) -> None:
        """Start :meth:`_save_and_acknowledge` unless it is running (it takes what it finds)."""
        if self._saver is None or self._saver.done():
            self._raise_saver_error()
            self._saver = asyncio.create_task(
                self._save_and_acknowledge(), name=f"{self.ctx.bundle.job}-receipts"
            )

    async def _save_and_acknowledge(self) -> None:
        """Group commit: write what has been processed into a slot while the state is held
        still, sync it while the serve loop goes on taking updates, then acknowledge exactly
        what the slot holds; again while more came meanwhile. Receipts used to wait until the
        updates queue ran empty and the loop stood still during every write: the trainers (one
        update in flight each) then sent in convoys and the aggregator idled between them
        (bench/aggregate)."""
        loop = asyncio.get_running_loop()
        while self._acks_pending:
            # Every receipt goes to every trainer of the job: commits are spaced so that each
            # trainer hears at most 1 / RECEIPT_SPACING_PER_TRAINER / N of them a second (with
            # 64 trainers one each 16 ms; the updates of the pause join the next commit).
            spacing = min(RECEIPT_SPACING_MAX, RECEIPT_SPACING_PER_TRAINER * len(self.trainers))
            pause = self._last_commit + spacing - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            self._last_commit = loop.time()
            # The updates already queued join this commit (small updates arrive faster than
            # commits: one each would spend the time on fsync); later ones wait for the next,
            # and none waits for long. Waiting until the queue ran empty instead held every
            # receipt for the whole wait while large updates kept arriving.
            target = self._handled + self._queued()
            deadline = loop.time() + GROUP_COMMIT_WAIT
            while self._handled < target and (left := deadline - loop.time()) > 0:
                self._progressed.clear()
                await wait_event(self._progressed, left)
            written = None
            async with self._state_lock:
                acks, version = self._acks, self.algo.version
                self._acks, self._acks_pending = {}, False
                if self._unsaved:
                    # Straight from the live state into the slot, then synced while the serve
                    # loop goes on: the lock order (state, then save) is the serve loop's too.
                    await self._save_lock.acquire()
                    try:
                        written = await self._write_live()
                    except BaseException:
                        self._save_lock.release()
                        raise
            if written is not None:
                try:
                    await self._sync_live(written)
                finally:
                    self._save_lock.release()
            ack = UpdateAck(job=self.ctx.bundle.job, version=version, acks=acks)
            await self.ctx.publish(self._model_topic(), ack.to_msgpack())

    def _raise_saver_error(self) -> None:
        """A checkpoint that failed (a full disk) ends the role, as an inline one would."""
        saver = self._saver
        if saver is not None and saver.done() and not saver.cancelled():
            error = saver.exception()
            if error is not None:
                raise error

    def _wait_budget(self) -> float:
        if isinstance(self.algo, SyncFedAvg) and self.algo.current_round is not None:
            left = self._round_opened + self.plan.round_timeout - time.monotonic()
            return max(0.05, min(left, 5.0))
        return 1.0 if self.plan.mode == "sync" else 5.0

    async def _on_timer(self) -> None:
        if self._picks_starters:
            # A started trainer that went silent gives its slot to another.
            now = time.monotonic()
            silent = [a for a, t in self.started.items() if now - t >= self.plan.round_timeout]
            for agent in silent:
                del self.started[agent]
            if silent:
                self.tracker.missed(set(silent))
                if self._start_idle():
                    self._schedule_republish()
        if isinstance(self.algo, SyncFedAvg):
            current = self.algo.current_round
            if current is None:
                await self._open_round_if_ready(publish=True)
            elif time.monotonic() - self._round_opened >= self.plan.round_timeout:
                result = await self.ctx.run_cpu(self.algo.close, "timeout")
                log.info(
                    "round_timeout",
                    job=self.ctx.bundle.job,
                    round=result.round,
                    missing=sorted(result.missing),
                )
                self.tracker.missed(result.missing)
                await self._new_version(result.metrics)

    async def _on_request(self, request: ModelRequest) -> None:
        joined = request.agent not in self.trainers
        self.trainers.add(request.agent)
        self.tracker.seen(request.agent)
        no_round = isinstance(self.algo, SyncFedAvg) and self.algo.current_round is None
        if no_round and await self._open_round_if_ready(publish=True):
            return
        started = self._picks_starters and self._start_idle()
        if joined or started or request.have_version < self.algo.version:
            self._schedule_republish()

    async def _on_update(self, update: ModelUpdate) -> None:
        self.trainers.add(update.agent)
        algo = self.algo
        if self.plan.partial_work == "drop" and self._partial(update):
            await self._drop_partial(update)
            return
        staleness = algo.version - update.base_version
        # A sync round also checks the sender: it must be sampled and report once.
        offer: Callable[..., Outcome] = (
            functools.partial(algo.offer, client=update.agent)
            if isinstance(algo, SyncFedAvg)
            else algo.offer
        )
        args = (update.id, update.base_version, update.tensors, update.num_samples, update.metrics)
        if sum(t.nbytes for t in update.tensors.values()) <= INLINE_OFFER_BYTES:
            outcome = offer(*args)
        else:
            outcome = await self.ctx.run_cpu(offer, *args)
        self.tracker.update(
            update.agent, applied=outcome.status is Status.APPLIED, staleness=staleness
        )
        feedback = outcome.status not in (Status.DUPLICATE, Status.REJECTED)
        if isinstance(self.selector, OortSelector) and feedback:
            # Oort's feedback (Lai et al. 2021): statistical and system utility of the run.
            self.selector.update(
                update.agent,
                num_samples=update.num_samples,
                loss_sq_mean=loss_sq_mean(update.metrics),
                duration=max(float(update.metrics.get("train_seconds", 0.0)), 0.0),
            )
        restart = False
        if self._picks_starters:
            # Its slot is free (started by this process or, after a restart, by the last one).
            self.started.pop(update.agent, None)
            restart = self._start_idle()
        self._progress()
        if outcome.status is not Status.APPLIED:
            if outcome.status is Status.REJECTED:
                self._count_rejection(outcome.code or "other")
            log.info(
                "update_not_applied",
                job=update.job,
                agent=update.agent,
                status=outcome.status.value,
                reason=outcome.reason,
                code=outcome.code,
            )
            if not self._report_budget.take():
                return
            await self.ctx.report(
                {
                    "event": f"update_{outcome.status.value}",
                    "agent": update.agent,
                    "update": update.id,
                    "reason": outcome.reason,
                    "code": outcome.code,
                }
            )
            return
        # The buffer (FedBuff's, or the open sync round's with who reported) and the applied id
        # are saved before the receipt goes out: the trainer forgets an acknowledged update, and
        # a resumed round must neither lose it nor count it twice.
        self._unsaved = True
        if outcome.version is not None:
            await self._new_version(outcome.metrics)
        elif restart:
            self._schedule_republish()

    def _partial(self, update: ModelUpdate) -> bool:
        """The trainer ran fewer local steps than the job plans for its sample count."""
        steps = update.metrics.get("steps")
        return steps is not None and steps < self.plan.client.steps_for(update.num_samples)

    async def _drop_partial(self, update: ModelUpdate) -> None:
        """``algorithm.partial_work: drop``: leave the update out, as FedAvg drops stragglers in
        Li et al. 2020; a sync round stops waiting for its sender."""
        steps = int(update.metrics.get("steps", 0))
        reason = (
            f"partial work dropped: {steps} of "
            f"{self.plan.client.steps_for(update.num_samples)} local steps"
        )
        log.info("update_dropped", job=update.job, agent=update.agent, reason=reason)
        await self.ctx.report(
            {
                "event": "update_dropped",
                "agent": update.agent,
                "update": update.id,
                "reason": reason,
            }
        )
        self.tracker.update(
            update.agent, applied=False, staleness=self.algo.version - update.base_version
        )
        self._progress()
        if isinstance(self.algo, SyncFedAvg):
            # Who the open round still waits for is saved before the receipt goes out.
            self._unsaved = True
            result = self.algo.excuse(update.agent, update.base_version)
            if result is not None:
                await self._new_version(result.metrics)

    async def _new_version(self, train_metrics: Mapping[str, float]) -> None:
        await self._evaluate_and_record(metrics=train_metrics)
        if self._stop_reason() is None:
            await self._open_round_if_ready()
            await self._publish()

    # -- who trains next ------------------------------------------------------------------------
    @property
    def _picks_starters(self) -> bool:
        """FedBuff with Oort: the aggregator chooses which idle trainers start, C at a time."""
        return self.plan.mode == "async" and isinstance(self.selector, OortSelector)

    def _start_idle(self) -> bool:
        """Fill the free slots of FedBuff's concurrency C with idle trainers Oort picks; they
        are named in the next model version published. True if any was picked."""
        room = self.plan.concurrency - len(self.started)
        idle = sorted(self.trainers - set(self.started))
        if room <= 0 or not idle:
            return False
        now = time.monotonic()
        for agent in self.selector.select(idle, room):
            self.started[agent] = now
        return True

    # -- sync rounds ---------------------------------------------------------------------------
    async def _open_round_if_ready(self, publish: bool = False) -> bool:
        """Sample the next round's participants (sync mode) once enough trainers are known."""
        algo = self.algo
        if not isinstance(algo, SyncFedAvg) or algo.current_round is not None:
            return False
        if len(self.trainers) < self.plan.min_trainers:
            return False
        count = min(
            self.plan.clients_per_round or min(len(self.trainers), self.plan.concurrency),
            len(self.trainers),
        )
        chosen = self.selector.select(sorted(self.trainers), count)
        algo.start_round(chosen)
        self._round_opened = time.monotonic()
        self._progress()
        if publish:
            await self._publish()
        return True

    # -- versions ------------------------------------------------------------------------------
    async def _evaluate_and_record(self, metrics: Mapping[str, float]) -> None:
        version = self.algo.version
        result = None
        if (
            self.evaluator is not None
            and self.holdout is not None
            and version % self.plan.eval_every == 0
        ):
            result = await self.ctx.run_cpu(
                self.evaluator.evaluate, self.algo.weights, self.holdout.x, self.holdout.y
            )
            self._eval_result = result
        evaluated: dict[str, Any] = {}
        if result is not None:
            evaluated["loss"] = result.loss
            if result.accuracy is not None:
                evaluated["accuracy"] = result.accuracy
        event = self._version_event(evaluated)
        if "loss" in metrics:
            event["train_loss"] = metrics["loss"]
        self.last_version = {
            k: event[k]
            for k in ("version", "elapsed", "updates_applied", "accuracy", "loss")
            if k in event
        }
        await self._checkpoint()
        await self.ctx.report(event)
        self._progress()
        log.info(
            "model_version",
            job=self.ctx.bundle.job,
            version=version,
            accuracy=event.get("accuracy"),
            updates=event["updates_applied"],
        )

    def _version_event(self, evaluated: Mapping[str, Any]) -> dict[str, Any]:
        """The ``model_version`` event of the current version, with the held-out ``loss`` and
        ``accuracy`` in ``evaluated`` (this evaluation, or the version's checkpointed record)."""
        counters = self.algo.counters.as_dict()
        event: dict[str, Any] = {
            "event": "model_version",
            "version": self.algo.version,
            "updates_applied": counters["applied"],
            "elapsed": round(time.time() - self.started_at, 3),
            "counters": counters,
            "rejected": dict(sorted(self.rejections.items())),
            "trainers": len(self.trainers),
            "stragglers": self.tracker.stragglers(),
        }
        event.update({k: evaluated[k] for k in ("loss", "accuracy") if k in evaluated})
        return event

    async def _checkpoint(self) -> None:
        """Save the whole state now; the caller keeps it still (the serve loop's state lock,
        or no other task changing it)."""
        async with self._save_lock:
            await self._sync_live(await self._write_live())

    async def _write_live(self) -> WrittenSlot:
        """The state as it is now written into the older slot from the live arrays (no copy
        of the buffer), not yet synced; first, durably, the current cut's model part and
        older ids unless their files are on disk (once per version or generation: between
        versions only the buffer, counters and newer ids change). The caller keeps the state
        still until this returns, holds the save lock, and then calls :meth:`_sync_live`."""
        version, generation = self.algo.version, self.algo.ids_generation
        cut = (version, generation)
        with_model = self._model_on_disk != cut
        with_ids = self._ids_on_disk != generation
        meta = self._meta()
        self._unsaved = False

        def write() -> WrittenSlot:
            model, older, rest = split_state(self.algo.state_dict(older_ids=with_ids))
            return self.checkpoints.write(
                version,
                encode_tensor_segments(rest),
                meta,
                encode_tensors(model) if with_model else None,
                split=True,
                older_ids=encode_tensors(older) if with_ids else None,
                ids_generation=generation,
            )

        written = await self._in_thread_to_the_end(write, self.checkpoints.abandon)
        # Written once each: written again with ids forgotten since, a crash before the next
        # slot would pair the older slot with fewer ids than it was written with.
        self._model_on_disk = cut
        self._ids_on_disk = generation
        return written

    async def _sync_live(self, written: WrittenSlot) -> None:
        """Finish :meth:`_write_live`'s slot; the state may change meanwhile."""
        await self._in_thread_to_the_end(functools.partial(self.checkpoints.sync, written))

    async def _in_thread_to_the_end(
        self, work: Callable[[], T], cancelled: Callable[[T], None] | None = None
    ) -> T:
        """``work()`` in a worker thread. Cancelled, this still waits for the thread (the save
        lock must not go while a thread writes a slot: a role started again on this directory
        writes the same slot next), hands ``cancelled`` what it returned, and re-raises."""
        running = asyncio.ensure_future(self.ctx.run_cpu(work))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                result = await running
                if cancelled is not None:
                    cancelled(result)
            raise

    def _meta(self) -> dict[str, Any]:
        """A copy of what a checkpoint keeps besides the state."""
        return copy.deepcopy(
            {
                "last_version": self.last_version,
                "started_at": self.started_at,
                "trainers": sorted(self.trainers),
                "rejections": self.rejections,
                **self._extra_meta(),
            }
        )

    def _extra_meta(self) -> dict[str, Any]:
        """More to keep in each checkpoint's JSON (read back by :meth:`_resume_meta`)."""
        return {}

    def _resume_meta(self, meta: Mapping[str, Any]) -> None:
        """Take back what :meth:`_extra_meta` kept."""

    def _progress(self) -> None:
        """This role's entry in the retained ``jobs/<job>/agents/<agent>/progress``."""
        algo = self.algo
        fields: dict[str, Any] = {
            "state": "aggregating",
            "mode": self.plan.mode,
            "model_version": algo.version,
            "counters": algo.counters.as_dict(),
            # Computed when the document is published (once a second at most), not on every
            # update: both are O(trainers), and this runs for every update.
            "trainers": self.tracker.snapshot,
            "stragglers": self.tracker.stragglers,
        }
        if isinstance(algo, SyncFedAvg):
            current = algo.current_round
            fields["round"] = None
            if current is not None:
                fields["round"] = {
                    "number": current.number,
                    "participants": sorted(current.participants),
                    "reported": sorted(current.reported),
                }
        else:
            fields["buffer"] = {"pending": algo.pending, "size": algo.buffer_size}
        if self._eval_result is not None:
            fields["loss"] = self._eval_result.loss
            fields["accuracy"] = self._eval_result.accuracy
        self.ctx.progress(fields)

    def _stop_reason(self) -> str | None:
        accuracy = self._eval_result.accuracy if self._eval_result is not None else None
        return self.plan.stop.reason(
            accuracy=accuracy,
            updates=self.algo.counters.applied,
            versions=self.algo.version,
            minutes=(time.time() - self.started_at) / 60.0,
        )

    async def _finish(self, reason: str) -> None:
        self._finished = True
        if self._republish is not None:
            # A republish due after the final version would announce the job as still running.
            await cancel_and_wait([self._republish])
        await self._publish(final=True)  # first: the coordinator may cancel this role any moment
        if self._acks_pending:  # saves what the last receipts name, for the record
            await self._send_acks()
        await self.ctx.report(
            {
                "event": "completed",
                "reason": reason,
                "version": self.algo.version,
                **{k: v for k, v in self.last_version.items() if k != "version"},
            }
        )
        log.info("job_completed", job=self.ctx.bundle.job, reason=reason, version=self.algo.version)

    async def _publish(self, final: bool = False) -> None:
        algo = self.algo
        participants: list[str] = []
        if isinstance(algo, SyncFedAvg) and algo.current_round is not None and not final:
            participants = sorted(algo.current_round.participants)
        elif self._picks_starters and not final:
            if not self.started:
                return  # a version naming nobody would start everybody: FedBuff waits for one
            participants = sorted(self.started)
        metrics = {}
        if self._eval_result is not None:
            metrics["loss"] = self._eval_result.loss
            if self._eval_result.accuracy is not None:
                metrics["accuracy"] = self._eval_result.accuracy
        message = ModelVersion(
            job=self.ctx.bundle.job,
            version=algo.version,
            tensors=dict(algo.weights),
            metrics=metrics,
            participants=participants,
            final=final,
        )
        payload = await self.ctx.run_cpu(message.to_msgpack)
        await self.ctx.publish(self.ctx.topics.job_model(self.ctx.bundle.job), payload)
        self._last_publish = time.monotonic()

    def _schedule_republish(self) -> None:
        if self._finished or (self._republish is not None and not self._republish.done()):
            return
        delay = max(0.0, self._last_publish + REPUBLISH_INTERVAL - time.monotonic())

        async def later() -> None:
            await asyncio.sleep(delay)
            # Not in the middle of a message's handling: between a sync round's close and the
            # next one's opening, a republish would name no trainers and could reach them
            # after the version that opens the round.
            async with self._state_lock:
                await self._publish()

        self._republish = asyncio.create_task(later())


def last_version_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The newest version's record in a checkpoint's metadata; checkpoints written before
    ``last_version`` kept every version's, in ``history``."""
    if "last_version" in meta:
        return dict(meta["last_version"])
    return dict((meta.get("history") or [{}])[-1])

"""Ring all-reduce over the broker, for the trainers of a hybrid group (Flame's hybrid topology;
the schedule is Patarasuk and Yuan 2009's ring, :mod:`agent.learning.ring`).

Each member subscribes once, before it joins any ring, to its own ring inbox
``jobs/<job>/groups/<group>/ring/+/<me>``; member r sends each step's chunk to r + 1 on
``jobs/<job>/groups/<group>/ring/<r>/<r + 1>`` (one writer per topic, so broker ACLs can pin
it) as a msgpack :class:`~agent.protocol.RingChunk`. A chunk is believed only from the
member's predecessor in the ring it names, on the predecessor's own topic, with the chunk index
and length the schedule expects; anything else is logged with its reason and dropped. Chunks
that arrive before their step is reached wait (bounded); a member that does not hear from its
predecessor within the timeout gives up the ring (:class:`RingError`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import structlog

from agent.learning.arrays import Array
from agent.learning.ring import chunk_bounds, gather_step, reduce_step
from agent.protocol import ProtocolError, RingChunk, decode_message
from agent.roles.base import RoleContext
from agent.tasks import cancel_and_wait, wait_event
from agent.transport import Inbound, Subscription

log = structlog.get_logger("ember.ring")

MAX_EARLY_CHUNKS = 64
"""Chunks kept for steps (or rings) not reached yet; beyond this the oldest are dropped."""


class RingError(RuntimeError):
    """This member's part of a ring all-reduce could not be completed; the message says why."""


class RingMember:
    """One trainer's side of a hybrid group's ring all-reduce over MQTT."""

    def __init__(self, ctx: RoleContext, group: str) -> None:
        self.ctx = ctx
        self.group = group
        self.rejected = 0
        self._early: OrderedDict[tuple[str, str, int], RingChunk] = OrderedDict()
        self._arrived = asyncio.Event()
        self._sub: Subscription | None = None
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to this member's ring inbox (before joining any ring)."""
        ctx = self.ctx
        self._sub = await ctx.transport.subscribe(
            ctx.topics.group_ring_inbox(ctx.bundle.job, self.group, ctx.agent_id),
            max_messages=4 * MAX_EARLY_CHUNKS,
        )
        self._pump = asyncio.create_task(self._read(self._sub), name="ring-inbox")

    async def close(self) -> None:
        if self._pump is not None:
            await cancel_and_wait([self._pump])
        if self._sub is not None:
            await self._sub.close()

    async def allreduce(
        self, ring: str, members: Sequence[str], vector: Array, *, timeout: float
    ) -> Array:
        """The element-wise sum of ``vector`` over every member of ``ring`` (named in ring
        order, this agent among them); every member calls it with a vector of the same
        length. ``RingError`` if a predecessor stays silent for ``timeout`` seconds."""
        me = self.ctx.agent_id
        if me not in members or len(set(members)) != len(members):
            raise RingError(f"ring {ring}: {me} is not exactly once in {list(members)}")
        n, rank = len(members), list(members).index(me)
        total = np.array(vector, copy=True)
        if n == 1:
            return total
        bounds = chunk_bounds(total.size, n)
        successor, predecessor = members[(rank + 1) % n], members[(rank - 1) % n]
        for phase, plan in (("reduce", reduce_step), ("gather", gather_step)):
            for step in range(n - 1):
                send, receive = plan(rank, n, step)
                lo, hi = bounds[send]
                await self._send(ring, successor, phase, step, send, total[lo:hi])
                chunk = await self._receive(ring, predecessor, phase, step, timeout)
                lo, hi = bounds[receive]
                data = chunk.tensors.get("chunk")
                if chunk.index != receive or data is None or data.shape != (hi - lo,):
                    raise RingError(
                        f"ring {ring}: {phase} step {step} from {predecessor} carried chunk "
                        f"{chunk.index} of shape {None if data is None else data.shape}, "
                        f"expected chunk {receive} of {hi - lo} values"
                    )
                if phase == "reduce":
                    total[lo:hi] += data
                else:
                    total[lo:hi] = data
        self._forget(ring)
        return total

    async def _send(
        self, ring: str, successor: str, phase: str, step: int, index: int, data: Array
    ) -> None:
        ctx = self.ctx
        message = RingChunk(
            job=ctx.bundle.job,
            ring=ring,
            sender=ctx.agent_id,
            phase=phase,  # type: ignore[arg-type]
            step=step,
            index=index,
            tensors={"chunk": np.ascontiguousarray(data)},
        )
        topic = ctx.topics.group_ring(ctx.bundle.job, self.group, ctx.agent_id, successor)
        await ctx.publish(topic, message.to_msgpack())

    async def _receive(
        self, ring: str, predecessor: str, phase: str, step: int, timeout: float
    ) -> RingChunk:
        key = (ring, phase, step)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._arrived.clear()  # before looking: a chunk taken after this sets it again
            chunk = self._early.pop(key, None)
            if chunk is not None and chunk.sender == predecessor:
                return chunk
            if chunk is not None:
                self._reject(f"ring {ring}: chunk from {chunk.sender}, not {predecessor}")
            left = deadline - loop.time()
            if left <= 0:
                raise RingError(
                    f"ring {ring}: nothing from {predecessor} for {phase} step {step} "
                    f"in {timeout:g} s"
                )
            await wait_event(self._arrived, left)

    async def _read(self, sub: Subscription) -> None:
        async for message in sub:
            self._take(message)

    def _take(self, message: Inbound) -> None:
        ctx = self.ctx
        try:
            chunk = decode_message(message.payload, expect=(RingChunk,))
        except ProtocolError as exc:
            self._reject(str(exc))
            return
        assert isinstance(chunk, RingChunk)
        expected = ctx.topics.group_ring(ctx.bundle.job, self.group, chunk.sender, ctx.agent_id)
        if chunk.job != ctx.bundle.job or message.topic != expected:
            self._reject(f"ring_chunk from {chunk.sender!r} arrived on {message.topic}")
            return
        self._early[(chunk.ring, chunk.phase, chunk.step)] = chunk
        while len(self._early) > MAX_EARLY_CHUNKS:
            self._early.popitem(last=False)
        self._arrived.set()

    def _forget(self, ring: str) -> None:
        for key in [k for k in self._early if k[0] == ring]:
            del self._early[key]

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        log.warning("ring_chunk_rejected", group=self.group, reason=reason)

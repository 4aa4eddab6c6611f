"""A trainer's updates, delivered at least once end to end: spooled, sent, resent until the
aggregator acknowledges them.

The transport's QoS 1 makes the broker acknowledge every chunk (PUBACK), but that is only half
the road: a broker restarted without persistence, or an aggregator that was away with a clean
session, loses a message the broker had taken. So :class:`Delivery` keeps every update in the
agent's :class:`~agent.spool.Spool` until the aggregator's ``UpdateAck`` names it, sends the
oldest first and one at a time (the ``UpdateAck`` carries one id per agent), and sends it again

* at once after the connection to the broker came back (the receipt may have been lost with it),
* when the aggregator shows it is alive (a model version arrives; an aggregator publishes one
  after each reconnect) and the receipt is overdue,
* otherwise after a timeout that doubles up to :data:`RESEND_MAX` (an aggregator that is down),
* and after the agent process restarts (the spool is on disk).

The aggregator applies each update id at most once (``AppliedIds`` in its checkpoint), so a
repeat costs bandwidth, never a double count. Training does not wait for any of this: the
trainer goes on while the broker is away, until the bounded spool is full.

Every update's fate is appended to ``updates.jsonl`` in the role's state directory (spooled,
acknowledged, discarded when the job ended): an audit trail for operators and fault tests.

An update for a sharded aggregator is one message per shard (its slice of the delta on that
shard's topic, every part with the update's id): the parts are spooled as entries
``<update id>--<shard>-<shards>``, sent together once all are spooled, and acknowledged together
by the update's one receipt.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.protocol.errors import PayloadTooLarge
from agent.roles.base import RoleContext
from agent.spool import Spool, SpoolEntry
from agent.tasks import cancel_and_wait, wait_event

log = structlog.get_logger("ember.delivery")

ACK_TIMEOUT = 5.0
"""Seconds to wait for the aggregator's receipt before sending an update again (doubling)."""
RESEND_MAX = 30.0
"""The longest wait between two sends of one unacknowledged update."""
ALIVE_GRACE = 1.0
"""An update still unacknowledged this long after it was sent is sent again as soon as the
aggregator shows it is alive (publishes a version; it does so after every reconnect)."""
SPOOL_MAX_UPDATES = 32
SPOOL_MAX_BYTES = 256 << 20
"""Default bounds of the update spool (``[spool]`` in the agent's config overrides them)."""
PART_SEPARATOR = "--"
"""Between an update's id and its part number in the spool entry of one part."""
LEDGER = "updates.jsonl"
LEDGER_MAX_BYTES = 4 << 20
"""The audit trail is rotated to ``updates.jsonl.1`` beyond this size."""


def update_of(entry_id: str) -> str:
    """The update a spool entry belongs to (the entry's own id unless it is one part)."""
    return entry_id.split(PART_SEPARATOR, 1)[0]


def part_count(entry_id: str) -> int:
    """How many parts the update of a spool entry has (``<id>--<index>-<count>``; 1 for a whole
    update)."""
    _, sep, part = entry_id.partition(PART_SEPARATOR)
    return int(part.rsplit("-", 1)[1]) if sep else 1


def whole_updates(entries: Sequence[SpoolEntry]) -> dict[str, list[SpoolEntry]]:
    """Spooled updates with every part there, oldest first (a sharded update's parts are
    spooled one by one: the sender must not start on one while its last parts are written)."""
    updates: dict[str, list[SpoolEntry]] = {}
    for entry in entries:
        updates.setdefault(update_of(entry.id), []).append(entry)
    return {u: parts for u, parts in updates.items() if len(parts) == part_count(parts[0].id)}


class UpdateLedger:
    """An append-only JSON-lines record of what became of each update (one line per event)."""

    def __init__(self, path: Path, max_bytes: int = LEDGER_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def record(self, event: str, update_id: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 4), "event": event, "id": update_id, **fields})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > self.max_bytes:
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def ids(self, event: str) -> set[str]:
        """Ids recorded with ``event`` (both files)."""
        return {row["id"] for row in read_ledger(self.path) if row.get("event") == event}


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The events of a ledger and its rotated predecessor, oldest first; torn lines skipped."""
    rows: list[dict[str, Any]] = []
    for part in (path.with_name(path.name + ".1"), path):
        if not part.exists():
            continue
        for line in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                rows.append(row)
    return rows


class Delivery:
    """At-least-once delivery of spooled updates, acknowledged end to end by the aggregator."""

    def __init__(
        self,
        ctx: RoleContext,
        spool: Spool,
        *,
        ack_timeout: float = ACK_TIMEOUT,
        resend_max: float = RESEND_MAX,
    ) -> None:
        self.ctx = ctx
        self.spool = spool
        self.ledger = UpdateLedger(ctx.state_dir / LEDGER)
        self.ack_timeout = ack_timeout
        self.resend_max = max(resend_max, ack_timeout)
        self.sends = 0
        self.resends = 0
        self._acked: set[str] = set()
        self._models = 0
        self._pulse = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._full_logged = False

    @classmethod
    def for_role(cls, ctx: RoleContext, *, max_updates: int | None = None) -> Delivery:
        """Delivery through a spool in the role's state directory, bounded as the agent's
        ``[spool]`` config says (at most ``max_updates`` updates, if given)."""
        entries = int(ctx.extras.get("spool_max_updates", SPOOL_MAX_UPDATES))
        spool = Spool(
            ctx.state_dir / "spool",
            max_entries=min(entries, max_updates or entries),
            max_bytes=int(ctx.extras.get("spool_max_bytes", SPOOL_MAX_BYTES)),
        )
        return cls(ctx, spool)

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> tuple[int, int]:
        """Read what a previous run left in the spool and start sending. Returns how many
        updates were left unacknowledged and how many this role has spooled in all."""
        counts: tuple[int, int] = await self.ctx.run_cpu(self._recover)
        self._task = asyncio.create_task(self._run(), name=f"{self.ctx.bundle.job}-delivery")
        return counts

    def _recover(self) -> tuple[int, int]:
        entries = self.spool.load()
        known = self.ledger.ids("spooled")
        whole = whole_updates(entries)
        for update_id in sorted({update_of(entry.id) for entry in entries} - set(whole)):
            # Some parts only: the process died while spooling it, so it was never sent.
            self.ledger.record("discarded", update_id, reason="parts missing after a restart")
        for entry in entries:
            if update_of(entry.id) not in whole:
                self.spool.remove(entry.id)
        updates = set(whole)
        for update_id in sorted(updates - known):
            # Spooled, then the process died before the ledger line.
            self.ledger.record("spooled", update_id, recovered=True)
            known.add(update_id)
        return len(updates), len(known)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    # -- what the trainer tells us ---------------------------------------------------------------
    def acknowledged(self, update_id: str) -> None:
        """The aggregator's receipt named ``update_id``."""
        if self._spooled(update_id):
            self._acked.add(update_id)
        self.pulse()

    def model_arrived(self) -> None:
        """A model version arrived: the aggregator is alive."""
        self._models += 1
        self.pulse()

    def pulse(self) -> None:
        """Wake everything waiting in :meth:`wait` to check its condition again."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    def is_acked(self, update_id: str) -> bool:
        return update_id in self._acked or not self._spooled(update_id)

    def _spooled(self, update_id: str) -> bool:
        return update_id in self.spool or any(
            update_of(entry.id) == update_id for entry in self.spool.entries()
        )

    async def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Until ``predicate()`` holds (``True``) or ``timeout`` seconds passed (``False``)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await wait_event(self._pulse, left)
        return True

    async def put(self, update_id: str, topic: str, payload: bytes, base_version: int) -> None:
        """Spool one update durably (waiting while the spool is full) and have it sent."""
        await self.put_parts(update_id, [(topic, payload)], base_version)

    async def put_parts(
        self, update_id: str, parts: Sequence[tuple[str, bytes]], base_version: int
    ) -> None:
        """Spool one update made of ``parts`` (topic, payload), one per aggregator shard, and
        have them sent together; a single part is spooled as the update itself."""
        size = sum(len(payload) for _, payload in parts)
        if not self._has_room(size, len(parts)):
            if not self._full_logged:
                log.warning(
                    "spool_full_training_paused",
                    job=self.ctx.bundle.job,
                    entries=len(self.spool),
                    bytes=self.spool.size,
                )
                self._full_logged = True
            await self.wait(lambda: self._has_room(size, len(parts)), None)
            self._full_logged = False
        await self.ctx.run_cpu(self._put, update_id, parts, base_version)
        self.pulse()

    def _has_room(self, size: int, count: int) -> bool:
        spool = self.spool
        return len(spool) == 0 or (
            len(spool) + count <= spool.max_entries and spool.size + size <= spool.max_bytes
        )

    def _put(self, update_id: str, parts: Sequence[tuple[str, bytes]], base_version: int) -> None:
        for index, (topic, payload) in enumerate(parts):
            entry_id = (
                update_id if len(parts) == 1 else f"{update_id}{PART_SEPARATOR}{index}-{len(parts)}"
            )
            self.spool.put(entry_id, topic, payload)
        size = sum(len(payload) for _, payload in parts)
        self.ledger.record("spooled", update_id, base=base_version, bytes=size)

    async def discard_all(self, reason: str) -> int:
        """Drop every spooled update (the job ended: nobody will apply them); how many."""
        await self.close()
        entries = self.spool.entries()

        updates = sorted({update_of(entry.id) for entry in entries})

        def drop() -> None:
            for update_id in updates:
                self.ledger.record("discarded", update_id, reason=reason)
            for entry in entries:
                self.spool.remove(entry.id)

        if entries:
            await self.ctx.run_cpu(drop)
            log.info(
                "spool_discarded", job=self.ctx.bundle.job, updates=len(updates), reason=reason
            )
        return len(updates)

    # -- the sender ------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self.wait(lambda: len(self.spool) > 0, None)
            whole = whole_updates(self.spool.entries())
            if not whole:
                await self.wait(lambda: False, 0.05)  # the last parts are being written
                continue
            update_id, parts = next(iter(whole.items()))
            try:
                await self._deliver(update_id, parts)
                outcome, reason = "acked", ""
            except (PayloadTooLarge, ValueError) as exc:
                # It can never be sent (larger than the transport's limit): say so, go on.
                log.error("update_undeliverable", update=update_id, reason=str(exc))
                outcome, reason = "undeliverable", str(exc)
            await self.ctx.run_cpu(self._done, update_id, parts, outcome, reason)
            self._acked.discard(update_id)
            self.pulse()  # room in the spool

    async def _deliver(self, update_id: str, parts: Sequence[SpoolEntry]) -> None:
        """Send an update's spooled parts until its receipt arrives."""
        loop = asyncio.get_running_loop()
        transport = self.ctx.transport
        attempt = 0
        while update_id not in self._acked:
            attempt += 1
            if attempt > 1:
                self.resends += 1
                log.info(
                    "update_resent", job=self.ctx.bundle.job, update=update_id, attempt=attempt
                )
            # QoS 1: PUBACK of every chunk. The parts of a sharded update go out side by side,
            # each to its shard over its own topic.
            await asyncio.gather(*(self.ctx.publish(e.topic, e.payload) for e in parts))
            self.sends += 1
            sent_at, session, models = loop.time(), transport.session, self._models
            interval = min(self.ack_timeout * 2 ** (attempt - 1), self.resend_max)
            resend_now = functools.partial(
                self._resend_due, update_id, sent_at, session, models, interval
            )
            # The session counter moves without a pulse: look at least once a second.
            while not await self.wait(resend_now, 1.0):
                pass

    def _resend_due(
        self, update_id: str, sent_at: float, session: int, models: int, interval: float
    ) -> bool:
        """Stop waiting for the receipt of ``update_id``: it came, or it is time to resend."""
        waited = asyncio.get_running_loop().time() - sent_at
        return (
            update_id in self._acked
            or self.ctx.transport.session != session  # reconnected: the receipt may be lost
            or (self._models != models and waited >= ALIVE_GRACE)  # the aggregator is back
            or waited >= interval
        )

    def _done(self, update_id: str, parts: Sequence[SpoolEntry], outcome: str, reason: str) -> None:
        # The audit line first: a process that dies between the two keeps the entry spooled
        # (sent again, refused as a duplicate) instead of an entry gone without a trace.
        self.ledger.record(outcome, update_id, **({"reason": reason} if reason else {}))
        for entry in parts:
            self.spool.remove(entry.id)

"""Membership of a sharded FedBuff version: which updates every shard folds into it.

A sharded aggregator's S shards each hold their own part of every update. FedBuff (Nguyen et
al., AISTATS 2022) makes version t+1 from K buffered updates; sharded, every shard must fold
exactly the same K update ids, with the same staleness weights, or the assembled model would mix
different aggregates. The shards report the ids they hold (durably: checkpointed before the
report); the :class:`CommitLedger` on the assembler's side acknowledges an update to its trainer
once every shard holds it, and commits "version t+1 = these K ids" once K updates are held by
all. Every shard folds a commit against the same version t, so staleness τ = t − t_i and its
weight are the same everywhere.

Pure Python: no transport, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.learning.aggregation import AppliedIds
from agent.learning.staleness import Staleness

KEEP_COMMITS = 64
"""Commits remembered to send again to a shard that reports an older version."""


@dataclass(frozen=True, slots=True)
class Held:
    """One update part a shard holds: the update's id, its trainer and base version t_i
    (FedBuff's staleness τ = t − t_i, Nguyen et al. 2022)."""

    update_id: str
    agent: str
    base_version: int


@dataclass(frozen=True, slots=True)
class Commit:
    """Version ``version`` is the previous version plus the K updates ``ids``, in this order
    (one FedBuff server step over a buffer of K, Nguyen et al. 2022)."""

    version: int
    ids: tuple[str, ...]
    dropped: tuple[str, ...] = ()
    """Updates a shard refused its part of, since the last commit: the others drop theirs."""


class CommitLedger:
    """The assembler's view of what S shards hold, and the commits it decides (FedBuff's
    buffer of K, Nguyen et al. 2022, agreed across shards).

    * :meth:`report` takes a shard's full list of held parts (idempotent: reports may repeat or
      arrive late; ids already committed are ignored).
    * :meth:`take_acks` gives the ids every shard holds that were not acknowledged yet.
    * :meth:`next_commit` commits the K oldest ids every shard holds, skipping those FedBuff
      would drop as too stale at the current version.
    """

    def __init__(
        self,
        shards: int,
        buffer_size: int,
        *,
        version: int = 0,
        staleness: Staleness | None = None,
        remember_ids: int = 100_000,
    ) -> None:
        if shards < 1 or buffer_size < 1:
            raise ValueError(f"shards and buffer_size must be ≥ 1, got {shards}, {buffer_size}")
        self.shards = shards
        self.buffer_size = buffer_size
        self.version = version
        """The newest committed version (the one the next commit builds on)."""
        self.staleness = staleness if staleness is not None else Staleness()
        self._held: list[dict[str, Held]] = [{} for _ in range(shards)]
        self._versions = [version] * shards
        self._order: dict[str, Held] = {}
        """Ids every shard holds, uncommitted, in the order they became complete."""
        self._acked = AppliedIds(remember_ids)
        self._committed = AppliedIds(remember_ids)
        self._commits: dict[int, Commit] = {}
        self._dropped: dict[str, str] = {}
        """Updates refused by a shard since the last commit: id → trainer."""
        self.complete = 0
        """Updates every shard has held (each counted once): the sharded ingest."""
        self.heard: set[int] = set()
        """The shards that have reported at least once."""

    def report(
        self,
        shard: int,
        version: int,
        held: Iterable[Held],
        refused: Mapping[str, str] | None = None,
    ) -> None:
        """Shard ``shard`` is at ``version`` and holds the parts ``held`` (all it holds); it
        refused its part of the updates ``refused`` (id → trainer): those are acknowledged
        (their trainers go on, as an unsharded aggregator's refusals do) and never committed."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} is not one of {self.shards}")
        for update_id, agent in (refused or {}).items():
            if update_id not in self._committed:
                self._committed.add(update_id)
                self._order.pop(update_id, None)
                self._dropped[update_id] = agent
                for other in self._held:
                    other.pop(update_id, None)
        self.heard.add(shard)
        self._versions[shard] = max(self._versions[shard], version)
        self._held[shard] = {h.update_id: h for h in held if h.update_id not in self._committed}
        for part in self._held[shard].values():
            if part.update_id not in self._order and all(
                part.update_id in other for other in self._held
            ):
                self._order[part.update_id] = part
                self.complete += 1

    def behind(self) -> list[tuple[int, Commit]]:
        """Shards whose last report is older than the newest commit, each with the commit it
        needs next (if still remembered)."""
        out = []
        for shard, version in enumerate(self._versions):
            commit = self._commits.get(version + 1)
            if version < self.version and commit is not None:
                out.append((shard, commit))
        return out

    def take_acks(self) -> dict[str, str]:
        """Trainer → update id for every update all shards hold, not acknowledged before."""
        acks = {}
        waiting = [(i, p.agent) for i, p in self._order.items()] + list(self._dropped.items())
        for update_id, agent in waiting:
            if update_id not in self._acked:
                self._acked.add(update_id)
                acks[agent] = update_id
        return acks

    @property
    def ready(self) -> int:
        """Updates every shard holds, not yet committed."""
        return len(self._order)

    def next_commit(self) -> Commit | None:
        """Commit the next version if K usable updates are held by every shard."""
        for update_id, part in list(self._order.items()):
            if self.staleness.too_stale(self.version - part.base_version):
                del self._order[update_id]  # every shard would drop it; it counts nowhere
                self._committed.add(update_id)
        if len(self._order) < self.buffer_size:
            return None
        ids = tuple(list(self._order)[: self.buffer_size])
        for update_id in ids:
            del self._order[update_id]
            self._committed.add(update_id)
            for held in self._held:
                held.pop(update_id, None)
        self.version += 1
        commit = Commit(self.version, ids, tuple(self._dropped))
        self._dropped.clear()
        self._commits[commit.version] = commit
        self._commits.pop(commit.version - KEEP_COMMITS, None)
        return commit

    def resume(self, version: int, commits: Mapping[int, Iterable[str]]) -> None:
        """After a restart: the newest committed version and the commits remembered then."""
        self.version = version
        self._versions = [min(v, version) for v in self._versions]
        for number, ids in commits.items():
            self._commits[int(number)] = Commit(int(number), tuple(ids))
            for update_id in ids:
                self._committed.add(update_id)
                self._acked.add(update_id)

    def recent_commits(self) -> dict[int, list[str]]:
        """The commits remembered, for the assembler's checkpoint."""
        return {number: list(c.ids) for number, c in sorted(self._commits.items())}

"""The commit ledger of sharded FedBuff: receipts once every shard holds an update, and every
shard folding the same K ids into each version."""

from __future__ import annotations

from agent.learning.shard_commit import CommitLedger, Held
from agent.learning.staleness import Staleness


def held(*ids: str, base: int = 0) -> list[Held]:
    return [Held(i, f"pi-{i}", base) for i in ids]


def test_an_update_is_acknowledged_once_every_shard_holds_it() -> None:
    ledger = CommitLedger(2, 3)
    ledger.report(0, 0, held("a", "b"))
    assert ledger.take_acks() == {}
    ledger.report(1, 0, held("b"))
    assert ledger.take_acks() == {"pi-b": "b"}
    assert ledger.take_acks() == {}  # each receipt once
    ledger.report(1, 0, held("b", "a"))
    assert ledger.take_acks() == {"pi-a": "a"}
    assert ledger.complete == 2


def test_commits_k_ids_held_by_all_in_the_order_they_completed() -> None:
    ledger = CommitLedger(2, 2)
    ledger.report(0, 0, held("a", "b", "c"))
    ledger.report(1, 0, held("c"))
    ledger.report(1, 0, held("c", "b", "a"))
    commit = ledger.next_commit()
    assert commit is not None
    assert (commit.version, commit.ids) == (1, ("c", "b"))
    assert ledger.version == 1
    assert ledger.ready == 1


def test_commit_order_and_membership() -> None:
    ledger = CommitLedger(2, 2)
    ledger.report(0, 0, held("a", "b", "c"))
    assert ledger.next_commit() is None
    ledger.report(1, 0, held("c"))
    assert ledger.next_commit() is None  # only c is held by both
    ledger.report(1, 0, held("c", "a"))
    commit = ledger.next_commit()
    assert commit is not None
    assert (commit.version, set(commit.ids)) == (1, {"a", "c"})
    assert ledger.next_commit() is None
    # A late report that still names committed ids does not bring them back.
    ledger.report(0, 0, held("a", "b", "c"))
    ledger.report(1, 0, held("a", "c", "b"))
    commit = ledger.next_commit()
    assert commit is None  # b alone, K = 2
    assert ledger.ready == 1


def test_no_update_is_committed_twice() -> None:
    ledger = CommitLedger(3, 1)
    seen: list[str] = []
    for round_ in range(5):
        ids = [f"u{round_}", f"u{round_ + 1}"]
        for shard in range(3):
            ledger.report(shard, ledger.version, held(*ids))
        while (commit := ledger.next_commit()) is not None:
            seen.extend(commit.ids)
    assert len(seen) == len(set(seen)) == 6


def test_too_stale_updates_are_never_committed() -> None:
    ledger = CommitLedger(2, 1, version=5, staleness=Staleness(max_staleness=2))
    for shard in range(2):
        ledger.report(shard, 5, [Held("old", "pi-0", 1), Held("new", "pi-1", 4)])
    commit = ledger.next_commit()
    assert commit is not None
    assert commit.ids == ("new",)
    assert ledger.next_commit() is None


def test_a_shard_behind_gets_the_commit_it_missed() -> None:
    ledger = CommitLedger(2, 1)
    for shard in range(2):
        ledger.report(shard, 0, held("a"))
    commit = ledger.next_commit()
    assert commit is not None
    ledger.report(0, 1, [])
    assert ledger.behind() == [(1, commit)]
    ledger.report(1, 1, [])
    assert ledger.behind() == []


def test_resume_remembers_commits() -> None:
    ledger = CommitLedger(2, 1)
    ledger.resume(3, {3: ["x"]})
    for shard in range(2):
        ledger.report(shard, 2, held("x", "y"))
    assert ledger.take_acks() == {"pi-y": "y"}
    commit = ledger.next_commit()
    assert commit is not None
    assert (commit.version, commit.ids) == (4, ("y",))
    assert ledger.recent_commits() == {3: ["x"], 4: ["y"]}


def test_an_update_a_shard_refused_is_acknowledged_never_committed_and_dropped() -> None:
    ledger = CommitLedger(2, 1)
    ledger.report(0, 0, held("bad", "good"))
    ledger.report(1, 0, held("good"), refused={"bad": "pi-bad"})
    assert ledger.take_acks() == {"pi-good": "good", "pi-bad": "bad"}
    commit = ledger.next_commit()
    assert commit is not None
    assert (commit.ids, commit.dropped) == (("good",), ("bad",))
    ledger.report(0, 1, held("bad"))  # shard 0 had not dropped it yet
    assert ledger.next_commit() is None
    assert ledger.take_acks() == {}

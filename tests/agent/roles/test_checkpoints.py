"""The aggregator's checkpoint files: a version's model part once, the rest on every save,
into one of two slots in turn (a torn or damaged slot is never believed)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.learning import aggregation
from agent.learning.assets import load_demo_model
from agent.learning.fedbuff import FedBuffAggregator
from agent.protocol import Topics
from agent.protocol.bundle import RoleBundle
from agent.protocol.codec import encode_tensor_segments, encode_tensors
from agent.roles.aggregator import Aggregator
from agent.roles.base import RoleContext
from agent.roles.checkpoints import IOV_MAX, SLOT_HEADER, Checkpoints, split_state
from agent.transport import BrokerConfig, Transport


def test_the_model_part_is_written_once_a_version_and_read_back_with_the_rest(
    tmp_path: Path,
) -> None:
    algo = FedBuffAggregator({"w": np.ones(4, np.float32)}, buffer_size=2)
    model, older, rest = split_state(algo.state_dict())
    assert sorted(model) == ["optimizer/step", "weights/w"]
    assert sorted(older) == ["older_ids"]
    assert "buffer/sums/w" in rest
    assert "applied_ids" in rest
    assert "ids_generation" in rest
    checkpoints = Checkpoints(tmp_path, keep=2)
    generation = algo.ids_generation
    checkpoints.save(
        0,
        encode_tensors(rest),
        {"a": 1},
        encode_tensors(model),
        split=True,
        older_ids=encode_tensors(older),
        ids_generation=generation,
    )
    written = (tmp_path / Checkpoints.model_name(0, generation)).stat().st_ino
    ids_written = (tmp_path / Checkpoints.ids_name(generation)).stat().st_ino
    algo.offer("u1", 0, {"w": np.full(4, 0.5, np.float32)})
    _, _, rest = split_state(algo.state_dict())
    checkpoints.save(0, encode_tensors(rest), {"a": 2}, None, split=True, ids_generation=generation)
    assert (tmp_path / Checkpoints.model_name(0, generation)).stat().st_ino == written
    assert (tmp_path / Checkpoints.ids_name(generation)).stat().st_ino == ids_written
    loaded = checkpoints.load_latest()
    assert loaded is not None
    state, meta = loaded
    assert meta["a"] == 2
    resumed = FedBuffAggregator({"w": np.zeros(4, np.float32)}, buffer_size=2)
    resumed.load_state_dict(state)
    assert "u1" in resumed.applied_ids
    np.testing.assert_array_equal(resumed.weights["w"], np.ones(4, np.float32))


@pytest.mark.parametrize("most_per_call", [None, 100_000])
def test_a_slot_written_from_views_holds_the_arrays_as_they_were_when_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most_per_call: int | None
) -> None:
    # The pieces of a large state: views of its arrays, more of them than one pwritev takes,
    # written (in calls that may each write less than asked, as Linux does past 2 GiB),
    # changed before the sync: the slot holds them as they were when written.
    tensors = {f"buffer/sums/t{i:03d}": np.full(20_000, i, np.float32) for i in range(600)}
    pieces = encode_tensor_segments(tensors)
    assert len(pieces) > IOV_MAX
    assert sum(isinstance(piece, memoryview) for piece in pieces) == len(tensors)
    if most_per_call is not None:
        pwritev = os.pwritev

        def partial(fd: int, buffers: list[memoryview], offset: int) -> int:
            left, some = most_per_call, []
            for buffer in buffers:
                some.append(buffer[:left])
                left -= some[-1].nbytes
                if not left:
                    break
            return pwritev(fd, some, offset)

        monkeypatch.setattr("agent.roles.checkpoints.os.pwritev", partial)
    checkpoints = Checkpoints(tmp_path)
    written = checkpoints.write(0, pieces, {"a": 1})
    for array in tensors.values():
        array += 1
    checkpoints.sync(written)
    loaded = checkpoints.load_latest()
    assert loaded is not None
    for i, name in enumerate(tensors):
        np.testing.assert_array_equal(loaded[0][name], np.full(20_000, i, np.float32))


def test_a_version_without_its_model_part_on_disk_is_refused(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="model part must be saved first"):
        checkpoints.save(3, b"", {}, None, split=True)
    assert not list(tmp_path.glob("*.slot"))


def test_old_model_files_go_and_the_state_lives_in_two_slots(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path, keep=2)
    model = encode_tensors({"weights/w": np.zeros(2, np.float32)})
    for version in range(5):
        checkpoints.save(version, encode_tensors({}), {}, model, split=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "state-a.slot",
        "state-b.slot",
        "v00000003.model.tensors",
        "v00000004.model.tensors",
    ]
    loaded = checkpoints.load_latest()
    assert loaded is not None
    assert loaded[1]["version"] == 4


def _state(value: float) -> bytes:
    return encode_tensors({"buffer/sums/w": np.full(1000, value, np.float32)})


def _saved_value(directory: Path) -> float:
    loaded = Checkpoints(directory).load_latest()
    assert loaded is not None
    state, meta = loaded
    assert float(state["buffer/sums/w"][0]) == meta["value"]
    return float(meta["value"])


def test_a_save_overwrites_the_older_slot_never_the_newest(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    for value in range(1, 6):
        checkpoints.save(0, _state(value), {"value": value})
        slot = ("state-a.slot", "state-b.slot")[(value - 1) % 2]
        assert _saved_value_of(tmp_path / slot) == value
        if value > 1:
            assert _saved_value_of(tmp_path / ("state-a.slot", "state-b.slot")[value % 2]) == (
                value - 1
            )
        assert _saved_value(tmp_path) == value
    # A new process (a restarted aggregator) goes on from the newest slot, and writes over the
    # other one.
    again = Checkpoints(tmp_path)
    again.save(0, _state(6), {"value": 6})
    assert _saved_value(tmp_path) == 6
    assert _saved_value_of(tmp_path / "state-a.slot") == 5
    assert _saved_value_of(tmp_path / "state-b.slot") == 6
    # As the aggregator resumes: load, then save; the load's reading of the slots serves.
    resumed = Checkpoints(tmp_path)
    assert resumed.load_latest() is not None
    resumed.save(0, _state(7), {"value": 7})
    assert _saved_value_of(tmp_path / "state-a.slot") == 7
    assert _saved_value(tmp_path) == 7


def _saved_value_of(slot: Path) -> float:
    from agent.roles.checkpoints import _read_slot

    read = _read_slot(slot)
    assert read is not None
    return float(json.loads(read[1])["value"])


@pytest.mark.parametrize("cut", [0, 7, SLOT_HEADER.size, SLOT_HEADER.size + 5, -1])
def test_a_torn_write_leaves_the_commit_before_it(tmp_path: Path, cut: int) -> None:
    """A crash while a slot is written leaves it cut anywhere: the older commit stands."""
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(0, _state(1), {"value": 1})
    checkpoints.save(0, _state(2), {"value": 2})
    checkpoints.save(0, _state(3), {"value": 3})  # into state-a.slot, over 1
    whole = (tmp_path / "state-a.slot").read_bytes()
    (tmp_path / "state-a.slot").write_bytes(whole[:cut] if cut >= 0 else whole[:-1])
    assert _saved_value(tmp_path) == 2
    # The next save goes over the torn slot, not over the whole one.
    Checkpoints(tmp_path).save(0, _state(4), {"value": 4})
    assert _saved_value_of(tmp_path / "state-b.slot") == 2
    assert _saved_value(tmp_path) == 4


def test_a_flipped_bit_anywhere_in_a_slot_is_caught(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(0, _state(1), {"value": 1})
    checkpoints.save(0, _state(2), {"value": 2})
    slot = tmp_path / "state-b.slot"
    whole = bytearray(slot.read_bytes())
    for offset in (8, 20, SLOT_HEADER.size + 2, len(whole) - 3):
        damaged = bytearray(whole)
        damaged[offset] ^= 0x10
        slot.write_bytes(damaged)
        assert _saved_value(tmp_path) == 1
    slot.write_bytes(whole)
    assert _saved_value(tmp_path) == 2


def test_a_shorter_state_over_a_longer_one_reads_back_exactly(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(0, _state(1), {"value": 1})
    big = encode_tensors({"buffer/sums/w": np.full(100_000, 9, np.float32)})
    checkpoints.save(0, big, {"value": 9})
    checkpoints.save(0, big, {"value": 9})
    checkpoints.save(0, _state(5), {"value": 5})  # over a slot four times its size
    assert _saved_value(tmp_path) == 5


def test_a_checkpoint_of_the_layout_before_slots_is_resumed_then_replaced(
    tmp_path: Path,
) -> None:
    """An aggregator upgraded in the middle of a job resumes from its state-file checkpoint;
    its first slot replaces that layout."""
    (tmp_path / "v00000002.tensors").write_bytes(_state(7))
    (tmp_path / "v00000002.model.tensors").write_bytes(
        encode_tensors({"weights/w": np.ones(2, np.float32)})
    )
    pointer = {"value": 7, "version": 2, "file": "v00000002.tensors"}
    pointer["model_file"] = "v00000002.model.tensors"
    (tmp_path / "latest.json").write_text(json.dumps(pointer))
    loaded = Checkpoints(tmp_path).load_latest()
    assert loaded is not None
    np.testing.assert_array_equal(loaded[0]["weights/w"], np.ones(2, np.float32))
    assert _saved_value(tmp_path) == 7
    Checkpoints(tmp_path).save(2, _state(8), {"value": 8}, None, split=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state-a.slot",
        "v00000002.model.tensors",
    ]
    assert _saved_value(tmp_path) == 8


def test_a_generation_s_older_ids_must_be_saved_first_and_the_newest_few_are_kept(
    tmp_path: Path,
) -> None:
    checkpoints = Checkpoints(tmp_path, keep=2)
    with pytest.raises(FileNotFoundError, match="older ids must be saved first"):
        checkpoints.save(0, encode_tensors({}), {}, ids_generation=7)
    for generation in (1, 2, 10):
        older = encode_tensors({"older_ids": np.frombuffer(b"u%d" % generation, np.uint8)})
        checkpoints.save(0, encode_tensors({}), {}, older_ids=older, ids_generation=generation)
    assert sorted(p.name for p in tmp_path.glob("ids-g*")) == [
        Checkpoints.ids_name(2),
        Checkpoints.ids_name(10),
    ]


def _aggregator(state_dir: Path, topics: Topics) -> Aggregator:
    """An aggregator role on ``state_dir`` that is never connected: its checkpoints only."""
    model = load_demo_model()
    config = {"name": "ids", "algorithm": {"mode": "async", "buffer_size": 2}, "stop": {}}
    bundle = RoleBundle(
        job="ids", role="aggregator", config=config, dataset={}, artifacts=model.to_artifacts()
    )

    async def report(event: object) -> None:
        return None

    return Aggregator(
        RoleContext(
            agent_id="agg",
            bundle=bundle,
            transport=Transport(BrokerConfig(urls=("mqtt://127.0.0.1:9",))),
            topics=topics,
            state_dir=state_dir,
            datasets={},
            run_cpu=asyncio.to_thread,
            report=report,
        )
    )


async def _prepared(
    state_dir: Path, topics: Topics
) -> tuple[Aggregator, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`_aggregator`, prepared, with its initial weights and a small delta for them."""
    role = _aggregator(state_dir, topics)
    await role.prepare()
    weights = dict(role.algo.weights)
    return role, weights, {name: np.full_like(value, 1e-3) for name, value in weights.items()}


def _moved(weights: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    """A global model to follow: ``weights`` moved by ``by`` (weights of its own)."""
    return {name: value + np.float32(by) for name, value in weights.items()}


async def test_ids_survive_a_version_that_goes_back_as_a_middle_aggregator_s_does(
    tmp_path: Path, topics: Topics
) -> None:
    # A middle aggregator makes version v + 1 from each batch it sends upstream, then follows
    # the global version v again: v's model file is on disk already, and the ids of the batch
    # must still reach the disk (they move to the older part when the version is followed).
    role, weights, delta = await _prepared(tmp_path, topics)
    role.algo.follow(weights, 5)
    await role._checkpoint()
    role.algo.offer("u1", 5, delta)
    await role._checkpoint()
    role.algo.offer("u2", 5, delta)  # K = 2: version 6 ...
    assert role.algo.version == 6
    role.algo.follow(weights, 5)  # ... and the global version 5 again
    await role._checkpoint()
    resumed = _aggregator(tmp_path, topics)
    assert await resumed.prepare()
    assert resumed.algo.applied_ids.export() == ["u1", "u2"]
    assert resumed.algo.offer("u1", 5, delta).status.value == "duplicate"
    # After a resume the files the checkpoint named are not written again: a crash before the
    # next slot then leaves the older slot with the very files it was written with.
    files = {p.name: p.stat().st_ino for p in (tmp_path / "checkpoints").glob("*.tensors")}
    resumed.algo.offer("u3", 5, delta)
    await resumed._checkpoint()
    after = {p.name: p.stat().st_ino for p in (tmp_path / "checkpoints").glob("*.tensors")}
    assert after == files
    again = _aggregator(tmp_path, topics)
    assert await again.prepare()
    assert again.algo.applied_ids.export() == ["u1", "u2", "u3"]


async def test_a_followed_version_is_resumed_with_its_own_weights(
    tmp_path: Path, topics: Topics
) -> None:
    # A middle aggregator's own version v + 1 (made from a batch it sends upstream) and the
    # global v + 1 it follows later carry one number and different weights: a resume must give
    # back the weights it followed, not the ones it made.
    role, weights, delta = await _prepared(tmp_path, topics)
    role.algo.follow(weights, 5)
    role.algo.offer("u1", 5, delta)
    role.algo.offer("u2", 5, delta)  # K = 2: its own version 6
    assert role.algo.version == 6
    await role._checkpoint()
    global_6 = _moved(weights, 0.25)
    role.algo.follow(global_6, 6)
    await role._checkpoint()
    resumed = _aggregator(tmp_path, topics)
    assert await resumed.prepare()
    assert resumed.algo.version == 6
    for name, value in global_6.items():
        np.testing.assert_array_equal(resumed.algo.weights[name], value)
    assert resumed.algo.applied_ids.export() == ["u1", "u2"]


async def test_a_commit_between_cuts_is_written_from_the_live_state_without_a_copy(
    tmp_path: Path, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once the cut's files are on disk a commit writes its slot straight from the buffer: the
    # state may change as soon as the slot is written, before it is synced, and the checkpoint
    # holds the state as it was when written.
    role, _, delta = await _prepared(tmp_path, topics)
    await role._checkpoint()  # the cut's model and older ids
    generation = role.algo.ids_generation
    parts = [Checkpoints.model_name(0, generation), Checkpoints.ids_name(generation)]
    inodes = [(tmp_path / "checkpoints" / part).stat().st_ino for part in parts]
    encoded = []
    monkeypatch.setattr(
        "agent.roles.aggregator.encode_tensors", lambda t: encoded.append(t) or encode_tensors(t)
    )
    role.algo.offer("u1", 0, delta)
    buffer = {k: np.array(v) for k, v in role.algo.state_dict().items() if k.startswith("buffer/")}
    async with role._save_lock:
        written = await role._write_live()
        role.algo.offer("u2", 0, delta)  # the buffer changes before the slot is synced
        await role._sync_live(written)
    assert encoded == []  # nothing was encoded into a copy
    # ...and the cut's files were not written again (a file written again is renamed into
    # place: a new inode).
    assert [(tmp_path / "checkpoints" / part).stat().st_ino for part in parts] == inodes
    resumed = _aggregator(tmp_path, topics)
    assert await resumed.prepare()
    assert resumed.algo.applied_ids.export() == ["u1"]
    for key, value in buffer.items():
        np.testing.assert_array_equal(resumed.algo.state_dict()[key], value)


async def test_a_cancelled_live_commit_waits_for_its_write_and_lets_the_slot_go(
    tmp_path: Path, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker thread writing the slot cannot be stopped: until it is done the save lock
    # stays held (a role started again on this directory writes the same slot next), and the
    # slot it wrote, never synced, is let go.
    role, _, delta = await _prepared(tmp_path, topics)
    await role._checkpoint()
    role.algo.offer("u1", 0, delta)
    role._unsaved = True
    go, written = threading.Event(), []
    write = Checkpoints.write

    def slow(self: Checkpoints, *args: Any, **kwargs: Any) -> Any:
        go.wait(10)
        written.append(write(self, *args, **kwargs))
        return written[-1]

    monkeypatch.setattr(Checkpoints, "write", slow)
    commit = asyncio.create_task(role._checkpoint())
    await asyncio.sleep(0.1)
    commit.cancel()
    await asyncio.sleep(0.1)
    assert not commit.done()
    assert role._save_lock.locked()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await commit
    assert not role._save_lock.locked()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(written[0].fd)  # closed


@pytest.mark.parametrize("capacity", [1, 3, 100_000])
async def test_a_resumed_aggregator_remembers_the_ids_its_last_checkpoint_had(
    tmp_path: Path, topics: Topics, monkeypatch: pytest.MonkeyPatch, capacity: int
) -> None:
    """Random runs of updates, versions made, versions followed (forward, to the number of
    its own newest version, and back as a middle aggregator does after each batch),
    checkpoints, crashes between a checkpoint's files and its slot, and resumes: a resumed
    aggregator always remembers exactly the ids, in their order of eviction, and has exactly
    the weights that its newest whole checkpoint had."""
    made = aggregation.AppliedIds.__init__

    def small(self: aggregation.AppliedIds, capacity_: int = 0, ids: Any = ()) -> None:
        made(self, capacity, ids)

    monkeypatch.setattr(aggregation.AppliedIds, "__init__", small)
    write_slot = Checkpoints._write_slot

    def torn(*args: Any) -> None:
        raise OSError("the power went before the slot was written")

    for seed in range(80 if capacity < 100 else 20):
        rng = random.Random(seed)
        state_dir = tmp_path / str(seed)
        role, weights, delta = await _prepared(state_dir, topics)

        saved: list[str] | None = None
        saved_weights: dict[str, np.ndarray] = {}
        for n in range(60):
            step = rng.random()
            if step < 0.45:
                before = role.algo.version
                role.algo.offer(f"u{n}", before, delta)
                if role.algo.version > before and rng.random() < 0.5:
                    role.algo.follow(_moved(weights, n), before)  # a middle: back to the global one
            elif step < 0.55:
                # The next global version, or the global one of its own version's number.
                role.algo.follow(_moved(weights, n), role.algo.version + rng.choice((0, 1)))
            else:
                crash = rng.random() < 0.2
                monkeypatch.setattr(
                    Checkpoints, "_write_slot", staticmethod(torn if crash else write_slot)
                )
                try:
                    await role._checkpoint()
                    saved = role.algo.applied_ids.export()
                    saved_weights = {k: np.array(v) for k, v in role.algo.weights.items()}
                except OSError:
                    assert crash
                monkeypatch.setattr(Checkpoints, "_write_slot", staticmethod(write_slot))
                if saved is not None and (crash or rng.random() < 0.3):
                    role = _aggregator(state_dir, topics)
                    assert await role.prepare()
                    assert role.algo.applied_ids.export() == saved, (seed, n)
                    for name, value in saved_weights.items():
                        np.testing.assert_array_equal(role.algo.weights[name], value, f"{seed} {n}")

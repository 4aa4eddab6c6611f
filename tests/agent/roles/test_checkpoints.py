"""The aggregator's checkpoint files: a version's model part once, the rest on every save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.learning.fedbuff import FedBuffAggregator
from agent.protocol.codec import encode_tensors
from agent.roles.aggregator import Checkpoints, split_model_state


def test_the_model_part_is_written_once_a_version_and_read_back_with_the_rest(
    tmp_path: Path,
) -> None:
    algo = FedBuffAggregator({"w": np.ones(4, np.float32)}, buffer_size=2)
    model, rest = split_model_state(algo.state_dict())
    assert sorted(model) == ["optimizer/step", "weights/w"]
    assert "buffer/sums/w" in rest
    assert "applied_ids" in rest
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(0, encode_tensors(rest), {"a": 1}, encode_tensors(model), split=True)
    written = (tmp_path / Checkpoints.model_name(0)).stat().st_mtime_ns
    algo.offer("u1", 0, {"w": np.full(4, 0.5, np.float32)})
    _, rest = split_model_state(algo.state_dict())
    checkpoints.save(0, encode_tensors(rest), {"a": 2}, None, split=True)
    assert (tmp_path / Checkpoints.model_name(0)).stat().st_mtime_ns == written
    loaded = checkpoints.load_latest()
    assert loaded is not None
    state, meta = loaded
    assert meta["a"] == 2
    resumed = FedBuffAggregator({"w": np.zeros(4, np.float32)}, buffer_size=2)
    resumed.load_state_dict(state)
    assert "u1" in resumed.applied_ids
    np.testing.assert_array_equal(resumed.weights["w"], np.ones(4, np.float32))


def test_a_version_without_its_model_part_on_disk_is_refused(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="model part must be saved first"):
        checkpoints.save(3, b"", {}, None, split=True)
    assert not (tmp_path / "latest.json").exists()


def test_old_files_of_both_kinds_go(tmp_path: Path) -> None:
    checkpoints = Checkpoints(tmp_path, keep=2)
    model = encode_tensors({"weights/w": np.zeros(2, np.float32)})
    for version in range(5):
        checkpoints.save(version, encode_tensors({}), {}, model, split=True)
    names = sorted(p.name for p in tmp_path.glob("v*"))
    assert names == [
        "v00000003.model.tensors",
        "v00000003.tensors",
        "v00000004.model.tensors",
        "v00000004.tensors",
    ]

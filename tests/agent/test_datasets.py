"""Local datasets: the three layouts, precise errors, summaries and their cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import DatasetConfig
from agent.datasets import (
    Dataset,
    DatasetError,
    cached_summaries,
    summarize,
    summarize_all,
    summarize_all_in_child,
)


def ds(path: Path, **options: Any) -> DatasetConfig:
    return DatasetConfig(name="d", path=path, tags=("vision",), **options)


def test_npz(tmp_path: Path) -> None:
    x = np.arange(60, dtype=np.float32).reshape(10, 2, 3)
    y = np.array([0, 1, 1, 2, 2, 2, 0, 1, 2, 2])
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    summary = summarize(ds(tmp_path / "d.npz"))
    assert summary.samples == 10
    assert summary.feature_shape == (2, 3)
    assert summary.label_counts == {"0": 2, "1": 3, "2": 5}
    assert summary.format == "npz"
    info = summary.to_info()
    assert info["tags"] == ["vision"]
    assert "path" not in info
    dataset = Dataset(ds(tmp_path / "d.npz"))
    np.testing.assert_array_equal(dataset.x, x)
    np.testing.assert_array_equal(dataset.y, y)


def test_schema_hash_depends_on_schema_not_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "a.npz", x=rng.random((5, 4)), y=np.array([0, 1, 0, 1, 1]))
    np.savez(tmp_path / "b.npz", x=rng.random((9, 4)), y=np.array([1, 0, 0, 1, 1, 0, 0, 0, 1]))
    np.savez(tmp_path / "c.npz", x=rng.random((5, 5)), y=np.array([0, 1, 0, 1, 1]))
    np.savez(tmp_path / "e.npz", x=rng.random((5, 4)), y=np.array([0, 1, 0, 1, 2]))
    a, b, c, e = (summarize(ds(tmp_path / f"{n}.npz")).schema_hash for n in "abce")
    assert a == b
    assert len({a, c, e}) == 3


def test_npy_folder_is_memory_mapped(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones((7, 3), dtype=np.float16))
    np.save(folder / "y.npy", np.linspace(0, 1, 7).reshape(7, 1))
    summary = summarize(ds(folder))
    assert (summary.samples, summary.feature_shape, summary.format) == (7, (3,), "npy_dir")
    assert summary.label_counts is None  # a continuous target
    dataset = Dataset(ds(folder))
    assert isinstance(dataset.x, np.memmap)
    assert dataset.y.shape == (7,)


def test_csv_with_header_and_label_column(tmp_path: Path) -> None:
    path = tmp_path / "iris.csv"
    path.write_text("label,a,b\n1,0.5,2\n0,1.5,3\n1,2.5,4\n")
    summary = summarize(ds(path, label_column="label"))
    assert (summary.samples, summary.feature_shape) == (3, (2,))
    assert summary.label_counts == {"0": 1, "1": 2}
    x = Dataset(ds(path, label_column="label")).x
    np.testing.assert_array_equal(x, [[0.5, 2], [1.5, 3], [2.5, 4]])


def test_csv_without_header_uses_the_last_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("0.1;0.2;3\n0.3;0.4;4\n\n")
    dataset = Dataset(ds(path))
    np.testing.assert_array_equal(dataset.y, [3, 4])
    assert dataset.y.dtype == np.int64


def pickled(path: Path) -> None:
    np.savez(path, x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "d: {p}/d.npz does not exist"),
        (lambda p: np.savez(p / "d.npz", a=np.ones(3)), "has no array 'x' or 'y' (arrays: a)"),
        (
            lambda p: np.savez(p / "d.npz", x=np.ones((3, 2)), y=np.ones(4)),
            "d: x has 3 samples but y has 4",
        ),
        (
            lambda p: np.savez(p / "d.npz", x=np.array([[1, 2], [3, np.nan]]), y=np.ones(2)),
            "d: x contains 1 NaN or infinite value(s) (first at sample 1)",
        ),
        (
            lambda p: np.savez(p / "d.npz", x=np.array([["a", "b"]]), y=np.ones(1)),
            "d: x has non-numeric dtype <U1",
        ),
        (
            lambda p: np.savez(p / "d.npz", x=np.ones((0, 4)), y=np.ones(0)),
            "d: x is empty (0 samples)",
        ),
        (lambda p: pickled(p / "d.npz"), "x in {p}/d.npz is an object array (pickled); refused"),
        (lambda p: (p / "d.npz").write_text("not a zip"), "cannot read {p}/d.npz as npz"),
        (
            lambda p: np.save(p / "d.npy", np.ones(3)) or (p / "d.npy").rename(p / "d.npz"),
            "holds a single array, not an .npz archive",
        ),
        (
            lambda p: np.savez(p / "d.npz", x=np.ones((2, 2)), y=np.ones((2, 3))),
            "y must hold one label per sample, got shape (2, 3)",
        ),
    ],
)
def test_bad_npz(tmp_path: Path, make: Any, message: str) -> None:
    make(tmp_path)
    with pytest.raises(DatasetError) as caught:
        summarize(ds(tmp_path / "d.npz"))
    assert message.format(p=tmp_path) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("", {}, "d.csv is empty"),
        ("a,b,label\n", {}, "has a header line and no data"),
        ("1,2,3\n4,5\n", {}, "d.csv line 2 has 2 columns, expected 3"),
        ("a,b,c\n1,2,3\n4,x,6\n", {}, "line 3, column 'b': 'x' is not a number"),
        ("1,2,cat\n", {}, "(labels must be numbers"),
        ("1,,2\n", {}, "line 1, column 2: '' is not a number"),
        ("a,b\n1,2\n", {"label_column": "y"}, "label_column 'y' is not in the header (a, b)"),
        ("1,2\n", {"label_column": "y"}, "names a column but"),
        ("1,2\n", {"label_column": 5}, "label_column 5 is outside the 2 columns"),
        ("1,nan,2\n", {}, "x contains 1 NaN or infinite value(s) (first at sample 0)"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, options: dict[str, Any], message: str) -> None:
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DatasetError) as caught:
        summarize(ds(tmp_path / "d.csv", **options))
    assert message in str(caught.value)
    assert str(caught.value).startswith("d: ")


def test_bad_csv_encoding(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes(b"1,2\n\xff\xfe,3\n")
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        summarize(ds(tmp_path / "d.csv"))


def test_bad_npy_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, 2)))
    with pytest.raises(DatasetError, match=r"y.npy does not exist \(.* has x.npy\)"):
        summarize(ds(tmp_path))


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_text("")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        summarize(ds(tmp_path / "d.parquet"))


def test_summaries_are_cached_by_file_version(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((4, 2)), y=np.array([0, 1, 0, 1]))
    cache = tmp_path / "cache.json"
    [first] = summarize_all([ds(path)], cache)
    assert json.loads(cache.read_text())["d"]["summary"]["samples"] == 4
    # A cached entry is used as is: prove it by editing the cache.
    raw = json.loads(cache.read_text())
    raw["d"]["summary"]["samples"] = 999
    cache.write_text(json.dumps(raw))
    assert summarize_all([ds(path)], cache)[0].samples == 999
    # A new file version is summarised again.
    np.savez(path, x=np.ones((6, 2)), y=np.array([0, 1, 0, 1, 1, 1]))
    [second] = summarize_all([ds(path)], cache)
    assert (first.samples, second.samples) == (4, 6)


def test_summarize_all_names_the_bad_dataset(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((2, 2)), y=np.array([0, 1]))
    configs = [
        DatasetConfig(name="good", path=good),
        DatasetConfig(name="bad", path=tmp_path / "missing.npz"),
    ]
    with pytest.raises(DatasetError, match=r"^bad: .*missing.npz does not exist$"):
        summarize_all(configs, tmp_path / "cache.json")


async def test_the_daemon_summarizes_in_a_child_and_reads_a_fresh_cache_itself(
    tmp_path: Path,
) -> None:
    """summarize_all_in_child: the same summaries as summarize_all, computed by a child process
    (it writes the cache), then read from the cache without one."""
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((5, 3), np.float32), y=np.array([0, 1, 2, 1, 1]))
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n1,2,0\n3,4,1\n")
    configs = [ds(path), DatasetConfig(name="t", path=csv, tags=("tab",), label_column="label")]
    cache = tmp_path / "cache.json"
    assert cached_summaries(configs, cache) is None
    in_child = await summarize_all_in_child(configs, cache)
    assert in_child == summarize_all(configs, None)
    assert in_child[1].tags == ("tab",)
    raw = json.loads(cache.read_text())
    raw["d"]["summary"]["samples"] = 999
    cache.write_text(json.dumps(raw))
    assert [s.samples for s in await summarize_all_in_child(configs, cache)] == [999, 2]


async def test_a_bad_dataset_summarized_in_a_child_is_named(tmp_path: Path) -> None:
    configs = [DatasetConfig(name="bad", path=tmp_path / "missing.npz")]
    with pytest.raises(DatasetError, match=r"^bad: .*missing.npz does not exist$"):
        await summarize_all_in_child(configs, tmp_path / "cache.json")

"""Local datasets: loading, validation and the summary an agent advertises.

Three layouts, chosen by ``format`` or, with ``format = "auto"``, by the path:

* ``.npz`` with arrays ``x`` (features, first axis = samples) and ``y`` (labels, one per sample);
* ``.csv`` / ``.tsv`` / ``.txt``: one sample per line, an optional header line, the label in the
  last column unless ``label_column`` names another (by header name or 0-based index);
* a directory holding ``x.npy`` and ``y.npy`` (memory-mapped, so a large dataset costs no RAM
  until a trainer reads it).

Arrays are never unpickled (``allow_pickle=False``): an object array is refused. Validation
checks what a trainer would trip over later, and says exactly what is wrong: a missing file,
missing arrays, a length mismatch between ``x`` and ``y``, non-numeric or empty data, NaN or
infinite values (with the first offending sample), a ragged CSV line.

The summary (:class:`DatasetSummary`: samples, feature shape, label counts, a schema hash) is
what goes into the agent's retained ``info`` message. It is computed once per file version and
cached in the state directory, keyed by the files' size and modification time.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import DatasetConfig
from agent.process import communicate

MAX_LABEL_CLASSES = 1000
"""More distinct labels than this and ``y`` is treated as a regression target (no counts)."""
_BLOCK_BYTES = 16 * 1024 * 1024
_CACHE_VERSION = 1
_CSV_SUFFIXES = (".csv", ".tsv", ".txt")

if TYPE_CHECKING:
    import numpy.typing as npt

    Array = npt.NDArray[Any]
else:
    Array = Any  # numpy is imported where arrays are read: an idle agent never maps it


class DatasetError(ValueError):
    """A dataset that cannot be used; ``str(error)`` starts with its name and says why."""


@dataclass(frozen=True)
class DatasetSummary:
    """What the fleet may know about a dataset: its shape and label balance, never its data."""

    name: str
    tags: tuple[str, ...]
    format: str
    path: str
    samples: int
    feature_shape: tuple[int, ...]
    x_dtype: str
    y_dtype: str
    label_counts: dict[str, int] | None
    """Samples per label (labels as strings, JSON keys), or ``None`` for a continuous target."""
    schema_hash: str
    """SHA-256 (first 16 hex digits) of x's dtype, the feature shape, y's dtype and the label
    set: two datasets with the same hash can train the same model. Not a hash of the data."""

    def to_info(self) -> dict[str, Any]:
        """The entry in the agent's ``info`` document (the path stays on the device)."""
        return {
            "name": self.name,
            "tags": list(self.tags),
            "format": self.format,
            "samples": self.samples,
            "feature_shape": list(self.feature_shape),
            "x_dtype": self.x_dtype,
            "y_dtype": self.y_dtype,
            "label_counts": self.label_counts,
            "schema_hash": self.schema_hash,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DatasetSummary:
        return cls(
            name=raw["name"],
            tags=tuple(raw["tags"]),
            format=raw["format"],
            path=raw["path"],
            samples=int(raw["samples"]),
            feature_shape=tuple(int(d) for d in raw["feature_shape"]),
            x_dtype=raw["x_dtype"],
            y_dtype=raw["y_dtype"],
            label_counts=raw["label_counts"],
            schema_hash=raw["schema_hash"],
        )


class Dataset:
    """A configured local dataset; satisfies :class:`agent.roles.base.LocalDataset`.

    ``x`` and ``y`` are loaded on first access (blocking: roles read them through
    ``ctx.run_cpu``), memory-mapped where the format allows it.
    """

    def __init__(self, config: DatasetConfig) -> None:
        self.config = config
        self._arrays: tuple[Array, Array] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def x(self) -> Array:
        return self.arrays()[0]

    @property
    def y(self) -> Array:
        return self.arrays()[1]

    @property
    def format(self) -> str:
        return resolve_format(self.config)

    def arrays(self) -> tuple[Array, Array]:
        """``(x, y)``, loaded once and checked for matching lengths; :class:`DatasetError`."""
        if self._arrays is None:
            x, y = _load(self.config)
            _check_shapes(self.config.name, x, y)
            self._arrays = (x, y if y.ndim == 1 else y.reshape(-1))
        return self._arrays

    def release(self) -> None:
        """Forget the loaded arrays (memory maps are closed when nothing else holds them)."""
        self._arrays = None

    def summarize(self) -> DatasetSummary:
        """Load, validate every value and summarise; raises :class:`DatasetError`."""
        return summarize(self.config)


def resolve_format(config: DatasetConfig) -> str:
    if config.format != "auto":
        return config.format
    path = config.path
    if path.is_dir():
        return "npy_dir"
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in _CSV_SUFFIXES:
        return "csv"
    raise DatasetError(
        f"{config.name}: cannot tell the format of {path} (expected .npz, .csv, .tsv or a "
        "directory with x.npy and y.npy; or set format)"
    )


def summarize(config: DatasetConfig) -> DatasetSummary:
    """Validate one dataset completely and summarise it (blocking; run it off the event loop)."""
    name = config.name
    x, y = _load(config)
    _check_shapes(name, x, y)
    y = y.reshape(-1)
    _check_numeric(name, "x", x)
    _check_numeric(name, "y", y)
    _check_finite(name, "x", x)
    _check_finite(name, "y", y)
    counts = _label_counts(y)
    feature_shape = tuple(int(d) for d in x.shape[1:])
    schema = {
        "x_dtype": x.dtype.str,
        "feature_shape": list(feature_shape),
        "y_dtype": y.dtype.str,
        "labels": sorted(counts, key=_label_order) if counts is not None else "continuous",
    }
    digest = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16]
    return DatasetSummary(
        name=name,
        tags=config.tags,
        format=resolve_format(config),
        path=str(config.path),
        samples=int(x.shape[0]),
        feature_shape=feature_shape,
        x_dtype=str(x.dtype),
        y_dtype=str(y.dtype),
        label_counts=counts,
        schema_hash=digest,
    )


# -- loading -------------------------------------------------------------------------------------


def _load(config: DatasetConfig) -> tuple[Array, Array]:
    name, path = config.name, config.path
    if not path.exists():
        raise DatasetError(f"{name}: {path} does not exist")
    fmt = resolve_format(config)
    try:
        if fmt == "npz":
            return _load_npz(name, path)
        if fmt == "npy_dir":
            return _load_npy_dir(name, path)
        return _load_csv(config)
    except DatasetError:
        raise
    except PermissionError:
        raise DatasetError(f"{name}: {path} is not readable by this user") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{name}: cannot read {path} as {fmt}: {_short(exc)}") from None


def _load_npz(name: str, path: Path) -> tuple[Array, Array]:
    import numpy as np

    if path.is_dir():
        raise DatasetError(f"{name}: {path} is a directory, not an .npz file")
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DatasetError(f"{name}: {path} holds a single array, not an .npz archive of x and y")
    with loaded as archive:
        present = sorted(archive.files)
        missing = [k for k in ("x", "y") if k not in present]
        if missing:
            raise DatasetError(
                f"{name}: {path} has no array {' or '.join(repr(m) for m in missing)} "
                f"(arrays: {', '.join(present) or 'none'})"
            )
        return _array(name, "x", archive, path), _array(name, "y", archive, path)


def _array(name: str, key: str, archive: Any, path: Path) -> Array:
    import numpy as np

    try:
        return np.asarray(archive[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DatasetError(
                f"{name}: {key} in {path} is an object array (pickled); refused"
            ) from None
        raise


def _load_npy_dir(name: str, path: Path) -> tuple[Array, Array]:
    import numpy as np

    if not path.is_dir():
        raise DatasetError(f"{name}: {path} is not a directory with x.npy and y.npy")
    arrays: list[Array] = []
    for key in ("x", "y"):
        file = path / f"{key}.npy"
        if not file.exists():
            present = ", ".join(sorted(p.name for p in path.glob("*.npy"))) or "no .npy files"
            raise DatasetError(f"{name}: {file} does not exist ({path} has {present})")
        try:
            arrays.append(np.load(file, mmap_mode="r", allow_pickle=False))
        except ValueError as exc:
            if "allow_pickle" in str(exc) or "object" in str(exc).lower():
                raise DatasetError(
                    f"{name}: {file} is an object array (pickled); refused"
                ) from None
            raise DatasetError(f"{name}: cannot read {file}: {_short(exc)}") from None
    return arrays[0], arrays[1]


def _load_csv(config: DatasetConfig) -> tuple[Array, Array]:
    import numpy as np

    name, path = config.name, config.path
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{name}: {path} is not UTF-8 text (byte {exc.start})") from None
    delimiter = "\t" if path.suffix.lower() == ".tsv" else _sniff_delimiter(text)
    rows = [
        (number, row)
        for number, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1)
        if row and any(cell.strip() for cell in row)
    ]
    if not rows:
        raise DatasetError(f"{name}: {path} is empty")
    header: list[str] | None = None
    if not any(_is_number(cell) for cell in rows[0][1]):  # a header names every column
        header = [cell.strip() for cell in rows[0][1]]
        rows = rows[1:]
    if not rows:
        raise DatasetError(f"{name}: {path} has a header line and no data")
    width = len(header) if header is not None else len(rows[0][1])
    if width < 2:
        raise DatasetError(f"{name}: {path} has {width} column; need features and a label")
    label = _label_index(config, header, width)
    columns = [repr(h) for h in header] if header else [str(i + 1) for i in range(width)]
    data = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise DatasetError(
                f"{name}: {path} line {line} has {len(row)} columns, expected {width}"
            )
        for j, cell in enumerate(row):
            try:
                data[i, j] = float(cell)
            except ValueError:
                raise DatasetError(
                    f"{name}: {path} line {line}, column {columns[j]}: {cell.strip()!r} is not "
                    "a number"
                    + (
                        " (labels must be numbers: encode classes as integers)"
                        if j == label
                        else ""
                    )
                ) from None
    x = np.delete(data, label, axis=1).astype(np.float32)
    y = data[:, label]
    if np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return x, y


def _sniff_delimiter(text: str) -> str:
    sample = text[:4096]
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t ").delimiter
    except csv.Error:
        return ","


def _label_index(config: DatasetConfig, header: list[str] | None, width: int) -> int:
    column = config.label_column
    where = f"{config.name}: label_column"
    if column is None:
        return width - 1
    if isinstance(column, int):
        index = column + width if column < 0 else column
        if not 0 <= index < width:
            raise DatasetError(f"{where} {column} is outside the {width} columns")
        return index
    if header is None:
        raise DatasetError(f"{where} {column!r} names a column but {config.path} has no header")
    if column not in header:
        raise DatasetError(f"{where} {column!r} is not in the header ({', '.join(header)})")
    return header.index(column)


# -- checks --------------------------------------------------------------------------------------


def _check_shapes(name: str, x: Array, y: Array) -> None:
    if x.ndim == 0 or y.ndim == 0:
        raise DatasetError(f"{name}: x and y must be arrays with samples on the first axis")
    if x.shape[0] == 0:
        raise DatasetError(f"{name}: x is empty (0 samples)")
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise DatasetError(f"{name}: y must hold one label per sample, got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(f"{name}: x has {x.shape[0]} samples but y has {y.shape[0]}")


def _check_numeric(name: str, key: str, array: Array) -> None:
    if array.dtype.kind not in "biuf":
        raise DatasetError(f"{name}: {key} has non-numeric dtype {array.dtype}")


def _check_finite(name: str, key: str, array: Array) -> None:
    import numpy as np

    if array.dtype.kind != "f":
        return
    row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
    step = max(1, _BLOCK_BYTES // row_bytes)
    bad_total = 0
    first: int | None = None
    for start in range(0, array.shape[0], step):
        block = np.asarray(array[start : start + step])
        finite = np.isfinite(block)
        if not finite.all():
            per_row = ~finite.reshape(block.shape[0], -1).all(axis=1)
            if first is None:
                first = start + int(np.argmax(per_row))
            bad_total += int(finite.size - np.count_nonzero(finite))
    if first is not None:
        raise DatasetError(
            f"{name}: {key} contains {bad_total} NaN or infinite value(s) (first at sample {first})"
        )


def _label_counts(y: Array) -> dict[str, int] | None:
    import numpy as np

    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        return None
    values, counts = np.unique(np.asarray(y), return_counts=True)
    if len(values) > MAX_LABEL_CLASSES:
        return None
    return {_label_key(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _label_order(key: str) -> tuple[int, float | str]:
    try:
        return (0, float(key))
    except ValueError:
        return (1, key)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- summaries for many datasets, cached --------------------------------------------------------


def _fingerprint(config: DatasetConfig) -> list[Any]:
    files = (
        [config.path / "x.npy", config.path / "y.npy"] if config.path.is_dir() else [config.path]
    )
    stats = []
    for file in files:
        st = file.stat()
        stats.append([str(file), st.st_size, st.st_mtime_ns])
    return [_CACHE_VERSION, config.format, config.label_column, list(config.tags), stats]


def summarize_all(
    configs: Iterable[DatasetConfig], cache_file: Path | None = None
) -> list[DatasetSummary]:
    """Summaries of every dataset, from ``cache_file`` where the files have not changed.

    Raises :class:`DatasetError` for the first bad dataset. Blocking: run it off the loop.
    """
    cache = _read_cache(cache_file)
    summaries: list[DatasetSummary] = []
    fresh: dict[str, Any] = {}
    for config in configs:
        try:
            key = _fingerprint(config)
        except FileNotFoundError:
            summarize(config)  # raises the precise error
            raise  # pragma: no cover - summarize always raises here
        except OSError as exc:
            raise DatasetError(f"{config.name}: cannot read {config.path}: {_short(exc)}") from None
        summary = _cached(cache.get(config.name), key)
        if summary is None:
            summary = summarize(config)
        fresh[config.name] = {"key": key, "summary": asdict(summary)}
        summaries.append(summary)
    if cache_file is not None and fresh != cache:
        try:
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(fresh, sort_keys=True), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a cache that cannot be written only costs a recomputation
    return summaries


def cached_summaries(
    configs: Iterable[DatasetConfig], cache_file: Path | None
) -> list[DatasetSummary] | None:
    """Every dataset's summary from ``cache_file`` if none of their files changed since it was
    written, else ``None``. Reads no array (and imports no numpy)."""
    cache = _read_cache(cache_file)
    summaries = []
    for config in configs:
        try:
            summary = _cached(cache.get(config.name), _fingerprint(config))
        except OSError:
            return None
        if summary is None:
            return None
        summaries.append(summary)
    return summaries


async def summarize_all_in_child(
    configs: Sequence[DatasetConfig], cache_file: Path | None, timeout: float = 600.0
) -> list[DatasetSummary]:
    """:func:`summarize_all` for the agent daemon: from the cache when it is fresh, else in a
    short-lived child process (``python -m agent.datasets``, as the runtime probe runs), so
    the daemon never maps numpy while it idles: 15 MB of resident memory on a 1 GB Pi, a
    quarter of the idle agent's. Raises :class:`DatasetError` as :func:`summarize_all` does."""
    cached = await asyncio.to_thread(cached_summaries, configs, cache_file)
    if cached is not None:
        return cached
    request = {
        "cache": None if cache_file is None else str(cache_file),
        "datasets": [
            {**asdict(config), "path": str(config.path), "tags": list(config.tags)}
            for config in configs
        ],
    }
    try:
        code, out, err = await communicate(
            [sys.executable, "-m", "agent.datasets"], json.dumps(request).encode(), timeout
        )
    except TimeoutError:
        raise DatasetError(f"summarizing the datasets took more than {timeout:g} s") from None
    try:
        answer = json.loads(out)
        error = answer.get("error")
        summaries = [DatasetSummary.from_dict(raw) for raw in answer.get("summaries", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        detail = err.decode(errors="replace").strip()[-300:] or f"exit code {code}"
        raise DatasetError(f"summarizing the datasets failed: {detail}") from None
    if error is not None:
        raise DatasetError(str(error))
    return summaries


def _read_cache(cache_file: Path | None) -> dict[str, Any]:
    if cache_file is None:
        return {}
    try:
        loaded = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _cached(entry: Any, key: list[Any]) -> DatasetSummary | None:
    """The summary in a cache ``entry`` written for the same files (``key``), or ``None``."""
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    try:
        return DatasetSummary.from_dict(entry["summary"])
    except (KeyError, TypeError, ValueError):
        return None


def _child_main() -> None:
    """``python -m agent.datasets``: summarize the datasets named on stdin (JSON, from
    :func:`summarize_all_in_child`) and write the summaries, or the error, as JSON."""
    request = json.load(sys.stdin)
    configs = [
        DatasetConfig(**{**raw, "path": Path(raw["path"]), "tags": tuple(raw["tags"])})
        for raw in request["datasets"]
    ]
    cache = None if request["cache"] is None else Path(request["cache"])
    try:
        summaries = summarize_all(configs, cache)
    except DatasetError as exc:
        json.dump({"error": str(exc)}, sys.stdout)
        return
    json.dump({"summaries": [asdict(summary) for summary in summaries]}, sys.stdout)


if __name__ == "__main__":
    _child_main()

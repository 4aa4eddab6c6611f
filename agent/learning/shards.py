"""The slice plan of a sharded aggregator: which bytes of the model each shard owns.

Sharded aggregation splits the flattened parameters of a model into S contiguous byte ranges,
balanced by bytes, one per aggregator shard (the parameter-server partitioning of Li et al.,
OSDI 2014, applied to FedBuff's server, Nguyen et al. 2022). A range may cut a tensor: an 11M
model is one or two large tensors, and a plan by whole tensors could not balance it. Each
shard sees its slice as a small model of its own, one 1-D tensor per piece, so the FedBuff
server, its checks and the coordinate-wise server optimizers run on it unchanged.

Pure numpy and deterministic: every trainer, shard and assembler derives the same plan from the
model's names, shapes and dtypes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.learning.aggregation import ModelSpec, TensorSpec
from agent.learning.arrays import Array


@dataclass(frozen=True, slots=True)
class Piece:
    """Elements ``start:stop`` of one tensor, flattened in C order: one shard's share of it
    (a parameter-server key range, Li et al., OSDI 2014)."""

    tensor: str
    start: int
    stop: int
    whole: bool
    """The piece is the whole tensor (its key is then the tensor's own name)."""

    @property
    def key(self) -> str:
        """The piece's tensor name in a shard's slice: ``name`` or ``name[start:stop]``."""
        return self.tensor if self.whole else f"{self.tensor}[{self.start}:{self.stop}]"

    @property
    def size(self) -> int:
        return self.stop - self.start


class SlicePlan:
    """S contiguous, byte-balanced slices of a model's flattened parameters (model order): the
    parameter-server partitioning of Li et al. (OSDI 2014) for FedBuff's server (Nguyen et al.
    2022).

    Slice ``s`` covers bytes ``[round(s·B/S), round((s+1)·B/S))`` of the B parameter bytes, each
    cut moved to the nearest element boundary. Every element belongs to exactly one slice and
    no slice is empty (a model needs at least S elements).
    """

    def __init__(self, spec: ModelSpec, shards: int) -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards: expected an integer ≥ 1, got {shards!r}")
        if spec.size < shards:
            raise ValueError(f"a model of {spec.size} parameters cannot be cut into {shards}")
        self.spec = spec
        self.shards = shards
        layout: list[tuple[str, TensorSpec, int]] = []  # name, spec, first byte
        offset = 0
        for name, tensor in spec.items():
            layout.append((name, tensor, offset))
            offset += math.prod(tensor.shape) * tensor.dtype.itemsize
        total = offset
        cuts = [
            0,
            *(self._snap(layout, round(s * total / shards)) for s in range(1, shards)),
            total,
        ]
        if any(a >= b for a, b in itertools.pairwise(cuts)):
            raise ValueError(f"the model's {spec.size} parameters leave a shard of {shards} empty")
        self.slices: tuple[tuple[Piece, ...], ...] = tuple(
            self._pieces(layout, lo, hi) for lo, hi in itertools.pairwise(cuts)
        )

    @staticmethod
    def _snap(layout: Sequence[tuple[str, TensorSpec, int]], cut: int) -> int:
        """``cut`` moved to the nearest element boundary of the tensor it falls in."""
        for _name, tensor, first in reversed(layout):
            if cut >= first:
                item = tensor.dtype.itemsize
                return first + round((cut - first) / item) * item
        return 0

    @staticmethod
    def _pieces(
        layout: Sequence[tuple[str, TensorSpec, int]], lo: int, hi: int
    ) -> tuple[Piece, ...]:
        pieces = []
        for name, tensor, first in layout:
            item, count = tensor.dtype.itemsize, math.prod(tensor.shape)
            last = first + count * item
            if last <= lo or first >= hi or count == 0:
                continue
            start, stop = (max(lo, first) - first) // item, (min(hi, last) - first) // item
            pieces.append(Piece(name, start, stop, whole=start == 0 and stop == count))
        return tuple(pieces)

    def slice_spec(self, shard: int) -> ModelSpec:
        """Shard ``shard``'s slice as a model: one 1-D tensor per piece."""
        return ModelSpec(
            {p.key: TensorSpec((p.size,), self.spec[p.tensor].dtype) for p in self.slices[shard]}
        )

    def cut(self, tensors: Mapping[str, npt.ArrayLike], shard: int) -> dict[str, Array]:
        """Shard ``shard``'s pieces of ``tensors`` (views where the tensors are contiguous)."""
        out = {}
        for piece in self.slices[shard]:
            flat = np.asarray(tensors[piece.tensor]).reshape(-1)
            out[piece.key] = flat[piece.start : piece.stop]
        return out

    def split(self, tensors: Mapping[str, npt.ArrayLike]) -> list[dict[str, Array]]:
        """Every shard's pieces of ``tensors``, in shard order."""
        return [self.cut(tensors, shard) for shard in range(self.shards)]

    def join(self, parts: Sequence[Mapping[str, npt.ArrayLike]]) -> dict[str, Array]:
        """The model's tensors from every shard's slice (:meth:`split`'s inverse)."""
        if len(parts) != self.shards:
            raise ValueError(f"expected {self.shards} slices, got {len(parts)}")
        flat = {
            name: np.empty(math.prod(tensor.shape), dtype=tensor.dtype)
            for name, tensor in self.spec.items()
        }
        for pieces, part in zip(self.slices, parts, strict=True):
            for piece in pieces:
                flat[piece.tensor][piece.start : piece.stop] = np.asarray(part[piece.key])
        return {name: flat[name].reshape(tensor.shape) for name, tensor in self.spec.items()}

    def nbytes(self, shard: int) -> int:
        """Parameter bytes of shard ``shard``'s slice."""
        return sum(p.size * self.spec[p.tensor].dtype.itemsize for p in self.slices[shard])

"""The assembler's model: versions made by a sharded FedBuff aggregator, slice by slice.

A sharded aggregator's shards each fold the same committed K updates into their own slice
(FedBuff, Nguyen et al. 2022, over a parameter-server partition); the assembler joins the slices
of each version into the whole model. :class:`AssembledFedBuff` is that whole model with the
FedBuff server's bookkeeping (version, counters, applied update ids, checkpoint), so the
aggregator role's evaluation, stop rules, checkpoints and publishing work on it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy.typing as npt

from agent.learning.fedbuff import FedBuffAggregator


class AssembledFedBuff(FedBuffAggregator):
    """A FedBuff model whose versions are assembled from shards (Nguyen et al. 2022) instead of
    computed here: :meth:`adopt` takes each one with the update ids it folded."""

    def adopt(
        self, weights: Mapping[str, npt.ArrayLike], version: int, update_ids: Iterable[str]
    ) -> None:
        """Version ``version`` (newer than this one) is ``weights``, made from the updates
        ``update_ids`` (those of every version in between). ``ValueError`` if the version is not
        newer or the weights are not this model's."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than {self.version}")
        ids = list(update_ids)
        versions = version - self.version
        self.follow(weights, version)
        for update_id in ids:
            self._ids.add(update_id)
        self._counters.received += len(ids)
        self._counters.applied += len(ids)
        self._counters.versions += versions

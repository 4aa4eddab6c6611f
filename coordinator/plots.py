"""Learning curves saved as PNG files: ``ember demo``'s accuracy, ``ember jobs report``'s
accuracy and loss, and the examples' comparisons of algorithms.

matplotlib (Agg backend, no display needed) is an extra, ``ember-fl[plots]``, so that a
coordinator on a gateway does not carry it: without it :func:`save_curves` raises
:class:`PlottingUnavailable` with the command that installs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

Curve = Sequence[tuple[float, float]]
"""Points ``(x, y)`` of one line, in the order they are drawn."""

MARKERS_UP_TO = 60
"""Lines of at most this many points show a dot at each point (a version, a round)."""


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed: plots are an extra."""


def save_curves(
    path: Path,
    curves: Mapping[str, Curve],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    target: float | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Draw each of ``curves`` (label → points) as a line on one chart, with a dashed line at
    ``target``, and save it as a PNG at ``path``; a legend when there is more than one line."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlottingUnavailable("plots need matplotlib: pip install 'ember-fl[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    try:
        for label, points in curves.items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            marker = "." if len(points) <= MARKERS_UP_TO else None
            ax.plot(xs, ys, marker=marker, linewidth=1.5, label=label)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(title)
        if sum(1 for points in curves.values() if points) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path

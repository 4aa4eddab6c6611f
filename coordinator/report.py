"""A finished (or running) job, written down for people: ``ember jobs report``.

From the coordinator's record of a job (``jobs.show`` with every model version) this builds
the learning curve as a CSV table, the accuracy and loss curves as PNG files
(:mod:`coordinator.plots`), and a Markdown summary: what ran, for how long, how far it got,
where accuracy peaked, when it first reached the job's target, which agents took part and
which updates were refused. The final model as ONNX is the CLI's part
(``ember jobs export``'s writer).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from coordinator.plots import Curve, PlottingUnavailable, save_curves

CSV_NAME = "versions.csv"
ACCURACY_PNG = "accuracy.png"
LOSS_PNG = "loss.png"
MODEL_NAME = "model.onnx"
MARKDOWN_NAME = "report.md"
LOSSES = ("loss", "train_loss")
"""Metrics drawn on the loss chart: the aggregator's held-out loss and the trainers' mean."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _value(row: Mapping[str, Any], metric: str) -> float | None:
    """A version's ``metric``, if it reported a number for it."""
    return _number((row.get("metrics") or {}).get(metric))


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(max(0.0, seconds), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {rest:02.0f} s"
    return f"{rest:.1f} s"


@dataclass(frozen=True)
class JobReport:
    """The report of one job from the coordinator's ``jobs.show`` answer with every model
    version (``{"versions": "all"}``): the numbers, the CSV and the Markdown; :meth:`write`
    puts them and the plots in a directory."""

    detail: Mapping[str, Any]

    # -- the numbers -----------------------------------------------------------------------------
    @property
    def job(self) -> str:
        return str(self.detail["job"])

    @cached_property
    def versions(self) -> list[Mapping[str, Any]]:
        """Model versions, oldest first, each ``{version, ts, updates_applied, metrics}``."""
        rows = self.detail.get("model_versions") or []
        return sorted((r for r in rows if isinstance(r, Mapping)), key=lambda r: r["version"])

    @cached_property
    def started(self) -> float | None:
        """When the job started (placed), or the first version's time if it was not recorded."""
        started = _number(self.detail.get("started"))
        if started is None and self.versions:
            return _number(self.versions[0].get("ts"))
        return started

    def seconds(self, row: Mapping[str, Any]) -> float | None:
        """A version's time since the job started."""
        ts, started = _number(row.get("ts")), self.started
        return None if ts is None or started is None else round(ts - started, 3)

    def metric_names(self) -> list[str]:
        """Every numeric metric some version reported; accuracy and the losses first."""
        names = {
            name
            for row in self.versions
            for name, value in (row.get("metrics") or {}).items()
            if _number(value) is not None
        }
        first = [n for n in ("accuracy", *LOSSES) if n in names]
        return first + sorted(names - set(first))

    def curve(self, metric: str) -> Curve:
        """``(seconds since the start, value)`` of ``metric`` over the versions that have it."""
        points = []
        for row in self.versions:
            value = _value(row, metric)
            seconds = self.seconds(row)
            if value is not None and seconds is not None:
                points.append((seconds, value))
        return points

    def _best(self, metric: str, *, highest: bool) -> dict[str, Any] | None:
        found = None
        for row in self.versions:
            value = _value(row, metric)
            if value is None:
                continue
            if found is None or (value > found["value"] if highest else value < found["value"]):
                found = self._point(row, value)
        return found

    def _point(self, row: Mapping[str, Any], value: float) -> dict[str, Any]:
        return {"value": value, "version": row["version"], "seconds": self.seconds(row)}

    def target_accuracy(self) -> float | None:
        return _number((self.detail.get("stop") or {}).get("target_accuracy"))

    def first_reaching(self, accuracy: float) -> dict[str, Any] | None:
        """The first version whose held-out accuracy reached ``accuracy``."""
        for row in self.versions:
            value = _value(row, "accuracy")
            if value is not None and value >= accuracy:
                return self._point(row, value)
        return None

    def summary(self) -> dict[str, Any]:
        """The report's figures, as ``--json`` prints them and ``report.md`` shows them:
        reckoned once, so that both give a running job the same duration."""
        return self._figures

    @cached_property
    def _figures(self) -> dict[str, Any]:
        detail, versions = self.detail, self.versions
        last = versions[-1] if versions else None
        finished = _number(detail.get("finished"))
        started = self.started
        target = self.target_accuracy()
        roles: dict[str, dict[str, int]] = {}
        for a in detail.get("assignments") or []:
            states = roles.setdefault(str(a.get("role")), {})
            states[str(a.get("state"))] = states.get(str(a.get("state")), 0) + 1
        rejected = detail.get("rejected") or {}
        return {
            "job": self.job,
            "name": detail.get("name"),
            "phase": detail.get("phase"),
            "reason": detail.get("reason") or "",
            "submitted": _number(detail.get("submitted")),
            "started": started,
            "finished": finished,
            "duration_s": (
                None if started is None else round((finished or time.time()) - started, 3)
            ),
            "versions": len(versions),
            "model_version": detail.get("model_version"),
            "updates_applied": detail.get("updates_applied"),
            "final_metrics": dict(last.get("metrics") or {}) if last else {},
            "best_accuracy": self._best("accuracy", highest=True),
            "lowest_loss": self._best("loss", highest=False),
            "target_accuracy": target,
            "target_reached": None if target is None else self.first_reaching(target),
            "agents": roles,
            "refused": {
                "count": rejected.get("count", 0),
                "by_code": dict(rejected.get("by_code") or {}),
            },
        }

    # -- the files -------------------------------------------------------------------------------
    def csv_text(self) -> str:
        """One row per model version: its number, time, updates applied, every metric."""
        names = self.metric_names()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["version", "seconds", "time", "updates_applied", *names])
        for row in self.versions:
            metrics = row.get("metrics") or {}
            ts = _number(row.get("ts"))
            writer.writerow(
                [
                    row["version"],
                    self.seconds(row),
                    "" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)),
                    row.get("updates_applied", ""),
                    *(metrics.get(name, "") for name in names),
                ]
            )
        return out.getvalue()

    def plot(self, directory: Path) -> dict[str, Path]:
        """The accuracy and loss charts that have points, by file name. Raises
        :class:`~coordinator.plots.PlottingUnavailable` without matplotlib."""
        drawn: dict[str, Path] = {}
        title = f"{self.detail.get('name') or 'job'} ({self.job})"
        accuracy = self.curve("accuracy")
        if accuracy:
            drawn[ACCURACY_PNG] = save_curves(
                directory / ACCURACY_PNG,
                {"held-out accuracy": accuracy},
                xlabel="seconds since the job started",
                ylabel="held-out accuracy",
                title=title,
                target=self.target_accuracy(),
                ylim=(0, 1),
            )
        losses = {
            {"loss": "held-out loss", "train_loss": "trainers' loss"}[name]: self.curve(name)
            for name in LOSSES
        }
        if any(losses.values()):
            drawn[LOSS_PNG] = save_curves(
                directory / LOSS_PNG,
                losses,
                xlabel="seconds since the job started",
                ylabel="loss",
                title=title,
            )
        return drawn

    def markdown(self, files: Mapping[str, str]) -> str:
        """The summary for people; ``files``: what was written (or why not), by name."""
        s = self.summary()
        lines = [f"# Job {s['job']}" + (f": {s['name']}" if s["name"] else ""), ""]
        phase = f"**{s['phase']}**" + (f" ({s['reason']})" if s["reason"] else "")
        lines += [
            f"* Phase: {phase}",
            f"* Submitted {_clock(s['submitted'])}, started {_clock(s['started'])}, "
            f"ended {_clock(s['finished'])}; ran {_duration(s['duration_s'])}",
            f"* Model versions: {s['versions']} (newest {s['model_version']}); "
            f"updates applied: {s['updates_applied']}",
        ]
        best = s["best_accuracy"]
        if best is not None:
            lines.append(
                f"* Best held-out accuracy: {best['value']:.4f} at version {best['version']}, "
                f"{_duration(best['seconds'])} in"
            )
        lowest = s["lowest_loss"]
        if lowest is not None:
            lines.append(
                f"* Lowest held-out loss: {lowest['value']:.4f} at version {lowest['version']}"
            )
        if s["target_accuracy"] is not None:
            reached = s["target_reached"]
            lines.append(
                f"* Target accuracy {s['target_accuracy']:g}: "
                + (
                    "not reached"
                    if reached is None
                    else f"reached at version {reached['version']}, "
                    f"{_duration(reached['seconds'])} in"
                )
            )
        if s["final_metrics"]:
            shown = ", ".join(f"{k} {_format(v)}" for k, v in sorted(s["final_metrics"].items()))
            lines.append(f"* Newest version's metrics: {shown}")
        refused = s["refused"]
        if refused["count"]:
            codes = ", ".join(f"{c} {n}" for c, n in sorted(refused["by_code"].items()))
            lines.append(
                f"* Updates refused: {refused['count']}" + (f" ({codes})" if codes else "")
            )
        lines += ["", "## Agents", "", "| agent | role | state | dataset | samples |"]
        lines.append("|---|---|---|---|---:|")
        for a in self.detail.get("assignments") or []:
            samples = "" if a.get("samples") is None else str(a["samples"])
            lines.append(
                f"| {a.get('agent')} | {a.get('role')} | {a.get('state')} "
                f"| {a.get('dataset') or ''} | {samples} |"
            )
        lines += ["", "## Files", ""]
        lines += [f"* `{name}`: {what}" for name, what in files.items()]
        return "\n".join(lines) + "\n"

    def write(self, directory: Path) -> dict[str, str]:
        """Write the CSV, the plots (when matplotlib is there) and the Markdown into
        ``directory``; what each file holds, or why it was not written, by name."""
        directory.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        (directory / CSV_NAME).write_text(self.csv_text(), encoding="utf-8")
        files[CSV_NAME] = f"{len(self.versions)} model versions, one row each"
        if not self.versions:
            files["plots"] = "not drawn: the job has no model versions yet"
        else:
            try:
                drawn = self.plot(directory)
            except PlottingUnavailable as exc:
                files["plots"] = f"not drawn: {exc}"
            else:
                for name in drawn:
                    files[name] = "accuracy" if name == ACCURACY_PNG else "losses"
                    files[name] += " over the seconds since the job started"
                if not drawn:
                    files["plots"] = "not drawn: no version reported an accuracy or a loss"
        return files


def _format(value: Any) -> str:
    number = _number(value)
    return f"{number:.4g}" if number is not None else str(value)


def write_markdown(report: JobReport, directory: Path, files: dict[str, str]) -> Path:
    """``report.md`` in ``directory``, listing ``files`` (to which it adds itself)."""
    path = directory / MARKDOWN_NAME
    files[MARKDOWN_NAME] = "this summary"
    path.write_text(report.markdown(files), encoding="utf-8")
    return path

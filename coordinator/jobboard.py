"""Every job as a dashboard sees it: the retained ``jobs/<id>/state`` documents, an accuracy
history per job and what each agent's roles are doing in it (the retained
``jobs/<id>/agents/<agent>/progress``), read straight from the broker (no coordinator RPC).

The job state is the MQTT "last known good value" of a job (retained, so a new subscriber has
every job at once); the accuracy history comes from the state document's ``history`` when it
carries one, and otherwise is gathered from the ``metrics`` and ``accuracy`` of successive state
documents and the aggregator's ``model_version`` events on ``jobs/<id>/metrics/<agent>``.
Documents are read defensively, as :mod:`coordinator.registry` reads agent documents: anything
malformed is logged and skipped, never a crash.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.protocol.topics import Topics, check_segment
from agent.transport import Inbound, Transport
from coordinator.registry import DocumentFeed, json_document

log = structlog.get_logger("ember.jobboard")

LEAVES = ("state", "metrics")
MAX_HISTORY = 1000
"""Accuracy points kept per job (the newest ones)."""
TERMINAL = ("completed", "failed", "cancelled")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _version(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def history_points(raw: Any) -> Iterable[tuple[int, float]]:
    """``(version, accuracy)`` pairs from a state document's ``history``: a list of points
    ``{"version": v, "accuracy": a, ...}`` (other keys ignored) or ``[v, a]`` pairs."""
    if isinstance(raw, Mapping):
        raw = raw.get("points", raw.get("accuracy"))
    if not isinstance(raw, list):
        return
    for point in raw:
        if isinstance(point, Mapping):
            version, accuracy = _version(point.get("version")), _number(point.get("accuracy"))
        elif isinstance(point, (list, tuple)) and len(point) >= 2:
            version, accuracy = _version(point[0]), _number(point[1])
        else:
            continue
        if version is not None and accuracy is not None:
            yield version, accuracy


@dataclass
class JobView:
    """One job: its latest state document and its accuracy per model version."""

    id: str
    state: Mapping[str, Any] = field(default_factory=dict)
    accuracy: dict[int, float] = field(default_factory=dict)
    """Held-out accuracy per model version (at most :data:`MAX_HISTORY`, the newest)."""
    last_seen: float = 0.0

    @property
    def phase(self) -> str:
        phase = self.state.get("phase")
        return phase if isinstance(phase, str) else "unknown"

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def curve(self) -> list[tuple[int, float]]:
        """The accuracy history, oldest version first."""
        return sorted(self.accuracy.items())

    def record(self, version: int | None, accuracy: float | None) -> None:
        if version is None or accuracy is None:
            return
        self.accuracy[version] = accuracy
        if len(self.accuracy) > MAX_HISTORY:
            for old in sorted(self.accuracy)[: len(self.accuracy) - MAX_HISTORY]:
                del self.accuracy[old]

    def progress(self, now: float) -> float:
        """How far the job is towards its nearest stop rule, in [0, 1]: the coordinator's
        ``progress``, moved on by the clock between documents when a time limit is set."""
        value = _number(self.state.get("progress")) or 0.0
        stop = self.state.get("stop")
        minutes = _number(stop.get("max_minutes")) if isinstance(stop, Mapping) else None
        started = _number(self.state.get("started"))
        if self.phase == "running" and minutes and started is not None:
            value = max(value, (now - started) / (minutes * 60.0))
        return min(1.0, max(0.0, value))


class JobBoard(DocumentFeed):
    """Every job on the broker under one prefix, kept current from its topics."""

    name = "job"

    def __init__(
        self, transport: Transport, topics: Topics, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(transport)
        self.topics = topics
        self.clock = clock
        self._jobs: dict[str, JobView] = {}
        self._progress: dict[tuple[str, str], Mapping[str, Any]] = {}
        """(job, agent) → that agent's progress document for the job."""

    def filters(self) -> list[tuple[str, int]]:
        return [
            (self.topics.all_jobs("state"), 1),
            (self.topics.all_job_metrics(), 0),
            (self.topics.all_job_progress(), 1),
        ]

    def snapshot(self) -> list[JobView]:
        """Jobs, running ones first, then newest submitted first."""

        def key(job: JobView) -> tuple[bool, float, str]:
            submitted = _number(job.state.get("submitted")) or 0.0
            return (job.terminal, -submitted, job.id)

        return sorted(self._jobs.values(), key=key)

    def get(self, job: str) -> JobView | None:
        return self._jobs.get(job)

    def role_progress(self, job: str, agent: str, role: str) -> Mapping[str, Any] | None:
        """What ``agent``'s ``role`` in ``job`` last reported (``state``, ``updates_sent``...)."""
        roles = self._progress.get((job, agent), {}).get("roles")
        entry = roles.get(role) if isinstance(roles, Mapping) else None
        return entry if isinstance(entry, Mapping) else None

    def apply(self, message: Inbound) -> None:
        """Fold one received job document into the board."""
        levels = message.topic[len(self.topics.prefix) + 1 :].split("/")
        if len(levels) == 4 and levels[2] == "metrics":  # jobs/<job>/metrics/<agent>
            levels = levels[:-1]
        if len(levels) == 5 and levels[2] == "agents" and levels[4] == "progress":
            levels = [*levels[:3], levels[3]]  # jobs/<job>/agents/<agent>
        elif len(levels) != 3 or levels[2] not in LEAVES:
            return
        if levels[0] != "jobs":
            return
        job, leaf = levels[1], levels[2]
        try:
            for name in levels[1::2]:
                check_segment(name, "job or agent id")
        except ValueError:
            return
        payload = bytes(message.payload)
        if not payload:  # a cleared retained document: the job (or the agent's part) is gone
            if leaf == "state":
                self._jobs.pop(job, None)
            elif leaf == "agents":
                self._progress.pop((job, levels[3]), None)
            return
        doc = json_document(payload, log=log, kind="job", job=job, leaf=leaf)
        if doc is None:
            return
        if leaf == "state":
            self.update_state(job, doc)
        elif leaf == "agents":
            self._progress[(job, levels[3])] = doc
        else:
            self.update_metrics(job, doc)

    def _view(self, job: str) -> JobView:
        view = self._jobs.get(job)
        if view is None:
            view = self._jobs[job] = JobView(id=job)
        view.last_seen = self.clock()
        return view

    def update_state(self, job: str, doc: Mapping[str, Any]) -> None:
        view = self._view(job)
        view.state = doc
        for version, accuracy in history_points(doc.get("history")):
            view.record(version, accuracy)
        metrics = doc.get("metrics")
        if isinstance(metrics, Mapping):
            view.record(_version(doc.get("model_version")), _number(metrics.get("accuracy")))

    def update_metrics(self, job: str, event: Mapping[str, Any]) -> None:
        """A ``model_version`` event with an accuracy adds a point; other events are ignored
        (a job seen only through events is listed once its state arrives)."""
        if event.get("event") != "model_version" or job not in self._jobs:
            return
        self._view(job).record(_version(event.get("version")), _number(event.get("accuracy")))

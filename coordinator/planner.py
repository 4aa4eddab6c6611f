"""Placement: which agents take which role of a job, and why every other agent does not.

A pure function of a registry snapshot and a job spec (Flame's idea of defining a job apart
from where it runs: the job names the data and compute it needs, the planner finds agents).

* One **aggregator**, on an online agent carrying the spec's aggregator labels (by default
  ``role=aggregator``: the coordinator's embedded agent or a gateway), the preferred agent first,
  then the least busy one.
* A **sharded** job (``algorithm.shards`` S > 1: FedBuff with the server split as a parameter
  server is) has a **shard assembler** where the aggregator would be, and S **aggregator
  shards**, one per agent carrying the aggregator labels (each shard is a process of its own:
  two on one agent would share its one event loop), the least busy first, the assembler's host
  last (:func:`place_shards`).
* In a **hierarchical** or **hybrid** job (``topology.group_by``), one **middle aggregator**
  per group of trainers (agents sharing the label's value), on an agent of that group: a gateway
  carrying the aggregator labels first, else (hybrid) the group's leading trainer, else the
  strongest agent (:func:`place_middle_aggregators`). Trainers without the label are rejected.
* **Trainers**: online agents holding a dataset that matches by name and/or tags with at least
  ``min_samples`` samples, enough memory, an accepted CPU architecture, the runtime the backend
  needs and the required labels. Biggest datasets first. In ``async`` mode (FedBuff) the first
  ``concurrency`` are active and the rest stand by as replacements; in ``sync`` mode, and in
  ``async`` mode with Oort selection, every eligible agent takes part and the aggregator picks
  who trains (each round's sample, or which idle trainers FedBuff starts next).

Every other agent is rejected with a reason code and a sentence.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.registry import AgentInfo, AgentView, DatasetInfo
from coordinator.spec import JobSpec

# Reason codes, in the order they are checked.
OFFLINE = "offline"
NO_INFO = "no_info"
LABELS = "labels"
WRONG_ARCH = "wrong_arch"
TOO_LITTLE_MEMORY = "too_little_memory"
RUNTIME_MISSING = "runtime_missing"
CODE_NOT_ALLOWED = "code_not_allowed"
NO_DATASET = "no_dataset"
TOO_FEW_SAMPLES = "too_few_samples"
EXCLUDED = "excluded"
NO_GROUP = "no_group"

LEAD_ROLES = ("aggregator", "shard_assembler")
"""The role that decides a job's fate (its final version ends the job): the aggregator, or a
sharded job's assembler."""
SHARD_ROLE = "aggregator_shard"


@dataclass(frozen=True)
class Selected:
    """An agent chosen for a role; ``standby`` trainers replace active ones that go away."""

    agent: str
    role: str
    dataset: str | None = None
    samples: int | None = None
    standby: bool = False
    feature_shape: tuple[int, ...] | None = None
    backend: str | None = None
    """What a trainer trains with (:func:`trainer_backend`); ``None`` for other roles."""
    group: str | None = None
    """Hierarchical and hybrid jobs: the group (value of the ``group_by`` label)."""
    shard: int | None = None
    """Sharded jobs' aggregator shards: which slice of the parameters this one owns."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "role": self.role,
            "group": self.group,
            "shard": self.shard,
            "dataset": self.dataset,
            "samples": self.samples,
            "standby": self.standby,
            "feature_shape": None if self.feature_shape is None else list(self.feature_shape),
            "backend": self.backend,
        }


@dataclass(frozen=True)
class Rejected:
    """An agent that takes no part, with a reason code and a sentence."""

    agent: str
    code: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "code": self.code, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """The outcome of placement; feasible when an aggregator and enough trainers were found."""

    selected: tuple[Selected, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def aggregator(self) -> Selected | None:
        """The job's lead: its aggregator, or a sharded job's assembler."""
        return next((s for s in self.selected if s.role in LEAD_ROLES), None)

    @property
    def shards(self) -> list[Selected]:
        return [s for s in self.selected if s.role == SHARD_ROLE]

    @property
    def trainers(self) -> list[Selected]:
        return [s for s in self.selected if s.role == "trainer"]

    @property
    def middle_aggregators(self) -> list[Selected]:
        return [s for s in self.selected if s.role == "middle_aggregator"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "feasible": self.feasible,
            "problems": list(self.problems),
            "selected": [s.to_dict() for s in self.selected],
            "rejected": [r.to_dict() for r in self.rejected],
        }


@dataclass(frozen=True)
class Eligibility:
    """Whether one agent can train for a spec, and on which of its datasets."""

    dataset: DatasetInfo | None = None
    problems: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def _clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def offline_reason(agent: AgentView) -> str:
    if agent.status is None:
        return (
            "offline: seen on the LAN but not connected to the broker"
            if agent.lan
            else "offline: no status published"
        )
    text = "offline"
    if agent.since:
        text += f" since {_clock(agent.since)}"
    if agent.offline_reason:
        text += f" ({agent.offline_reason})"
    return text


def trainer_backend(info: AgentInfo, backend: str) -> str:
    """What an agent trains a job with: the spec's backend or, for ``auto``, torch where the
    agent has torch and says it allows code bundles, onnxruntime elsewhere."""
    if backend != "auto":
        return backend
    return "torch" if info.torch is not None and info.allow_code is True else "onnxruntime"


def trainer_eligibility(agent: AgentView, spec: JobSpec) -> Eligibility:
    """Check one online agent's capabilities against a spec (everything but presence)."""
    info = agent.info
    if info is None:
        return Eligibility(problems=((NO_INFO, "no info published"),))
    problems: list[tuple[str, str]] = []
    group_by = spec.topology.group_by
    if group_by is not None and not info.labels.get(group_by):
        problems.append(
            (NO_GROUP, f"no {group_by!r} label (the job groups its trainers by {group_by})")
        )
    missing = {k: v for k, v in spec.compute.labels.items() if info.labels.get(k) != v}
    if missing:
        text = ", ".join(f"{k}={v}" for k, v in missing.items())
        problems.append((LABELS, f"missing label {text}"))
    if spec.compute.arch:
        wanted = ", ".join(spec.compute.arch)
        if info.arch is None:
            problems.append((WRONG_ARCH, f"arch unknown (job needs {wanted})"))
        elif info.arch not in spec.compute.arch:
            problems.append((WRONG_ARCH, f"wrong arch {info.arch} (job needs {wanted})"))
    need_mb = spec.compute.min_memory_mb
    if need_mb:
        if info.memory_mb is None:
            problems.append((TOO_LITTLE_MEMORY, f"memory unknown (job needs {need_mb} MB)"))
        elif info.memory_mb < need_mb:
            problems.append(
                (TOO_LITTLE_MEMORY, f"too little memory: {info.memory_mb} MB < {need_mb} MB")
            )
    runtime = trainer_backend(info, spec.backend)
    version = info.onnxruntime if runtime == "onnxruntime" else info.torch
    if version is None:
        error = info.runtime_errors.get(runtime)
        problems.append(
            (
                RUNTIME_MISSING,
                f"runtime missing: {runtime} failed to load ({error})"
                if error
                else f"runtime missing: no {runtime}",
            )
        )
    elif runtime == "torch" and info.allow_code is False:
        problems.append(
            (CODE_NOT_ALLOWED, "torch backend sends model code and this agent has allow_code off")
        )
    matching = [d for d in info.datasets if spec.data.matches(d.name, d.tags)]
    best: DatasetInfo | None = None
    if not matching:
        held = ", ".join(d.name for d in info.datasets) or "none"
        problems.append(
            (NO_DATASET, f"no matching dataset (job needs {spec.data.describe()}; has {held})")
        )
    else:
        enough = [d for d in matching if (d.samples or 0) >= spec.data.min_samples]
        if not enough:
            most = max(matching, key=lambda d: d.samples or 0)
            count = "an unknown number" if most.samples is None else str(most.samples)
            problems.append(
                (
                    TOO_FEW_SAMPLES,
                    f"too few samples: {most.name} has {count}, "
                    f"job needs ≥ {spec.data.min_samples}",
                )
            )
        else:
            best = max(enough, key=lambda d: (d.samples or 0, d.name))
    return Eligibility(dataset=best, problems=tuple(problems))


def plan(
    agents: Iterable[AgentView],
    spec: JobSpec,
    *,
    prefer_aggregator: str | None = None,
    exclude: Collection[str] = (),
    aggregator: str | None = None,
) -> Plan:
    """Place ``spec`` on ``agents``.

    ``exclude`` names agents not to take as trainers (they refused or failed this job before);
    ``aggregator``, when given, keeps the aggregator where it already runs.
    """
    fleet = sorted(agents, key=lambda a: a.id)
    selected: list[Selected] = []
    rejected: list[Rejected] = []
    problems: list[str] = []

    # The aggregator (a sharded job's assembler).
    sharded = spec.algorithm.shards > 1
    agg_id = aggregator
    wanted = spec.aggregator.labels
    if agg_id is None:
        holdout = spec.data.eval_dataset
        hosts = [
            a for a in _aggregator_hosts(fleet, wanted) if holdout is None or _holds(a, holdout)
        ]
        if hosts:
            hosts.sort(key=lambda a: (a.id != prefer_aggregator, len(a.running_roles()), a.id))
            agg_id = hosts[0].id
        else:
            problems.append(
                f"no online agent can host the aggregator (needs labels {_text(wanted)}"
                + (f" and dataset {holdout}" if holdout else "")
                + "; 'ember serve' starts one unless --no-embedded-agent)"
            )
    if agg_id is not None:
        lead = LEAD_ROLES[1] if sharded else LEAD_ROLES[0]
        selected.append(Selected(agent=agg_id, role=lead, dataset=spec.data.eval_dataset))
        if sharded:
            shards = place_shards(fleet, spec, agg_id)
            selected.extend(shards)
            if len(shards) < spec.algorithm.shards:
                problems.append(
                    f"algorithm.shards {spec.algorithm.shards}: needs {spec.algorithm.shards} "
                    f"online agents that can host an aggregator shard (labels {_text(wanted)}; one "
                    f"shard per agent process), found {len(shards)} ('ember serve "
                    f"--aggregator-shards {spec.algorithm.shards}' starts that many here)"
                )

    # The trainers (the aggregation roles' hosts are not listed as rejected trainers).
    hosting = {s.agent for s in selected}
    eligible: list[tuple[AgentView, DatasetInfo]] = []
    for agent in fleet:
        if not agent.online:
            if agent.id not in hosting:
                rejected.append(Rejected(agent.id, OFFLINE, offline_reason(agent)))
            continue
        if agent.id in exclude:
            if agent.id not in hosting:
                rejected.append(Rejected(agent.id, EXCLUDED, "refused or failed this job before"))
            continue
        check = trainer_eligibility(agent, spec)
        if check.ok and check.dataset is not None:
            eligible.append((agent, check.dataset))
        elif agent.id not in hosting:
            code = check.problems[0][0]
            rejected.append(Rejected(agent.id, code, "; ".join(t for _, t in check.problems)))
    eligible.sort(key=lambda pair: (-(pair[1].samples or 0), pair[0].id))
    active = min(spec.algorithm.active_trainers, len(eligible))
    group_by = spec.topology.group_by
    trainers: list[Selected] = []
    for i, (agent, dataset) in enumerate(eligible):
        trainers.append(
            Selected(
                agent=agent.id,
                role="trainer",
                dataset=dataset.name,
                samples=dataset.samples,
                standby=i >= active,
                feature_shape=dataset.feature_shape,
                backend=None if agent.info is None else trainer_backend(agent.info, spec.backend),
                group=None
                if group_by is None or agent.info is None
                else agent.info.labels[group_by],
            )
        )
    if group_by is not None:
        middles = place_middle_aggregators(fleet, spec, trainers, exclude)
        selected.extend(middles)
        if len(middles) < spec.topology.min_groups:
            problems.append(
                f"needs trainers in at least {spec.topology.min_groups} group(s) by "
                f"{group_by}, found {len(middles)}"
            )
    selected.extend(trainers)
    if len(eligible) < spec.algorithm.min_trainers:
        problems.append(
            f"needs at least {spec.algorithm.min_trainers} trainer(s), found {len(eligible)} "
            f"(agents with {spec.data.describe()} and ≥ {spec.data.min_samples} samples)"
        )
    return Plan(selected=tuple(selected), rejected=tuple(rejected), problems=tuple(problems))


def _aggregator_hosts(fleet: Iterable[AgentView], wanted: Mapping[str, str]) -> list[AgentView]:
    """Online agents carrying the aggregator labels."""
    return [
        a
        for a in fleet
        if a.online
        and a.info is not None
        and all(a.info.labels.get(k) == v for k, v in wanted.items())
    ]


def _text(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())


def _holds(agent: AgentView, dataset: str) -> bool:
    return agent.info is not None and any(d.name == dataset for d in agent.info.datasets)


def place_shards(
    fleet: Iterable[AgentView],
    spec: JobSpec,
    assembler: str,
    keep: Mapping[int, str] | None = None,
    exclude: Collection[str] = (),
) -> list[Selected]:
    """The aggregator shards of a sharded FedBuff job (Nguyen et al. 2022, the server split
    as a parameter server is, Li et al. 2014): shard s on its own agent carrying the aggregator
    labels. ``keep`` (shard → agent) leaves shards where they run; the others go to the least
    busy hosts, the assembler's own last (it also evaluates and assembles every version), never
    to an agent in ``exclude``. Fewer than ``algorithm.shards`` when hosts are missing."""
    kept = dict(keep or {})
    taken = set(kept.values())
    hosts = [
        a
        for a in _aggregator_hosts(fleet, spec.aggregator.labels)
        if a.id not in taken and a.id not in exclude
    ]
    hosts.sort(key=lambda a: (a.id == assembler, len(a.running_roles()), a.id))
    free = iter(hosts)
    chosen: list[Selected] = []
    for shard in range(spec.algorithm.shards):
        host = kept.get(shard) or next((a.id for a in free), None)
        if host is not None:
            chosen.append(Selected(agent=host, role=SHARD_ROLE, shard=shard))
    return chosen


def place_middle_aggregators(
    fleet: Iterable[AgentView],
    spec: JobSpec,
    trainers: Iterable[Selected],
    exclude: Collection[str] = (),
) -> list[Selected]:
    """One middle aggregator for every group with an active trainer (Liu et al. 2020's edge
    server), on an online agent of that group: one carrying the aggregator labels (a gateway)
    first; in a hybrid job one of the group's own trainers (its leader: the most samples) next;
    then the strongest (most memory, most cores), least busy agent."""
    group_by = spec.topology.group_by
    assert group_by is not None
    members: dict[str, list[Selected]] = {}
    for t in trainers:
        if not t.standby and t.group is not None:
            members.setdefault(t.group, []).append(t)
    wanted = spec.aggregator.labels
    chosen: list[Selected] = []
    for group, group_trainers in sorted(members.items()):
        samples = {t.agent: t.samples or 0 for t in group_trainers}
        hosts = [
            a
            for a in fleet
            if a.online
            and a.info is not None
            and a.info.labels.get(group_by) == group
            and a.id not in exclude
        ]

        if hosts:
            leaders = samples if spec.topology.kind == "hybrid" else {}
            best = min(hosts, key=lambda a: _host_rank(a, wanted, leaders))
            chosen.append(Selected(agent=best.id, role="middle_aggregator", group=group))
    return chosen


def _host_rank(agent: AgentView, wanted: Mapping[str, str], leaders: Mapping[str, int]) -> Any:
    """Sort key of a middle aggregator's host, best first: a gateway (aggregator labels), a
    leading trainer of the group (hybrid: most samples), more memory, more cores, less busy."""
    info = agent.info
    assert info is not None
    gateway = bool(wanted) and all(info.labels.get(k) == v for k, v in wanted.items())
    return (
        not gateway,
        -leaders.get(agent.id, -1),
        -(info.memory_mb or 0),
        -(info.cpu_cores or 0),
        len(agent.running_roles()),
        agent.id,
    )

"""Placement is a pure function of the fleet and the spec: who takes part, and why not."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.planner import place_shards, plan, trainer_backend
from coordinator.registry import AgentView, parse_info, parse_roles
from coordinator.spec import JobSpec, parse_spec


def spec(**changes: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "name": "digits",
        "model": {"onnx": "m/train_step.onnx"},
        "data": {"dataset": "digits", "min_samples": 50},
        "compute": {"min_memory_mb": 256, "arch": ["aarch64", "x86_64"]},
        "algorithm": {"mode": "async", "concurrency": 2},
        "stop": {"max_updates": 100},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_spec(raw)


def info(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "agent": "x",
        "version": "0.1.0",
        "os": {"system": "Linux", "release": "6.1", "distro": "Debian 12"},
        "arch": "aarch64",
        "cpu": {"model": "Cortex-A72", "cores": 4},
        "memory": {"total": 4 * 1024**3},
        "accelerators": [],
        "runtimes": {"onnxruntime": {"version": "1.17.0", "providers": ["CPUExecutionProvider"]}},
        "labels": {},
        "datasets": [{"name": "digits", "tags": ["vision"], "samples": 300}],
    }
    doc.update(overrides)
    return doc


def agent(name: str, *, online: bool = True, roles: Any = None, **info_overrides: Any) -> AgentView:
    doc = info(**info_overrides)
    status = {"state": "online" if online else "offline", "ts": 1_700_000_000.0}
    if not online:
        status["reason"] = "connection lost"
    return AgentView(
        id=name,
        online=online,
        status=status,
        info_raw=doc,
        info=parse_info(doc),
        roles=parse_roles(roles or {}),
    )


def aggregator(name: str = "coordinator-host") -> AgentView:
    return agent(name, labels={"role": "aggregator"}, datasets=[])


def reasons(result: Any) -> dict[str, tuple[str, str]]:
    return {r.agent: (r.code, r.reason) for r in result.rejected}


def test_the_issue_reasons() -> None:
    fleet = [
        aggregator(),
        agent("big", datasets=[{"name": "digits", "samples": 900}]),
        agent("ok", datasets=[{"name": "digits", "samples": 60}]),
        agent("gone", online=False),
        agent("other", datasets=[{"name": "mnist", "samples": 5000}]),
        agent("tiny", datasets=[{"name": "digits", "samples": 10}]),
        agent("small", memory={"total": 128 * 1024**2}),
        agent("armv7", arch="armv7l"),
        agent("noort", runtimes={"onnxruntime": None, "torch": None}),
    ]
    result = plan(fleet, spec(), prefer_aggregator="coordinator-host")
    assert result.feasible
    assert [(s.agent, s.role, s.dataset, s.samples, s.standby) for s in result.selected] == [
        ("coordinator-host", "aggregator", None, None, False),
        ("big", "trainer", "digits", 900, False),
        ("ok", "trainer", "digits", 60, False),
    ]
    got = reasons(result)
    assert got["gone"] == ("offline", "offline since " + got["gone"][1][len("offline since ") :])
    assert got["gone"][1].endswith("(connection lost)")
    assert got["other"] == (
        "no_dataset",
        "no matching dataset (job needs dataset digits; has mnist)",
    )
    assert got["tiny"] == ("too_few_samples", "too few samples: digits has 10, job needs ≥ 50")
    assert got["small"] == ("too_little_memory", "too little memory: 128 MB < 256 MB")
    assert got["armv7"] == ("wrong_arch", "wrong arch armv7l (job needs aarch64, x86_64)")
    assert got["noort"] == ("runtime_missing", "runtime missing: no onnxruntime")
    assert set(got) == {"gone", "other", "tiny", "small", "armv7", "noort"}
    assert result.to_dict()["selected"][1]["agent"] == "big"


def test_every_problem_is_listed_and_the_first_gives_the_code() -> None:
    result = plan([aggregator(), agent("bad", arch="armv7l", datasets=[])], spec())
    code, reason = reasons(result)["bad"]
    assert code == "wrong_arch"
    assert (
        reason == "wrong arch armv7l (job needs aarch64, x86_64); no matching dataset "
        "(job needs dataset digits; has none)"
    )


def test_concurrency_caps_active_trainers_in_async_mode_and_not_in_sync() -> None:
    fleet = [aggregator()] + [
        agent(f"a{i}", datasets=[{"name": "digits", "samples": 100 + i}]) for i in range(4)
    ]
    async_plan = plan(fleet, spec())
    assert [(s.agent, s.standby) for s in async_plan.trainers] == [
        ("a3", False),
        ("a2", False),
        ("a1", True),
        ("a0", True),
    ]
    sync_plan = plan(fleet, spec(algorithm__mode="sync"))
    assert not any(s.standby for s in sync_plan.trainers)
    # FedBuff with Oort: every eligible agent trains in turn, the aggregator picks C at a time.
    oort_plan = plan(fleet, spec(algorithm__selection="oort"))
    assert [(s.agent, s.standby) for s in oort_plan.trainers] == [
        ("a3", False),
        ("a2", False),
        ("a1", False),
        ("a0", False),
    ]


def test_without_an_aggregator_host_the_plan_says_so() -> None:
    result = plan([agent("a")], spec())
    assert not result.feasible
    assert result.problems[0].startswith("no online agent can host the aggregator")
    assert [s.agent for s in result.trainers] == ["a"]


def test_a_sharded_job_gets_an_assembler_and_one_shard_per_aggregator_host() -> None:
    fleet = [
        aggregator("coordinator-host"),
        agent(
            "gateway-b",
            labels={"role": "aggregator"},
            datasets=[],
            roles={
                "roles": {"j/aggregator": {"job": "j", "role": "aggregator", "state": "running"}}
            },
        ),
        aggregator("gateway-a"),
        agent("a"),
        agent("gone", online=False, labels={"role": "aggregator"}),
    ]
    result = plan(fleet, spec(algorithm__shards=3), prefer_aggregator="coordinator-host")
    assert result.feasible, result.problems
    assert result.aggregator is not None
    assert (result.aggregator.agent, result.aggregator.role) == (
        "coordinator-host",
        "shard_assembler",
    )
    # Least busy first, the assembler's host last; one shard per agent.
    assert [(s.shard, s.agent) for s in result.shards] == [
        (0, "gateway-a"),
        (1, "gateway-b"),
        (2, "coordinator-host"),
    ]
    assert [s.agent for s in result.trainers] == ["a"]
    # The shards' hosts hold no digits, and are not listed as rejected trainers for it.
    assert set(reasons(result)) == {"gone"}
    assert result.to_dict()["selected"][1]["shard"] == 0


def test_a_sharded_job_waits_for_enough_shard_hosts_and_the_plan_says_why() -> None:
    result = plan([aggregator(), agent("a")], spec(algorithm__shards=2))
    assert not result.feasible
    assert [(s.shard, s.agent) for s in result.shards] == [(0, "coordinator-host")]
    assert result.problems == (
        "algorithm.shards 2: needs 2 online agents that can host an aggregator shard "
        "(labels role=aggregator; one shard per agent process), found 1 "
        "('ember serve --aggregator-shards 2' starts that many here)",
    )


def test_place_shards_keeps_running_shards_where_they_are() -> None:
    fleet = [aggregator("x"), aggregator("y"), aggregator("z")]
    chosen = place_shards(fleet, spec(algorithm__shards=2), "x", keep={1: "x"}, exclude={"y"})
    assert [(s.shard, s.agent) for s in chosen] == [(0, "z"), (1, "x")]


def test_min_trainers() -> None:
    result = plan([aggregator(), agent("a")], spec(algorithm__min_trainers=2))
    assert result.problems == (
        "needs at least 2 trainer(s), found 1 (agents with dataset digits and ≥ 50 samples)",
    )


def test_aggregator_preference_then_least_busy() -> None:
    busy = agent(
        "gw-a",
        labels={"role": "aggregator"},
        datasets=[],
        roles={"roles": {"j/aggregator": {"job": "j", "role": "aggregator", "state": "running"}}},
    )
    idle = agent("gw-b", labels={"role": "aggregator"}, datasets=[])
    assert plan([busy, idle], spec()).aggregator.agent == "gw-b"  # type: ignore[union-attr]
    preferred = plan([busy, idle], spec(), prefer_aggregator="gw-a").aggregator
    assert preferred is not None
    assert preferred.agent == "gw-a"
    offline = agent("gw-c", online=False, labels={"role": "aggregator"}, datasets=[])
    assert plan([offline, agent("t")], spec()).aggregator is None


def test_tags_and_labels() -> None:
    fleet = [
        aggregator(),
        agent(
            "lab",
            labels={"site": "lab"},
            datasets=[{"name": "cam1", "tags": ["vision", "cam"], "samples": 80}],
        ),
        agent(
            "home",
            labels={"site": "home"},
            datasets=[{"name": "cam2", "tags": ["vision", "cam"], "samples": 90}],
        ),
        agent(
            "audio",
            labels={"site": "lab"},
            datasets=[{"name": "mic", "tags": ["audio"], "samples": 90}],
        ),
    ]
    s = spec(
        data={"tags": ["vision", "cam"], "min_samples": 50}, compute={"labels": {"site": "lab"}}
    )
    result = plan(fleet, s)
    assert [(t.agent, t.dataset) for t in result.trainers] == [("lab", "cam1")]
    assert reasons(result)["home"] == ("labels", "missing label site=lab")
    assert reasons(result)["audio"][0] == "no_dataset"


def torch_model_spec(backend: str) -> JobSpec:
    """A job whose model is a torch class, trained with ``backend``."""
    return parse_spec(
        {
            "name": "t",
            "model": {"torch": "m.py:Net", "input_shape": [4]},
            "backend": backend,
            "data": {"dataset": "digits"},
            "stop": {"max_updates": 1},
        }
    )


def test_torch_backend_needs_torch_and_code() -> None:
    s = torch_model_spec("torch")
    fleet = [
        aggregator(),
        agent(
            "with", runtimes={"onnxruntime": None, "torch": {"version": "2.4.0"}}, allow_code=True
        ),
        agent("without"),
        agent("broken", runtimes={"torch": {"error": "ImportError: libcudart.so"}}),
        agent("nocode", runtimes={"torch": "2.4.0"}, allow_code=False),
    ]
    result = plan(fleet, s)
    assert [t.agent for t in result.trainers] == ["with"]
    got = reasons(result)
    assert got["without"] == ("runtime_missing", "runtime missing: no torch")
    assert got["broken"] == (
        "runtime_missing",
        "runtime missing: torch failed to load (ImportError: libcudart.so)",
    )
    assert got["nocode"][0] == "code_not_allowed"


def test_auto_backend_trains_with_torch_where_allowed_and_onnxruntime_elsewhere() -> None:
    s = torch_model_spec("auto")
    both = {"onnxruntime": {"version": "1.17.0"}, "torch": {"version": "2.4.0"}}
    fleet = [
        aggregator(),
        agent("jetson", runtimes=both, allow_code=True),
        agent("pi"),  # onnxruntime only
        agent("careful", runtimes=both, allow_code=False),
        agent("unknown", runtimes=both),  # allow_code not published: no code sent
        agent("torch-only", runtimes={"torch": {"version": "2.4.0"}}, allow_code=False),
    ]
    result = plan(fleet, s)
    assert sorted(t.agent for t in result.trainers) == ["careful", "jetson", "pi", "unknown"]
    chosen = {a.id: trainer_backend(a.info, "auto") for a in fleet if a.info is not None}
    shown = {t.agent: t.to_dict()["backend"] for t in result.trainers}
    assert shown == {a: chosen[a] for a in shown}  # `ember jobs plan` shows the same choice
    assert chosen["jetson"] == "torch"
    assert {chosen[n] for n in ("pi", "careful", "unknown")} == {"onnxruntime"}
    assert reasons(result)["torch-only"] == ("runtime_missing", "runtime missing: no onnxruntime")
    assert trainer_backend(fleet[1].info, "onnxruntime") == "onnxruntime"  # type: ignore[arg-type]


def test_malformed_info_never_crashes_and_says_what_is_missing() -> None:
    odd = AgentView(
        id="odd", online=True, status={"state": "online"}, info_raw={}, info=parse_info({})
    )
    junk = AgentView(id="junk", online=True, status={"state": "online"}, info=parse_info([1, 2]))
    none = AgentView(id="none", online=True, status={"state": "online"})
    weird = agent(
        "weird",
        memory="lots",
        datasets=[{"samples": 5}, "x", {"name": "digits", "samples": "many"}],
    )
    result = plan([aggregator(), odd, junk, none, weird], spec())
    got = reasons(result)
    assert got["odd"][0] == "wrong_arch"
    assert "arch unknown" in got["odd"][1]
    assert "memory unknown" in got["odd"][1]
    assert got["junk"][0] == "wrong_arch"
    assert got["none"] == ("no_info", "no info published")
    assert got["weird"][0] == "too_little_memory"
    assert "too few samples: digits has an unknown number" in got["weird"][1]
    assert parse_info([1]).problems == ("info is not a JSON object",)


def test_exclude_and_fixed_aggregator() -> None:
    fleet = [aggregator("gw"), agent("a"), agent("b")]
    result = plan(fleet, spec(), exclude={"a"}, aggregator="gw")
    assert [t.agent for t in result.trainers] == ["b"]
    assert reasons(result)["a"][0] == "excluded"


@pytest.mark.parametrize(
    ("memory", "mb"),
    [
        (2048, 2048),
        ({"total_mb": 512}, 512),
        ({"total": 2 * 1024**3}, 2048),
        ({"total_bytes": 1024**3}, 1024),
    ],
)
def test_memory_shapes(memory: Any, mb: int) -> None:
    assert parse_info(info(memory=memory)).memory_mb == mb


def test_an_eval_dataset_binds_the_aggregator_to_an_agent_that_holds_it() -> None:
    plain = aggregator("gw-plain")
    holdout = agent(
        "gw-holdout",
        labels={"role": "aggregator"},
        datasets=[{"name": "digits-test", "samples": 300}],
    )
    s = spec(data={"dataset": "digits", "min_samples": 50, "eval_dataset": "digits-test"})
    result = plan([plain, holdout, agent("a")], s, prefer_aggregator="gw-plain")
    assert result.aggregator is not None
    assert (result.aggregator.agent, result.aggregator.dataset) == ("gw-holdout", "digits-test")
    alone = plan([plain, agent("a")], s)
    assert alone.problems[0].startswith(
        "no online agent can host the aggregator (needs labels role=aggregator and dataset "
        "digits-test;"
    )


def test_hierarchical_jobs_get_a_middle_aggregator_per_group_on_a_gateway_of_it() -> None:
    fleet = [
        aggregator(),
        agent("lab-gw", labels={"site": "lab", "role": "aggregator"}, datasets=[]),
        agent("lab-1", labels={"site": "lab"}),
        agent("lab-2", labels={"site": "lab"}, memory={"total": 8 * 1024**3}),
        # No gateway at hq: the strongest agent of the group hosts its middle aggregator.
        agent("hq-1", labels={"site": "hq"}, datasets=[{"name": "digits", "samples": 900}]),
        agent("hq-2", labels={"site": "hq"}, memory={"total": 16 * 1024**3}),
        agent("nowhere"),
    ]
    topology = {"kind": "hierarchical", "group_by": "site", "min_groups": 2}
    result = plan(fleet, spec(topology=topology, algorithm__concurrency=4))
    assert result.feasible
    assert result.aggregator is not None
    assert result.aggregator.agent == "coordinator-host"
    middles = {s.group: s.agent for s in result.middle_aggregators}
    assert middles == {"lab": "lab-gw", "hq": "hq-2"}
    assert {s.agent: s.group for s in result.trainers} == {
        "hq-1": "hq",
        "hq-2": "hq",
        "lab-1": "lab",
        "lab-2": "lab",
    }
    assert reasons(result)["nowhere"] == (
        "no_group",
        "no 'site' label (the job groups its trainers by site)",
    )
    # The hybrid ring's leader (the group's biggest trainer) hosts the group's relay.
    hybrid = plan(
        [fleet[0], *fleet[2:]],
        spec(topology={"kind": "hybrid", "group_by": "site"}, algorithm__concurrency=4),
    )
    # (lab-1 and lab-2 hold as many samples: the stronger one leads.)
    assert {s.group: s.agent for s in hybrid.middle_aggregators} == {"lab": "lab-2", "hq": "hq-1"}


def test_too_few_groups_is_a_problem() -> None:
    fleet = [aggregator(), agent("lab-1", labels={"site": "lab"})]
    topology = {"kind": "hierarchical", "group_by": "site", "min_groups": 2}
    result = plan(fleet, spec(topology=topology))
    assert not result.feasible
    assert result.problems == ("needs trainers in at least 2 group(s) by site, found 1",)

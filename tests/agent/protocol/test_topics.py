"""Topic names follow DESIGN.md under any prefix; names cannot change a topic's shape."""

from __future__ import annotations

import pytest

from agent.protocol.topics import DEFAULT_PREFIX, Topics, check_segment


def test_design_topics_under_the_default_prefix() -> None:
    t = Topics()
    assert DEFAULT_PREFIX == "ember/v1"
    assert t.agent_status("pi-1") == "ember/v1/agents/pi-1/status"
    assert t.agent_info("pi-1") == "ember/v1/agents/pi-1/info"
    assert t.agent_telemetry("pi-1") == "ember/v1/agents/pi-1/telemetry"
    assert t.agent_inbox("pi-1") == "ember/v1/agents/pi-1/inbox"
    assert t.agent_roles("pi-1") == "ember/v1/agents/pi-1/roles"
    assert t.all_agents("status") == "ember/v1/agents/+/status"
    assert t.job_state("j") == "ember/v1/jobs/j/state"
    assert t.job_model("j") == "ember/v1/jobs/j/model/global"
    assert t.job_updates("j", "pi-1") == "ember/v1/jobs/j/updates/pi-1"
    assert t.all_job_updates("j") == "ember/v1/jobs/j/updates/+"
    assert t.job_metrics("j", "pi-1") == "ember/v1/jobs/j/metrics/pi-1"
    assert t.all_job_metrics("j") == "ember/v1/jobs/j/metrics/+"
    assert t.all_job_metrics() == "ember/v1/jobs/+/metrics/+"
    assert t.metrics_sender("ember/v1/jobs/j/metrics/pi-1") == ("j", "pi-1")
    assert t.metrics_sender("ember/v1/jobs/j/metrics") is None
    assert t.metrics_sender("ember/v1/jobs/j/metrics/pi-1/x") is None
    assert t.metrics_sender("ember/v1/jobs/j/state/pi-1") is None
    assert t.job_progress("j", "pi-1") == "ember/v1/jobs/j/agents/pi-1/progress"
    assert t.all_job_progress("j") == "ember/v1/jobs/j/agents/+/progress"
    assert t.all_job_progress() == "ember/v1/jobs/+/agents/+/progress"
    assert t.rpc_requests() == "ember/v1/coordinator/rpc/requests"
    assert t.rpc_replies("cli-7") == "ember/v1/coordinator/rpc/replies/cli-7"


def test_custom_prefix_and_parsing() -> None:
    t = Topics("site/a/ember")
    assert t.agent_status("x") == "site/a/ember/agents/x/status"
    assert t.agent_of("site/a/ember/agents/x/status") == "x"
    assert t.job_of("site/a/ember/jobs/j9/updates/x") == "j9"
    assert t.agent_of("ember/v1/agents/x/status") is None
    assert t.job_of("site/a/ember/agents/x/status") is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$SYS", "x\0y", "n" * 129, ".", ".."])
def test_unsafe_segments_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="agent id"):
        check_segment(bad, "agent id")
    with pytest.raises(ValueError, match="agent id"):
        Topics().agent_status(bad)


@pytest.mark.parametrize("prefix", ["", "ember/", "ember/+", "a/#"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topics(prefix)


def test_shard_topics_and_parsing() -> None:
    t = Topics()
    assert t.shard_updates("j", 1, "pi") == "ember/v1/jobs/j/shards/1/updates/pi"
    assert t.all_shard_updates("j", 0) == "ember/v1/jobs/j/shards/0/updates/+"
    assert t.shard_held("j", 0) == "ember/v1/jobs/j/shards/0/held"
    assert t.all_shard_held("j") == "ember/v1/jobs/j/shards/+/held"
    assert t.shard_slice("j", 2) == "ember/v1/jobs/j/shards/2/slice"
    assert t.all_shard_slices("j") == "ember/v1/jobs/j/shards/+/slice"
    assert t.shard_commits("j") == "ember/v1/jobs/j/shards/commit"
    assert t.shard_of("ember/v1/jobs/j/shards/3/held") == 3
    assert t.shard_of("ember/v1/jobs/j/shards/commit") is None
    assert t.shard_of("ember/v1/jobs/j/updates/pi") is None
    with pytest.raises(ValueError, match="shard"):
        t.shard_held("j", -1)

"""MQTT topic names, all under one configurable prefix (default ``ember/v1``).

The table in DESIGN.md is the reference; this module is its only implementation. Agent, job and
role names become topic segments, so :func:`check_segment` refuses anything that would change a
topic's shape (``/``, the wildcards ``+`` and ``#``, NUL, a leading ``$``) or, as a directory
name, escape its parent (``.``, ``..``).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "ember/v1"
MAX_SEGMENT = 128


def check_segment(value: str, what: str = "name") -> str:
    """Return ``value`` if it is usable as one topic segment, else raise ``ValueError``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: must be a non-empty string")
    if len(value) > MAX_SEGMENT:
        raise ValueError(f"{what}: at most {MAX_SEGMENT} characters, got {len(value)}")
    bad = sorted({c for c in value if c in "/+#\0"})
    if bad:
        raise ValueError(f"{what}: {value!r} contains {''.join(bad)!r}, not allowed in a topic")
    if value.startswith("$"):
        raise ValueError(f"{what}: {value!r} starts with '$', reserved by brokers")
    if value in (".", ".."):
        # Names also become directory names (an agent's role state, checkpoints).
        raise ValueError(f"{what}: {value!r} is not a name")
    return value


@dataclass(frozen=True)
class Topics:
    """Every topic Ember uses, built from one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or self.prefix.endswith("/") or any(c in self.prefix for c in "+#\0"):
            raise ValueError(f"topic prefix {self.prefix!r} is not a valid topic without wildcards")

    # agents ------------------------------------------------------------------------------------
    def agent(self, agent: str, leaf: str) -> str:
        return f"{self.prefix}/agents/{check_segment(agent, 'agent id')}/{leaf}"

    def agent_status(self, agent: str) -> str:
        """Retained JSON presence; the agent's Will sets it offline."""
        return self.agent(agent, "status")

    def agent_info(self, agent: str) -> str:
        """Retained JSON capabilities and datasets."""
        return self.agent(agent, "info")

    def agent_telemetry(self, agent: str) -> str:
        """JSON health samples, QoS 0."""
        return self.agent(agent, "telemetry")

    def agent_inbox(self, agent: str) -> str:
        """msgpack commands from the coordinator (assign, cancel, ping)."""
        return self.agent(agent, "inbox")

    def agent_roles(self, agent: str) -> str:
        """Retained JSON: the roles this agent runs and how each is doing (running, finished,
        failed, refused, cancelled, with a reason), read by the coordinator and dashboards."""
        return self.agent(agent, "roles")

    def all_agents(self, leaf: str) -> str:
        """Filter for one leaf of every agent (``status``, ``info``, ``telemetry``)."""
        return f"{self.prefix}/agents/+/{leaf}"

    # jobs --------------------------------------------------------------------------------------
    def job(self, job: str, *rest: str) -> str:
        return "/".join((f"{self.prefix}/jobs/{check_segment(job, 'job id')}", *rest))

    def job_state(self, job: str) -> str:
        """Retained JSON job summary for dashboards."""
        return self.job(job, "state")

    def job_model(self, job: str, channel: str = "global") -> str:
        """Global (or a middle aggregator's) model versions, msgpack, chunked."""
        return self.job(job, "model", check_segment(channel, "model channel"))

    def job_updates(self, job: str, agent: str) -> str:
        """A trainer's deltas, msgpack, chunked; one topic per agent so ACLs can pin writers."""
        return self.job(job, "updates", check_segment(agent, "agent id"))

    def all_job_updates(self, job: str) -> str:
        return self.job(job, "updates", "+")

    # groups (hierarchical and hybrid FL) -----------------------------------------------------
    def _group(self, job: str, group: str, *rest: str) -> str:
        return self.job(job, "groups", check_segment(group, "group"), *rest)

    def group_updates(self, job: str, group: str, agent: str) -> str:
        """A group member's deltas and model requests to its middle aggregator (hierarchical
        FL, Liu et al. 2020), msgpack, chunked; one topic per agent so ACLs can pin writers."""
        return self._group(job, group, "updates", check_segment(agent, "agent id"))

    def all_group_updates(self, job: str, group: str) -> str:
        return self._group(job, group, "updates", "+")

    def group_model(self, job: str, group: str) -> str:
        """The global model versions (and receipts) the middle aggregator relays to its group."""
        return self._group(job, group, "model")

    def group_ring(self, job: str, group: str, sender: str, receiver: str) -> str:
        """Ring all-reduce chunks from one member of a hybrid group to its successor (written
        only by ``sender``; ``receiver`` subscribes to :meth:`group_ring_inbox`)."""
        return self._group(
            job,
            group,
            "ring",
            check_segment(sender, "agent id"),
            check_segment(receiver, "agent id"),
        )

    def group_ring_inbox(self, job: str, group: str, receiver: str) -> str:
        return self._group(job, group, "ring", "+", check_segment(receiver, "agent id"))

    # shards (sharded aggregation) ------------------------------------------------------------
    def _shard(self, job: str, shard: int, *rest: str) -> str:
        if isinstance(shard, int) and shard < 0:
            raise ValueError(f"shard: expected an integer ≥ 0, got {shard!r}")
        return self.job(job, "shards", check_segment(str(shard), "shard"), *rest)

    def shard_updates(self, job: str, shard: int, agent: str) -> str:
        """A trainer's part of its updates for aggregator shard ``shard`` (the slice of its
        delta that shard owns), msgpack, chunked; one topic per agent so ACLs can pin writers."""
        return self._shard(job, shard, "updates", check_segment(agent, "agent id"))

    def all_shard_updates(self, job: str, shard: int) -> str:
        return self._shard(job, shard, "updates", "+")

    def shard_held(self, job: str, shard: int) -> str:
        """The update parts shard ``shard`` holds, for the assembler (small msgpack)."""
        return self._shard(job, shard, "held")

    def all_shard_held(self, job: str) -> str:
        return self.job(job, "shards", "+", "held")

    def shard_slice(self, job: str, shard: int) -> str:
        """Shard ``shard``'s slice of each model version, for the assembler, msgpack, chunked."""
        return self._shard(job, shard, "slice")

    def all_shard_slices(self, job: str) -> str:
        return self.job(job, "shards", "+", "slice")

    def shard_commits(self, job: str) -> str:
        """The assembler's commits (which updates make each version) to every shard."""
        return self.job(job, "shards", "commit")

    def shard_of(self, topic: str) -> int | None:
        """The shard index in a ``jobs/<job>/shards/<shard>/...`` topic, or ``None``."""
        levels = self._levels(topic)
        if levels is None or len(levels) < 5 or levels[2] != "shards" or not levels[3].isdigit():
            return None
        return int(levels[3])

    def job_metrics(self, job: str, agent: str) -> str:
        """JSON metric events of the job's roles on one agent, QoS 0. One topic per agent, as
        for updates, so broker ACLs can pin its writer: the coordinator believes a job-ending
        event only from the agent it assigned the job's aggregator."""
        return self.job(job, "metrics", check_segment(agent, "agent id"))

    def all_job_metrics(self, job: str = "+") -> str:
        """Filter for every agent's metric events of one job (``+``: of every job)."""
        head = f"{self.prefix}/jobs/+" if job == "+" else self.job(job)
        return f"{head}/metrics/+"

    def metrics_sender(self, topic: str) -> tuple[str, str] | None:
        """``(job, agent)`` of a ``jobs/<job>/metrics/<agent>`` topic, or ``None``."""
        levels = self._levels(topic)
        if levels is None or len(levels) != 4 or levels[0] != "jobs" or levels[2] != "metrics":
            return None
        return levels[1], levels[3]

    def job_progress(self, job: str, agent: str) -> str:
        """Retained JSON: how each of ``agent``'s roles in ``job`` is doing right now (state,
        updates sent, model version, ...), written by that agent; one topic per agent so ACLs
        can pin writers."""
        return self.job(job, "agents", check_segment(agent, "agent id"), "progress")

    def all_job_progress(self, job: str = "+") -> str:
        """Filter for every agent's progress in ``job`` (every job by default)."""
        head = f"{self.prefix}/jobs/+" if job == "+" else self.job(job)
        return f"{head}/agents/+/progress"

    def all_jobs(self, leaf: str) -> str:
        """Filter for one leaf of every job (``state``, ``metrics``)."""
        return f"{self.prefix}/jobs/+/{leaf}"

    # enrolment ---------------------------------------------------------------------------------
    def enrol_requests(self) -> str:
        """Where ``ember-agent enroll`` sends its token-proved request (the coordinator reads)."""
        return f"{self.prefix}/enrol/requests"

    def enrol_replies(self, client: str) -> str:
        """Where the enrolling agent with MQTT client id ``client`` reads its answer (the broker
        ACL lets each client read only the one named by its own client id)."""
        return f"{self.prefix}/enrol/replies/{client}"

    # coordinator RPC ---------------------------------------------------------------------------
    def rpc_requests(self) -> str:
        """Where the CLI sends requests to the coordinator."""
        return f"{self.prefix}/coordinator/rpc/requests"

    def rpc_replies(self, client: str) -> str:
        """Where one CLI client waits for its answers (named in each request)."""
        return f"{self.prefix}/coordinator/rpc/replies/{check_segment(client, 'client id')}"

    # parsing -----------------------------------------------------------------------------------
    def agent_of(self, topic: str) -> str | None:
        """The agent id in an ``agents/<id>/...`` topic, or ``None``."""
        levels = self._levels(topic)
        return levels[1] if levels and len(levels) >= 3 and levels[0] == "agents" else None

    def job_of(self, topic: str) -> str | None:
        """The job id in a ``jobs/<id>/...`` topic, or ``None``."""
        levels = self._levels(topic)
        return levels[1] if levels and len(levels) >= 3 and levels[0] == "jobs" else None

    def _levels(self, topic: str) -> list[str] | None:
        head = self.prefix + "/"
        return topic[len(head) :].split("/") if topic.startswith(head) else None

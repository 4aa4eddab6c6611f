"""Who may publish and read what: the mosquitto ACL of an Ember fleet.

Each account gets its own ``user`` block (mosquitto's ``acl_file`` format); nothing is granted to
all users by ``pattern`` except reading one's own enrolment reply topic, which is named by the
MQTT client id (``%c``). Grants, by kind of account:

* **agent** (username = agent id): write only its own ``agents/<id>/{status,info,telemetry,
  roles}``, its own ``jobs/+/updates/<id>`` (updates and model requests) and its own
  ``jobs/+/agents/<id>/progress``; read only its own inbox and the jobs' model topics (versions
  and update receipts). In hierarchical and hybrid jobs also its own
  ``jobs/+/groups/+/updates/<id>``, the groups' relayed ``model`` topics, and its own side of
  a hybrid group's ring (writes ``ring/<id>/+``, reads ``ring/+/<id>``). In sharded jobs its
  own ``jobs/+/shards/+/updates/<id>`` (each shard's slice of its updates).
* **aggregator agent** (an agent account with the aggregator grant): also write the jobs'
  model topics, read every trainer's updates and write its own ``jobs/+/metrics/<id>`` (model
  versions, completion: events the coordinator acts on, so a trainer may not send them; the
  coordinator also believes them only from the agent it made the job's aggregator). An
  agent without the grant that is placed as an aggregator has its model versions dropped by
  the broker, so give the grant to the agents labelled ``role=aggregator`` (gateways) and no
  others. The grant also covers a group's middle aggregator (hierarchical and hybrid jobs):
  relaying versions on ``jobs/+/groups/+/model`` and reading the group members' updates;
  its own update upstream goes on its own ``jobs/+/updates/<id>`` like a trainer's.
  It also covers a sharded job's shards and assembler: ``jobs/+/shards/#`` (parts, held
  reports, slices and commits).
* **coordinator**: read and write everything under the prefix and the Home Assistant discovery
  prefix (it also runs the embedded agent that hosts the top aggregator, under the same
  credential, on the same host).
* **operator** (the ``ember`` CLI, dashboards, Home Assistant): read everything under the
  prefix and the discovery prefix, write only coordinator RPC requests and Home Assistant's
  birth message (``<discovery prefix>/status``).

Agents with Home Assistant discovery on also write their own discovery configs
(``<discovery prefix>/+/ember_agent_<id>/+/config``) and read Home Assistant's status.
* **enrol**: the shared, low-value enrolment credential: write enrolment requests only.

Agents' Will (retained ``offline`` on their status topic) needs the write grant on that topic,
which they have; mosquitto refuses a CONNECT whose Will topic the client may not write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from agent.protocol.homeassistant import DEFAULT_DISCOVERY_PREFIX, STATUS_LEAF, node_id
from agent.protocol.topics import Topics
from coordinator.brokerkit.passwords import check_username

Kind = Literal["agent", "coordinator", "operator", "enrol"]
KINDS: tuple[Kind, ...] = ("agent", "coordinator", "operator", "enrol")
AGENT_LEAVES = ("status", "info", "telemetry", "roles")
"""The agent topics an agent publishes (its inbox is written by the coordinator only)."""
ENROL_USER = "ember-enrol"
COORDINATOR_USER = "ember-coordinator"


@dataclass(frozen=True)
class Account:
    """One broker login."""

    username: str
    kind: Kind
    aggregator: bool = False
    """Agents only: may host aggregator roles (write model topics, read updates)."""

    def __post_init__(self) -> None:
        check_username(self.username)
        if self.kind not in KINDS:
            raise ValueError(f"account {self.username}: kind must be one of {KINDS}")

    def grants(
        self, topics: Topics, discovery: str = DEFAULT_DISCOVERY_PREFIX
    ) -> list[tuple[str, str]]:
        """``(access, topic filter)`` pairs for this account's ``user`` block."""
        p = topics.prefix
        if self.kind == "coordinator":
            return [("readwrite", f"{p}/#"), ("readwrite", f"{discovery}/#")]
        if self.kind == "operator":
            return [
                ("read", f"{p}/#"),
                ("write", topics.rpc_requests()),
                ("read", f"{discovery}/#"),
                ("write", f"{discovery}/{STATUS_LEAF}"),
            ]
        if self.kind == "enrol":
            return [("write", topics.enrol_requests())]
        me = self.username
        rules = [("write", topics.agent(me, leaf)) for leaf in AGENT_LEAVES]
        rules += [
            ("read", topics.agent_inbox(me)),
            ("write", f"{p}/jobs/+/updates/{me}"),
            ("write", f"{p}/jobs/+/agents/{me}/progress"),
            # Hierarchical and hybrid jobs: its own updates to its group's middle aggregator,
            # the versions that aggregator relays, and its own side of the group's ring.
            ("write", f"{p}/jobs/+/groups/+/updates/{me}"),
            ("read", f"{p}/jobs/+/groups/+/model"),
            ("write", f"{p}/jobs/+/groups/+/ring/{me}/+"),
            ("read", f"{p}/jobs/+/groups/+/ring/+/{me}"),
            # Sharded jobs: its slice of each update to each aggregator shard.
            ("write", f"{p}/jobs/+/shards/+/updates/{me}"),
            ("write", f"{discovery}/+/{node_id('agent', me)}/+/config"),
            ("read", f"{discovery}/{STATUS_LEAF}"),
        ]
        if self.aggregator:
            rules += [
                ("readwrite", f"{p}/jobs/+/model/#"),
                ("readwrite", f"{p}/jobs/+/groups/+/model"),
                ("read", f"{p}/jobs/+/groups/+/updates/+"),
                ("read", f"{p}/jobs/+/updates/+"),
                ("write", f"{p}/jobs/+/metrics/{me}"),
                # Sharded jobs: shards read their parts and the commits and write their held
                # reports and slices; the assembler reads those and writes the commits.
                ("readwrite", f"{p}/jobs/+/shards/#"),
            ]
        else:
            rules.append(("read", f"{p}/jobs/+/model/#"))
        return rules


def render_acl(
    topics: Topics, accounts: Iterable[Account], discovery: str = DEFAULT_DISCOVERY_PREFIX
) -> str:
    """The whole ACL file (``discovery``: Home Assistant's MQTT discovery prefix)."""
    lines = [
        "# Written by 'ember broker config'; regenerated on every change (change kit.json).",
        "# Anonymous clients: nothing (allow_anonymous is false as well).",
        "",
        "# Everyone may read the enrolment reply addressed to its own MQTT client id.",
        f"pattern read {topics.enrol_replies('%c')}",
    ]
    for account in sorted(accounts, key=lambda a: (KINDS.index(a.kind), a.username)):
        extra = " (aggregator)" if account.aggregator else ""
        lines += ["", f"# {account.kind}{extra}", f"user {account.username}"]
        lines += [f"topic {access} {topic}" for access, topic in account.grants(topics, discovery)]
    return "\n".join(lines) + "\n"

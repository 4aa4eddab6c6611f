"""Home Assistant MQTT discovery documents for Ember's agents and jobs.

Follows Home Assistant's MQTT discovery protocol, one config message per entity: a retained JSON
document on ``<discovery prefix>/<component>/<node id>/<object id>/config`` naming a
``unique_id``, the ``device`` it belongs to, the ``state_topic`` it reads and a
``value_template`` (Jinja2 over ``value_json``, the state payload parsed as JSON); an empty
retained payload on the same topic removes the entity. Every agent is a device whose
``availability`` follows its retained status topic (``{{ value_json.state }}`` is ``online`` or
``offline``, the broker publishing ``offline`` as the agent's Will); every running job is a
device reading the job's retained state. Templates render ``None`` for a value not known yet,
which Home Assistant shows as *unknown*.

Only the documents live here (pure functions, no I/O); :mod:`agent.homeassistant` keeps them on
the broker.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.protocol.topics import Topics

DEFAULT_DISCOVERY_PREFIX = "homeassistant"
ORIGIN = {"name": "ember", "sw": __version__}
"""Who wrote a discovery message (Home Assistant's ``origin`` option)."""
STATUS_LEAF = "status"
"""Home Assistant announces itself with ``online`` on ``<discovery prefix>/status``."""
_NODE_ID = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity: its platform (``sensor``, ``binary_sensor``), an object id
    unique within its device, and its discovery config."""

    component: str
    object_id: str
    config: dict[str, Any]


def check_discovery_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a usable discovery prefix, else raise ``ValueError``."""
    try:
        Topics(prefix)  # the same rules as Ember's own prefix
    except ValueError:
        raise ValueError(f"{prefix!r} is not a valid topic without wildcards") from None
    return prefix


def node_id(kind: str, name: str) -> str:
    """A discovery node id for an agent or job: ``ember_<kind>_<name>`` where the name is
    Home Assistant-safe (``[A-Za-z0-9_-]``); a name that is not gets a hash suffix, so two
    names never share a node."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
    if safe != name:
        safe += "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"ember_{kind}_{safe}"


def config_topic(discovery_prefix: str, node: str, entity: Entity) -> str:
    if not _NODE_ID.fullmatch(node) or not _NODE_ID.fullmatch(entity.object_id):
        raise ValueError(f"node {node!r} / object {entity.object_id!r}: only [A-Za-z0-9_-]")
    return f"{discovery_prefix}/{entity.component}/{node}/{entity.object_id}/config"


def _sensor(
    node: str,
    object_id: str,
    name: str,
    state_topic: str,
    template: str,
    device: dict[str, Any],
    **options: Any,
) -> Entity:
    config = {
        "name": name,
        "unique_id": f"{node}_{object_id}",
        "device": device,
        "origin": ORIGIN,
        "state_topic": state_topic,
        "value_template": template,
        **options,
    }
    return Entity("sensor", object_id, config)


def agent_entities(
    agent: str, topics: Topics, *, version: str = __version__, telemetry_interval: float = 10.0
) -> list[Entity]:
    """An agent as a device: online, CPU, memory, temperature, current roles, updates sent."""
    node = node_id("agent", agent)
    device = {
        "identifiers": [node],
        "name": f"Ember agent {agent}",
        "manufacturer": "Ember",
        "model": "ember-agent",
        "sw_version": version,
    }
    status = topics.agent_status(agent)
    availability = {
        "availability": [
            {
                "topic": status,
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]
    }
    telemetry = topics.agent_telemetry(agent)
    fresh = {"expire_after": max(1, round(3 * telemetry_interval))} if telemetry_interval else {}
    sample = {**availability, **fresh}
    online = Entity(
        "binary_sensor",
        "online",
        {
            "name": "Online",
            "unique_id": f"{node}_online",
            "device": device,
            "origin": ORIGIN,
            "state_topic": status,
            "value_template": "{{ value_json.state }}",
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
        },
    )
    return [
        online,
        _sensor(
            node,
            "cpu",
            "CPU",
            telemetry,
            "{{ value_json.cpu_percent }}",
            device,
            unit_of_measurement="%",
            state_class="measurement",
            **sample,
        ),
        _sensor(
            node,
            "memory",
            "Memory",
            telemetry,
            "{{ value_json.memory.percent }}",
            device,
            unit_of_measurement="%",
            state_class="measurement",
            **sample,
        ),
        _sensor(
            node,
            "temperature",
            "Temperature",
            telemetry,
            "{{ value_json.temperature_max }}",
            device,
            unit_of_measurement="°C",
            device_class="temperature",
            state_class="measurement",
            **sample,
        ),
        _sensor(
            node,
            "role",
            "Current role",
            telemetry,
            "{{ value_json.roles | join(', ') if value_json.roles else 'idle' }}",
            device,
            icon="mdi:school",
            **sample,
        ),
        _sensor(
            node,
            "updates_sent",
            "Updates sent",
            telemetry,
            "{{ value_json.updates_sent }}",
            device,
            state_class="total_increasing",
            icon="mdi:upload",
            **sample,
        ),
    ]


def job_entities(job: str, name: str, topics: Topics) -> list[Entity]:
    """A running job as a device: phase, model version, accuracy, updates applied, progress."""
    node = node_id("job", job)
    device = {
        "identifiers": [node],
        "name": f"Ember job {name} ({job})",
        "manufacturer": "Ember",
        "model": "federated learning job",
        "sw_version": __version__,
    }
    state = topics.job_state(job)
    return [
        _sensor(node, "phase", "Phase", state, "{{ value_json.phase }}", device, icon="mdi:flag"),
        _sensor(
            node,
            "model_version",
            "Model version",
            state,
            "{{ value_json.model_version }}",
            device,
            state_class="measurement",
            icon="mdi:source-branch",
        ),
        _sensor(
            node,
            "accuracy",
            "Accuracy",
            state,
            "{{ value_json.metrics.get('accuracy') }}",
            device,
            state_class="measurement",
            icon="mdi:bullseye-arrow",
        ),
        _sensor(
            node,
            "updates_applied",
            "Updates applied",
            state,
            "{{ value_json.updates_applied }}",
            device,
            state_class="total_increasing",
            icon="mdi:download",
        ),
        _sensor(
            node,
            "progress",
            "Progress",
            state,
            "{{ (value_json.progress * 100) | round(1) }}",
            device,
            unit_of_measurement="%",
            state_class="measurement",
            icon="mdi:progress-check",
        ),
    ]


def discovery_messages(
    discovery_prefix: str, node: str, entities: list[Entity]
) -> dict[str, bytes]:
    """Config topic → retained JSON payload for each entity of one device."""
    return {
        config_topic(discovery_prefix, node, e): json.dumps(
            e.config, separators=(",", ":"), ensure_ascii=False
        ).encode()
        for e in entities
    }


def agent_discovery(
    discovery_prefix: str, agent: str, topics: Topics, **options: Any
) -> dict[str, bytes]:
    return discovery_messages(
        discovery_prefix, node_id("agent", agent), agent_entities(agent, topics, **options)
    )


def job_discovery(discovery_prefix: str, job: str, name: str, topics: Topics) -> dict[str, bytes]:
    return discovery_messages(
        discovery_prefix, node_id("job", job), job_entities(job, name, topics)
    )

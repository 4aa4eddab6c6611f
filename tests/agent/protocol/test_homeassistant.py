"""Home Assistant discovery documents: topics, devices, and templates that read real fields."""

from __future__ import annotations

import json

import pytest

from agent.protocol.homeassistant import (
    agent_discovery,
    check_discovery_prefix,
    job_discovery,
    node_id,
)
from agent.protocol.topics import Topics
from tests.ha_templates import is_number_or_unknown, render

TELEMETRY = {
    "v": 1,
    "agent": "pi-1",
    "ts": 1.0,
    "cpu_percent": 12.5,
    "memory": {"total": 8, "available": 4, "percent": 50.0},
    "temperature": {"cpu_thermal": 61.3},
    "temperature_max": 61.3,
    "roles": ["digits-3f9a1c/trainer"],
    "updates_sent": 7,
}


def test_agent_device_sensors_read_the_telemetry_and_status() -> None:
    topics = Topics("ember/v1")
    configs = {
        t: json.loads(p) for t, p in agent_discovery("homeassistant", "pi-1", topics).items()
    }
    assert set(configs) == {
        "homeassistant/binary_sensor/ember_agent_pi-1/online/config",
        *(
            f"homeassistant/sensor/ember_agent_pi-1/{name}/config"
            for name in ("cpu", "memory", "temperature", "role", "updates_sent")
        ),
    }
    values = {}
    for config in configs.values():
        assert config["device"]["identifiers"] == ["ember_agent_pi-1"]
        assert config["unique_id"].startswith("ember_agent_pi-1_")
        if config["state_topic"] == topics.agent_telemetry("pi-1"):
            values[config["name"]] = render(config["value_template"], json.dumps(TELEMETRY))
            [availability] = config["availability"]
            assert availability["topic"] == topics.agent_status("pi-1")
            offline = json.dumps({"state": "offline", "reason": "connection lost"})
            assert render(availability["value_template"], offline) == "offline"
    assert values == {
        "CPU": "12.5",
        "Memory": "50.0",
        "Temperature": "61.3",
        "Current role": "digits-3f9a1c/trainer",
        "Updates sent": "7",
    }
    quiet = {**TELEMETRY, "roles": [], "temperature": {}, "temperature_max": None}
    role = configs["homeassistant/sensor/ember_agent_pi-1/role/config"]
    assert render(role["value_template"], json.dumps(quiet)) == "idle"
    temperature = configs["homeassistant/sensor/ember_agent_pi-1/temperature/config"]
    assert render(temperature["value_template"], json.dumps(quiet)) == "None"  # unknown in HA
    online = configs["homeassistant/binary_sensor/ember_agent_pi-1/online/config"]
    assert "availability" not in online  # it says offline rather than unavailable
    assert render(online["value_template"], '{"state": "online"}') == online["payload_on"]


def test_job_device_reads_the_job_state_before_and_after_an_evaluation() -> None:
    topics = Topics("ember/v1")
    configs = [
        json.loads(p) for p in job_discovery("ha", "digits-3f9a1c", "digits", topics).values()
    ]
    assert {c["name"] for c in configs} == {
        "Phase",
        "Model version",
        "Accuracy",
        "Updates applied",
        "Progress",
    }
    early = {"phase": "running", "model_version": 0, "updates_applied": 0, "metrics": {}}
    later = {**early, "model_version": 4, "metrics": {"accuracy": 0.871}, "progress": 0.24}
    for config in configs:
        assert config["state_topic"] == topics.job_state("digits-3f9a1c")
        assert config["device"]["name"] == "Ember job digits (digits-3f9a1c)"
        rendered = render(config["value_template"], json.dumps({**later}))
        if config["name"] != "Phase":
            assert is_number_or_unknown(rendered), (config["name"], rendered)
    accuracy = next(c for c in configs if c["name"] == "Accuracy")
    assert render(accuracy["value_template"], json.dumps({**early, "progress": 0})) == "None"
    assert render(accuracy["value_template"], json.dumps(later)) == "0.871"


def test_node_ids_are_home_assistant_safe_and_distinct() -> None:
    assert node_id("agent", "pi-1") == "ember_agent_pi-1"
    odd = {node_id("agent", name) for name in ("pi.1", "pi 1", "pi_1", "π1")}
    assert len(odd) == 4
    assert all(n.replace("_", "").replace("-", "").isalnum() and n.isascii() for n in odd)


@pytest.mark.parametrize("bad", ["", "ha/", "ha/#", "+", "x\0"])
def test_bad_discovery_prefixes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid topic"):
        check_discovery_prefix(bad)

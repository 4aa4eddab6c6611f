"""The agent's systemd unit, checked by systemd-analyze (no running systemd needed).

The unit's ExecStart is ``/usr/bin/env ember-agent ...`` so that it works wherever the console
script was installed (its PATH lists /opt/ember-agent/bin, /usr/local/bin and /usr/bin);
``systemd-analyze verify`` therefore checks the unit as shipped, unmodified.
"""

from __future__ import annotations

from tests.systemd_units import UNITS, directives

UNIT = UNITS / "ember-agent.service"


def test_the_unit_keeps_what_the_agent_needs() -> None:
    unit = directives(UNIT)
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert "WatchdogSec" in unit
    assert unit["RestartPreventExitStatus"] == ["2"]
    assert unit["StateDirectory"] == ["ember-agent"]
    assert unit["DynamicUser"] == ["yes"]
    assert "ProcSubset" not in unit  # ProcSubset=pid hides /proc/stat and /proc/meminfo
    assert unit.get("PrivateDevices", ["no"]) == ["no"]  # would hide GPUs
    allowed = " ".join(unit["DeviceAllow"])
    for group in ("char-nvidia*", "char-drm", "char-vchiq"):
        assert group in allowed

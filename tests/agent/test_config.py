"""The agent's TOML configuration, environment overrides and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import (
    ConfigError,
    SpoolConfig,
    load_config,
    parse_config,
    resolve_agent_id,
)
from agent.protocol.bundle import public_key_to_text

ISSUE_EXAMPLE = """
[agent]
id = "pi-kitchen"                 # optional: default is a stable id kept in state_dir
state_dir = "/var/lib/ember-agent"
labels = { site = "kitchen" }
[broker]
url = "mqtt://127.0.0.1:1883"     # or a list; mqtts:// for TLS; username/password options
[[datasets]]
name = "digits"
path = "/data/digits.npz"         # npz with arrays x and y; also CSV and a folder of .npy
tags = ["vision"]
"""


def test_the_example_from_the_issue() -> None:
    config = parse_config(ISSUE_EXAMPLE, env={})
    assert config.id == "pi-kitchen"
    assert config.state_dir == Path("/var/lib/ember-agent")
    assert dict(config.labels) == {"site": "kitchen"}
    assert config.broker.urls == ("mqtt://127.0.0.1:1883",)
    assert config.broker.keepalive == 30
    assert config.topic_prefix == "ember/v1"
    assert config.allow_code is False
    assert config.telemetry.interval == 10
    assert config.zeroconf.enabled
    assert config.zeroconf.interfaces is None
    [digits] = config.datasets
    assert (digits.name, digits.path, digits.tags) == (
        "digits",
        Path("/data/digits.npz"),
        ("vision",),
    )


def test_every_section(tmp_path: Path) -> None:
    key = public_key_to_text(Ed25519PrivateKey.generate().public_key())
    file = tmp_path / "agent.toml"
    file.write_text(
        f"""
[agent]
state_dir = "state"
topic_prefix = "site-a/ember"
allow_code = true
[broker]
url = ["mqtts://a.example:8883", "mqtt://b.example"]
username = "pi"
password = "secret"
ca_file = "ca.pem"
keepalive = 5
[trust]
coordinator_keys = ["{key}"]
[telemetry]
interval = 2.5
[zeroconf]
enabled = false
interfaces = ["127.0.0.1", "::1"]
[[datasets]]
name = "local"
path = "data/x.csv"
label_column = "label"
"""
    )
    config = load_config(file, env={})
    assert config.id is None
    assert config.state_dir == tmp_path / "state"  # relative to the config file
    assert config.topics.agent_status("a") == "site-a/ember/agents/a/status"
    assert config.allow_code
    assert config.broker.urls == ("mqtts://a.example:8883", "mqtt://b.example")
    assert (config.broker.username, config.broker.password) == ("pi", "secret")
    assert config.broker.ca_file == str(tmp_path / "ca.pem")
    assert config.broker.keepalive == 5
    assert config.coordinator_keys == (key,)
    assert config.telemetry.interval == 2.5
    assert config.zeroconf.interfaces == ("127.0.0.1", "::1")
    assert not config.zeroconf.enabled
    assert config.datasets[0].path == tmp_path / "data" / "x.csv"
    assert config.datasets[0].label_column == "label"
    assert config.source == file


def test_environment_overrides_keys() -> None:
    env = {
        "EMBER_AGENT__BROKER__URL": "mqtts://broker.lan:8883",
        "ember_agent__telemetry__interval": "3",
        "EMBER_AGENT__AGENT__LABELS": '{ site = "garage", floor = 1 }',
        "EMBER_AGENT__ZEROCONF__ENABLED": "false",
        "EMBER_AGENT__AGENT__ID": "pi-garage",
        "UNRELATED": "x",
    }
    config = parse_config(ISSUE_EXAMPLE, env=env)
    assert config.broker.urls == ("mqtts://broker.lan:8883",)
    assert config.telemetry.interval == 3
    assert dict(config.labels) == {"site": "garage", "floor": "1"}
    assert config.zeroconf.enabled is False
    assert config.id == "pi-garage"


def test_simulated_slowdown_defaults_to_none() -> None:
    assert parse_config("").simulation.slowdown == 1.0
    assert parse_config("[simulation]\nslowdown = 10\n").simulation.slowdown == 10.0
    paced = parse_config("[simulation]\nmin_update_seconds = 0.5\n").simulation
    assert (paced.slowdown, paced.min_update_seconds) == (1.0, 0.5)


def test_spool_bounds() -> None:
    assert parse_config("").spool == SpoolConfig(max_updates=32, max_mb=256.0)
    spool = parse_config("[spool]\nmax_updates = 4\nmax_mb = 0.5\n").spool
    assert (spool.max_updates, spool.max_mb) == (4, 0.5)


def test_simulated_partial_work_is_off_unless_asked() -> None:
    assert parse_config("").simulation.partial_work is False
    assert parse_config("[simulation]\npartial_work = true\n").simulation.partial_work is True


def test_state_dir_defaults_to_systemd_state_directory() -> None:
    config = parse_config("", env={"STATE_DIRECTORY": "/var/lib/ember-agent"})
    assert config.state_dir == Path("/var/lib/ember-agent")


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[agent\n", {}, "config: <config> is not valid TOML"),
        ("[agnet]\n", {}, "agnet: unknown section"),
        ('[broker]\nurll = "x"\n', {}, "broker.urll: unknown key"),
        ('[broker]\nurl = "http://x"\n', {}, "broker.url: broker url 'http://x': scheme must be"),
        ("[broker]\nurl = 5\n", {}, "broker.url: expected a URL or a list of URLs, got 5"),
        ("[broker]\nkeepalive = 0.5\n", {}, "broker.keepalive: expected a whole number"),
        ('[broker]\nkeepalive = "x"\n', {}, "broker.keepalive: expected a number, got 'x'"),
        ('[agent]\nid = "a/b"\n', {}, "agent.id: 'a/b' contains '/'"),
        ('[agent]\nlabels = "x"\n', {}, "agent.labels: expected a table of strings"),
        ('[agent]\ntopic_prefix = "a/#"\n', {}, "agent.topic_prefix:"),
        ('[agent]\nallow_code = "maybe"\n', {}, "agent.allow_code: expected true or false"),
        ('[trust]\ncoordinator_keys = ["rsa:x"]\n', {}, "trust.coordinator_keys[0]: expected"),
        ('[trust]\ncoordinator_keys = ["ed25519:AAAA"]\n', {}, "is 32 bytes, got 3"),
        ("[telemetry]\ninterval = -1\n", {}, "telemetry.interval: must be ≥ 0, got -1"),
        ("[simulation]\nslowdown = 0.5\n", {}, "simulation.slowdown: must be ≥ 1, got 0.5"),
        ('[simulation]\npartial_work = "often"\n', {}, "simulation.partial_work: expected true or"),
        ("[spool]\nmax_updates = 0\n", {}, "spool.max_updates: must be ≥ 1, got 0"),
        ("[spool]\nmax_mb = 'x'\n", {}, "spool.max_mb: expected a number, got 'x'"),
        ('[zeroconf]\ninterfaces = ["eth0"]\n', {}, "zeroconf.interfaces[0]: 'eth0' is not an IP"),
        ("[[datasets]]\npath = 'x.npz'\n", {}, "datasets[0].name: missing"),
        ("[[datasets]]\nname = 'd'\n", {}, "datasets[0].path: missing (dataset 'd' needs a path)"),
        (
            "[[datasets]]\nname = 'd'\npath = 'a'\n[[datasets]]\nname = 'd'\npath = 'b'\n",
            {},
            "datasets[1].name: dataset 'd' is defined twice",
        ),
        ("[[datasets]]\nname='d'\npath='x'\nformat='parquet'\n", {}, "datasets[0].format: must"),
        ("[[datasets]]\nname='d'\npath='x'\ncolour='red'\n", {}, "datasets[0].colour: unknown"),
        ("", {"EMBER_AGENT__BROKER": "x"}, "EMBER_AGENT__BROKER: expected EMBER_AGENT__<SECTION>"),
        ("", {"EMBER_AGENT__DATASETS__NAME": "x"}, "datasets cannot be set from the environment"),
        ("", {"EMBER_AGENT__BROKER__KEEPALIVE": "soon"}, "broker.keepalive: expected a number"),
    ],
)
def test_errors_name_the_key(text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value).strip() or "TOML" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config: .*nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_agent_id_is_generated_once_and_kept(tmp_path: Path) -> None:
    config = parse_config(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n', env={})
    first = resolve_agent_id(config)
    assert first == resolve_agent_id(config)
    assert (tmp_path / "state" / "agent_id").read_text().strip() == first
    assert "/" not in first


def test_unwritable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = parse_config(f'[agent]\nstate_dir = "{blocker / "state"}"\n', env={})
    with pytest.raises(ConfigError, match=r"agent.state_dir: cannot"):
        resolve_agent_id(config)

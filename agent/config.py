"""The agent's configuration: one TOML file, with environment variables overriding its keys.

The file (``ember-agent run --config /etc/ember-agent/agent.toml``)::

    [agent]
    id = "pi-kitchen"            # optional: else generated once and kept in state_dir/agent_id
    state_dir = "/var/lib/ember-agent"
    labels = { site = "kitchen" }
    topic_prefix = "ember/v1"
    allow_code = false           # run bundles that carry Python source?
    [broker]
    url = "mqtt://127.0.0.1:1883"   # or a list; mqtts:// for TLS
    username = "..."; password = "..."; ca_file = "..."; keepalive = 30
    [trust]
    coordinator_keys = ["ed25519:<base64>"]
    [telemetry]
    interval = 10
    [zeroconf]
    enabled = true
    interfaces = ["127.0.0.1"]
    [homeassistant]
    enabled = false              # announce this agent to Home Assistant (MQTT discovery)
    discovery_prefix = "homeassistant"
    [[datasets]]
    name = "digits"; path = "/data/digits.npz"; tags = ["vision"]

Environment overrides: ``EMBER_AGENT__<SECTION>__<KEY>=value`` (double underscores, any case),
e.g. ``EMBER_AGENT__BROKER__URL=mqtts://broker.lan``. A value is read as a TOML value when it
is one (``10``, ``true``, ``["a", "b"]``, ``{ site = "x" }``) and as a plain string otherwise.
``datasets`` cannot be set from the environment (it is a list of tables).

Every problem raises :class:`ConfigError` whose message starts with the key it is about
(``broker.url: scheme must be mqtt:// or mqtts://``), so the CLI can print it as one line.
Dataset paths are relative to the configuration file's directory.
"""

from __future__ import annotations

import base64
import importlib
import os
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from agent.protocol.homeassistant import DEFAULT_DISCOVERY_PREFIX, check_discovery_prefix
from agent.protocol.topics import DEFAULT_PREFIX, Topics, check_segment
from agent.transport import BrokerConfig

ENV_PREFIX = "EMBER_AGENT__"
DEFAULT_CONFIG_PATH = Path("/etc/ember-agent/agent.toml")
DATASET_FORMATS = ("auto", "npz", "csv", "npy_dir")

# tomllib is in the standard library from 3.11; tomli is the same parser for 3.10.
_toml: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")


class ConfigError(ValueError):
    """A configuration problem; ``str(error)`` names the key (``broker.url: ...``)."""


@dataclass(frozen=True)
class DatasetConfig:
    """One local dataset: npz with arrays ``x`` and ``y``, a CSV file or a folder of .npy."""

    name: str
    path: Path
    tags: tuple[str, ...] = ()
    format: str = "auto"
    """``auto`` picks by the path: ``.npz``, ``.csv``/``.tsv``/``.txt``, or a directory."""
    label_column: str | int | None = None
    """CSV only: the label column by header name or 0-based index; default the last column."""


@dataclass(frozen=True)
class TelemetryConfig:
    interval: float = 10.0
    """Seconds between telemetry samples; 0 turns telemetry off."""


@dataclass(frozen=True)
class ZeroconfConfig:
    enabled: bool = True
    interfaces: tuple[str, ...] | None = None
    """IP addresses of the interfaces to advertise on; ``None``: all of them."""


@dataclass(frozen=True)
class HomeAssistantConfig:
    """Home Assistant MQTT discovery: the agent as a device with its sensors."""

    enabled: bool = False
    discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX


@dataclass(frozen=True)
class SimulationConfig:
    """Experiments only: make this agent behave like a slower device."""

    slowdown: float = 1.0
    """After each local training run the trainer waits (slowdown − 1) × the run's time, so one
    machine can play a fleet with stragglers. 1 (the default) changes nothing."""
    partial_work: bool = False
    """Play a device that cannot finish its local work: each local training run stops after a
    seeded, uniformly random number of steps below the job's (the FedProx paper's stragglers,
    Li et al. 2020). What becomes of that partial work is the job's ``algorithm.partial_work``."""
    min_update_seconds: float = 0.0
    """Each local training run takes at least this long (the trainer waits out the rest): a
    fleet's pace that does not depend on how fast this machine is. 0 changes nothing."""


@dataclass(frozen=True)
class SpoolConfig:
    """Bounds of the disk spool that keeps a trainer's updates until the aggregator has them."""

    max_updates: int = 32
    """Updates kept at most; a full spool pauses training until receipts free room."""
    max_mb: float = 256.0
    """Megabytes of updates kept at most."""


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent configuration, validated."""

    state_dir: Path
    broker: BrokerConfig
    id: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    topic_prefix: str = DEFAULT_PREFIX
    allow_code: bool = False
    coordinator_keys: tuple[str, ...] = ()
    """Public keys (``ed25519:<base64>``) whose signed bundles this agent runs."""
    telemetry: TelemetryConfig = TelemetryConfig()
    zeroconf: ZeroconfConfig = ZeroconfConfig()
    datasets: tuple[DatasetConfig, ...] = ()
    simulation: SimulationConfig = SimulationConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    spool: SpoolConfig = SpoolConfig()
    source: Path | None = None
    """The file this configuration was read from."""

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


# -- loading -------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read ``path``, apply ``EMBER_AGENT__*`` overrides from ``env`` (default ``os.environ``)
    and validate. Raises :class:`ConfigError` naming the key for anything wrong."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: cannot read {file}: {_reason(exc)}") from None
    return parse_config(text, env=env, source=file)


def parse_config(
    text: str, *, env: Mapping[str, str] | None = None, source: Path | None = None
) -> AgentConfig:
    """Validate configuration text (TOML) with environment overrides applied."""
    where = source or Path("<config>")
    try:
        raw = _toml.loads(text)
    except _toml.TOMLDecodeError as exc:
        raise ConfigError(f"config: {where} is not valid TOML: {exc}") from None
    _apply_env(raw, os.environ if env is None else env)
    return _build(raw, base=(source.parent if source else Path.cwd()), source=source, env=env)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, text in env.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        section, key = parts
        if section == "datasets":
            raise ConfigError(f"{name}: datasets cannot be set from the environment")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table, got {type(table).__name__}")
        table[key] = _env_value(text)


def _env_value(text: str) -> Any:
    try:
        return _toml.loads(f"value = {text}")["value"]
    except _toml.TOMLDecodeError:
        return text


_SECTIONS = frozenset(
    {
        "agent",
        "broker",
        "trust",
        "telemetry",
        "zeroconf",
        "datasets",
        "simulation",
        "homeassistant",
        "spool",
    }
)
_KEYS = {
    "agent": frozenset({"id", "state_dir", "labels", "topic_prefix", "allow_code"}),
    "broker": frozenset(
        {
            "url",
            "username",
            "password",
            "ca_file",
            "cert_file",
            "key_file",
            "tls_insecure",
            "keepalive",
            "protocol",
            "chunk_size",
            "connect_timeout",
            "backoff_initial",
            "backoff_max",
        }
    ),
    "trust": frozenset({"coordinator_keys"}),
    "telemetry": frozenset({"interval"}),
    "zeroconf": frozenset({"enabled", "interfaces"}),
    "datasets": frozenset({"name", "path", "tags", "format", "label_column"}),
    "simulation": frozenset({"slowdown", "partial_work", "min_update_seconds"}),
    "homeassistant": frozenset({"enabled", "discovery_prefix"}),
    "spool": frozenset({"max_updates", "max_mb"}),
}


def _build(
    raw: dict[str, Any], *, base: Path, source: Path | None, env: Mapping[str, str] | None
) -> AgentConfig:
    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(_SECTIONS))})")
    sections = {name: _table(raw, name) for name in _SECTIONS - {"datasets"}}
    for name, table in sections.items():
        _no_unknown_keys(name, table)

    agent = sections["agent"]
    agent_id = _opt_str(agent, "agent.id")
    if agent_id is not None:
        _segment(agent_id, "agent.id")
    environ = os.environ if env is None else env
    state_default = environ.get("STATE_DIRECTORY", "").split(":")[0] or _default_state_dir()
    state_dir = _path(agent.get("state_dir", state_default), "agent.state_dir", base)
    labels_raw = agent.get("labels", {})
    if not isinstance(labels_raw, dict):
        raise ConfigError(f"agent.labels: expected a table of strings, got {_kind(labels_raw)}")
    labels: dict[str, str] = {}
    for key, value in labels_raw.items():
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"agent.labels.{key}: expected a string, got {_kind(value)}")
        labels[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    prefix = agent.get("topic_prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str):
        raise ConfigError(f"agent.topic_prefix: expected a string, got {_kind(prefix)}")
    try:
        Topics(prefix)
    except ValueError as exc:
        raise ConfigError(f"agent.topic_prefix: {exc}") from None

    return AgentConfig(
        id=agent_id,
        state_dir=state_dir,
        labels=MappingProxyType(labels),
        topic_prefix=prefix,
        allow_code=_bool(agent, "allow_code", "agent.allow_code", False),
        broker=_broker(sections["broker"], base, agent_id),
        coordinator_keys=_keys(sections["trust"]),
        telemetry=_telemetry(sections["telemetry"]),
        zeroconf=_zeroconf(sections["zeroconf"]),
        datasets=_datasets(raw.get("datasets", []), base),
        simulation=_simulation(sections["simulation"]),
        homeassistant=_homeassistant(sections["homeassistant"]),
        spool=_spool(sections["spool"]),
        source=source,
    )


def _broker(table: dict[str, Any], base: Path, agent_id: str | None) -> BrokerConfig:
    url = table.get("url", "mqtt://127.0.0.1:1883")
    urls = (url,) if isinstance(url, str) else url
    if not isinstance(urls, list | tuple) or not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError(f"broker.url: expected a URL or a list of URLs, got {_kind(url)}")
    options: dict[str, Any] = {"urls": tuple(urls)}
    for key in ("username", "password", "protocol"):
        if key in table:
            options[key] = _opt_str(table, f"broker.{key}")
    for key in ("ca_file", "cert_file", "key_file"):
        if key in table:
            options[key] = str(_path(table[key], f"broker.{key}", base))
    if "tls_insecure" in table:
        options["tls_insecure"] = _bool(table, "tls_insecure", "broker.tls_insecure", False)
    for key, kind in (
        ("keepalive", int),
        ("chunk_size", int),
        ("connect_timeout", float),
        ("backoff_initial", float),
        ("backoff_max", float),
    ):
        if key in table:
            options[key] = _number(table[key], f"broker.{key}", kind, minimum=0.001)
    if options.get("keepalive", 30) < 1:
        raise ConfigError(f"broker.keepalive: must be ≥ 1 second, got {options['keepalive']}")
    try:
        return BrokerConfig(**options)
    except ValueError as exc:
        message = str(exc)
        key = "broker.url" if "url" in message else "broker"
        raise ConfigError(
            message if message.startswith("broker.") else f"{key}: {message}"
        ) from None


def _keys(table: dict[str, Any]) -> tuple[str, ...]:
    keys = table.get("coordinator_keys", [])
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list):
        raise ConfigError(f"trust.coordinator_keys: expected a list of keys, got {_kind(keys)}")
    for i, key in enumerate(keys):
        where = f"trust.coordinator_keys[{i}]"
        if not isinstance(key, str) or not key.startswith("ed25519:"):
            raise ConfigError(f"{where}: expected 'ed25519:<base64 of 32 bytes>'")
        try:
            raw = base64.b64decode(key[len("ed25519:") :], validate=True)
        except ValueError:
            raise ConfigError(f"{where}: not valid base64") from None
        if len(raw) != 32:
            raise ConfigError(f"{where}: an Ed25519 public key is 32 bytes, got {len(raw)}")
    return tuple(keys)


def _simulation(table: dict[str, Any]) -> SimulationConfig:
    default = SimulationConfig()
    return SimulationConfig(
        slowdown=_number(
            table.get("slowdown", default.slowdown), "simulation.slowdown", float, minimum=1.0
        ),
        partial_work=_bool(table, "partial_work", "simulation.partial_work", False),
        min_update_seconds=_number(
            table.get("min_update_seconds", default.min_update_seconds),
            "simulation.min_update_seconds",
            float,
            minimum=0.0,
        ),
    )


def _homeassistant(table: dict[str, Any]) -> HomeAssistantConfig:
    prefix = table.get("discovery_prefix", DEFAULT_DISCOVERY_PREFIX)
    if not isinstance(prefix, str):
        raise ConfigError(f"homeassistant.discovery_prefix: expected a string, got {_kind(prefix)}")
    try:
        check_discovery_prefix(prefix)
    except ValueError as exc:
        raise ConfigError(f"homeassistant.discovery_prefix: {exc}") from None
    return HomeAssistantConfig(
        enabled=_bool(table, "enabled", "homeassistant.enabled", False), discovery_prefix=prefix
    )


def _spool(table: dict[str, Any]) -> SpoolConfig:
    default = SpoolConfig()
    return SpoolConfig(
        max_updates=_number(
            table.get("max_updates", default.max_updates), "spool.max_updates", int, minimum=1
        ),
        max_mb=_number(table.get("max_mb", default.max_mb), "spool.max_mb", float, minimum=0.001),
    )


def _telemetry(table: dict[str, Any]) -> TelemetryConfig:
    if "interval" not in table:
        return TelemetryConfig()
    return TelemetryConfig(
        interval=_number(table["interval"], "telemetry.interval", float, minimum=0.0)
    )


def _zeroconf(table: dict[str, Any]) -> ZeroconfConfig:
    enabled = _bool(table, "enabled", "zeroconf.enabled", True)
    interfaces = table.get("interfaces")
    if interfaces is None:
        return ZeroconfConfig(enabled=enabled)
    if isinstance(interfaces, str):
        interfaces = [interfaces]
    if not isinstance(interfaces, list) or not all(isinstance(i, str) for i in interfaces):
        raise ConfigError(
            f"zeroconf.interfaces: expected a list of IP addresses, got {_kind(interfaces)}"
        )
    for i, address in enumerate(interfaces):
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        except OSError:
            raise ConfigError(
                f"zeroconf.interfaces[{i}]: {address!r} is not an IP address"
            ) from None
    return ZeroconfConfig(enabled=enabled, interfaces=tuple(interfaces))


def _datasets(raw: Any, base: Path) -> tuple[DatasetConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"datasets: expected [[datasets]] tables, got {_kind(raw)}")
    out: list[DatasetConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        where = f"datasets[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {_kind(table)}")
        _no_unknown_keys(where, table, known=_KEYS["datasets"])
        name = table.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: missing (each dataset needs a name)")
        _segment(name, f"{where}.name")
        if name in seen:
            raise ConfigError(f"{where}.name: dataset {name!r} is defined twice")
        seen.add(name)
        if "path" not in table:
            raise ConfigError(f"{where}.path: missing (dataset {name!r} needs a path)")
        tags = table.get("tags", [])
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError(f"{where}.tags: expected a list of strings, got {_kind(tags)}")
        fmt = table.get("format", "auto")
        if fmt not in DATASET_FORMATS:
            raise ConfigError(
                f"{where}.format: must be one of {', '.join(DATASET_FORMATS)}, got {fmt!r}"
            )
        label_column = table.get("label_column")
        if label_column is not None and (
            isinstance(label_column, bool) or not isinstance(label_column, str | int)
        ):
            raise ConfigError(
                f"{where}.label_column: expected a column name or index, got {_kind(label_column)}"
            )
        out.append(
            DatasetConfig(
                name=name,
                path=_path(table["path"], f"{where}.path", base),
                tags=tuple(tags),
                format=fmt,
                label_column=label_column,
            )
        )
    return tuple(out)


# -- the agent's id, kept in the state directory -------------------------------------------------


def resolve_agent_id(config: AgentConfig) -> str:
    """The configured id, or the one kept in ``state_dir/agent_id`` (created on first use from
    the host name and a random suffix, so it stays the same across restarts and reinstalls of
    the package, and differs between two devices cloned from one image once state is reset).
    Raises :class:`ConfigError` if the state directory cannot be used. Blocking file I/O."""
    if config.id is not None:
        return config.id
    file = config.state_dir / "agent_id"
    try:
        existing = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise ConfigError(f"agent.state_dir: cannot read {file}: {_reason(exc)}") from None
    if existing:
        try:
            return check_segment(existing, f"{file}")
        except ValueError as exc:
            raise ConfigError(f"agent.id: {exc}") from None
    new_id = new_agent_id()
    try:
        ensure_state_dir(config.state_dir)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(new_id + "\n", encoding="utf-8")
        tmp.replace(file)
    except OSError as exc:
        raise ConfigError(f"agent.state_dir: cannot write {file}: {_reason(exc)}") from None
    return new_id


def new_agent_id() -> str:
    """The host name (lower case, topic-safe) and a random suffix: ``pi-kitchen-3f9a1c``."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:48] or "agent"
    return f"{host}-{secrets.token_hex(3)}"


def ensure_state_dir(path: Path) -> None:
    """Create the state directory (mode 0700) or raise :class:`ConfigError` saying why not."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"agent.state_dir: cannot create {path}: {_reason(exc)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"agent.state_dir: {path} is not writable by this user")


def _default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/ember-agent"
    home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(home, "ember-agent")


# -- value helpers -------------------------------------------------------------------------------


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table [{name}], got {_kind(table)}")
    return table


def _no_unknown_keys(
    where: str, table: dict[str, Any], known: frozenset[str] | None = None
) -> None:
    allowed = _KEYS[where] if known is None else known
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})"
        )


def _segment(value: str, where: str) -> None:
    try:
        check_segment(value, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _opt_str(table: dict[str, Any], where: str) -> str | None:
    value = table.get(where.rsplit(".", 1)[-1])
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {_kind(value)}")
    return value


def _bool(table: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
    return value


def _number(value: Any, where: str, kind: type[int] | type[float], minimum: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {_kind(value)}")
    if kind is int and not float(value).is_integer():
        raise ConfigError(f"{where}: expected a whole number, got {value}")
    if value < minimum:
        raise ConfigError(f"{where}: must be ≥ {minimum:g}, got {value}")
    return kind(value)


def _path(value: Any, where: str, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path, got {_kind(value)}")
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    return path if path.is_absolute() else base / path


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)

"""The fleet registry: who is out there, what each agent can do, and what it is running.

MQTT is the source of truth. Every agent keeps retained JSON documents on
``agents/<id>/status`` (presence, with an MQTT Will that turns it offline), ``agents/<id>/info``
(hardware, runtimes, datasets) and ``agents/<id>/roles`` (the roles it runs), and sends
``agents/<id>/telemetry`` samples; subscribing to those topics replays the retained ones, so a
freshly started coordinator knows the whole fleet within one round trip (the MQTT "last known
good value" pattern, as Sparkplug B and Home Assistant use it).

Zeroconf browsing of ``_ember-agent._tcp.local.`` only annotates LAN presence: an agent seen on
the LAN but not on the broker is listed, and never planned.

Agent documents are read defensively: :func:`parse_info` is the one place that knows the info
document's shape, and anything missing or malformed becomes a listed problem, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from agent.protocol.errors import ProtocolError
from agent.protocol.messages import AgentStatus, decode_message
from agent.protocol.topics import Topics, check_segment
from agent.tasks import cancel_and_wait
from agent.transport import Inbound, Subscription, Transport
from coordinator.spec import normalise_arch

log = structlog.get_logger("ember.registry")

SERVICE_TYPE = "_ember-agent._tcp.local."
LEAVES = ("status", "info", "roles", "telemetry")
MAX_DOCUMENT_BYTES = 1 << 20
"""Agent documents larger than this are ignored (an info document is a few KiB)."""


# -- parsed documents ----------------------------------------------------------------------------


def json_document(payload: bytes, *, log: Any, kind: str, **context: Any) -> dict[str, Any] | None:
    """A retained JSON document: an object of at most :data:`MAX_DOCUMENT_BYTES`; otherwise
    ``None`` and a logged ``<kind>_document_too_large`` or ``<kind>_document_invalid``."""
    if len(payload) > MAX_DOCUMENT_BYTES:
        log.warning(f"{kind}_document_too_large", **context, bytes=len(payload))
        return None
    try:
        parsed = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        log.warning(f"{kind}_document_invalid", **context, error=str(exc))
        return None
    if not isinstance(parsed, dict):
        log.warning(f"{kind}_document_invalid", **context, error="not an object")
        return None
    return parsed


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset an agent holds, as its info document describes it (the data stays there)."""

    name: str
    tags: tuple[str, ...] = ()
    samples: int | None = None
    feature_shape: tuple[int, ...] | None = None
    schema_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tags": list(self.tags),
            "samples": self.samples,
            "feature_shape": None if self.feature_shape is None else list(self.feature_shape),
            "schema_hash": self.schema_hash,
        }


@dataclass(frozen=True)
class AgentInfo:
    """What the coordinator needs from an agent's info document; ``None`` where it is unknown."""

    version: str | None = None
    os: str | None = None
    arch: str | None = None
    cpu_model: str | None = None
    cpu_cores: int | None = None
    memory_mb: int | None = None
    accelerators: tuple[str, ...] = ()
    onnxruntime: str | None = None
    """onnxruntime version, ``None`` when the agent has none."""
    providers: tuple[str, ...] = ()
    torch: str | None = None
    """torch version, ``None`` when the agent has none."""
    runtime_errors: dict[str, str] = field(default_factory=dict)
    """Why a runtime the agent has installed failed to load, by runtime name."""
    allow_code: bool | None = None
    """Whether the agent runs bundles carrying Python source (``None``: not said)."""
    labels: dict[str, str] = field(default_factory=dict)
    datasets: tuple[DatasetInfo, ...] = ()
    problems: tuple[str, ...] = ()
    """Fields that were missing or malformed in the document."""


def _str_or_none(value: Any) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value):
        return str(value)
    return None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value and abs(value) < 1e18:
        return int(value)
    return None


def _memory_mb(value: Any) -> int | None:
    """``memory`` as MB from an int (MB) or a map with ``total_mb``/``total``/``total_bytes``."""
    if isinstance(value, Mapping):
        for key, scale in (("total_mb", 1), ("mb", 1), ("total_bytes", 1 / (1 << 20))):
            n = _int_or_none(value.get(key))
            if n is not None:
                return int(n * scale)
        total = _int_or_none(value.get("total"))
        if total is not None:
            return total if total < (1 << 24) else total >> 20  # bytes when implausibly large
        return None
    return _int_or_none(value)


def _dataset(raw: Any) -> DatasetInfo | None:
    if not isinstance(raw, Mapping):
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        return None
    tags = raw.get("tags")
    shape = raw.get("feature_shape")
    return DatasetInfo(
        name=name,
        tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (),
        samples=_int_or_none(raw.get("samples")),
        feature_shape=(
            tuple(int(s) for s in shape)
            if isinstance(shape, list) and all(_int_or_none(s) is not None for s in shape)
            else None
        ),
        schema_hash=_str_or_none(raw.get("schema_hash")),
    )


def _runtime(raw: Any) -> tuple[str | None, tuple[str, ...], str | None]:
    """(version, providers, error) of one runtime entry: a map with ``version`` (and
    ``providers``), a map with ``error`` when it failed to load, a version string, or null."""
    if isinstance(raw, Mapping):
        version = _str_or_none(raw.get("version"))
        error = _str_or_none(raw.get("error"))
        got = raw.get("providers")
        providers = tuple(str(p) for p in got) if isinstance(got, list) else ()
        if version is None and error is None and raw:
            version = "unknown"
        return version, providers, error
    if raw is None or raw is False:
        return None, (), None
    return _str_or_none(raw) or "unknown", (), None


def _os_name(raw: Any) -> str | None:
    if isinstance(raw, Mapping):
        distro = _str_or_none(raw.get("distro")) or _str_or_none(raw.get("name"))
        system = " ".join(
            v for v in (_str_or_none(raw.get("system")), _str_or_none(raw.get("release"))) if v
        )
        return distro or system or None
    return _str_or_none(raw)


def parse_info(raw: Any) -> AgentInfo:
    """Read an agent's info document. The one function that knows its shape (see DESIGN.md)::

    {"agent", "version", "os", "arch", "cpu": {"model", "cores"}, "memory": {"total_mb"},
     "accelerators": [...], "runtimes": {"onnxruntime": {"version", "providers"},
     "torch": "2.4.0" | null}, "labels": {...}, "datasets": [{"name", "tags", "samples",
     "feature_shape", "label_counts", "schema_hash"}]}
    """
    if not isinstance(raw, Mapping):
        return AgentInfo(problems=("info is not a JSON object",))
    problems: list[str] = []
    arch = _str_or_none(raw.get("arch"))
    if arch is None:
        problems.append("arch")
    cpu = raw.get("cpu")
    cpu_model = cpu_cores = None
    if isinstance(cpu, Mapping):
        cpu_model = _str_or_none(cpu.get("model"))
        cpu_cores = _int_or_none(cpu.get("cores") or cpu.get("count"))
    elif _int_or_none(cpu) is not None:
        cpu_cores = _int_or_none(cpu)
    memory_mb = _memory_mb(raw.get("memory"))
    if memory_mb is None:
        problems.append("memory")
    runtimes = raw.get("runtimes")
    if not isinstance(runtimes, Mapping):
        runtimes = {}
        problems.append("runtimes")
    ort_version, providers, ort_error = _runtime(runtimes.get("onnxruntime"))
    torch_version, _, torch_error = _runtime(runtimes.get("torch"))
    runtime_errors = {
        name: error for name, error in (("onnxruntime", ort_error), ("torch", torch_error)) if error
    }
    labels_raw = raw.get("labels")
    labels = (
        {str(k): str(v) for k, v in labels_raw.items() if v is not None}
        if isinstance(labels_raw, Mapping)
        else {}
    )
    datasets_raw = raw.get("datasets")
    datasets: list[DatasetInfo] = []
    if isinstance(datasets_raw, list):
        for item in datasets_raw:
            parsed = _dataset(item)
            if parsed is None:
                problems.append("datasets[]")
            else:
                datasets.append(parsed)
    elif isinstance(datasets_raw, Mapping):  # {name: {...}} is accepted too
        for name, item in datasets_raw.items():
            parsed = _dataset({"name": name, **item} if isinstance(item, Mapping) else None)
            if parsed is not None:
                datasets.append(parsed)
    elif datasets_raw is not None:
        problems.append("datasets")
    accelerators = raw.get("accelerators")
    return AgentInfo(
        version=_str_or_none(raw.get("version")),
        os=_os_name(raw.get("os")),
        arch=normalise_arch(arch) if arch else None,
        cpu_model=cpu_model,
        cpu_cores=cpu_cores,
        memory_mb=memory_mb,
        accelerators=(
            tuple(
                str(a.get("name", a.get("kind", "?"))) if isinstance(a, Mapping) else str(a)
                for a in accelerators
            )
            if isinstance(accelerators, list)
            else ()
        ),
        onnxruntime=ort_version,
        providers=providers,
        torch=torch_version,
        runtime_errors=runtime_errors,
        allow_code=raw.get("allow_code") if isinstance(raw.get("allow_code"), bool) else None,
        labels=labels,
        datasets=tuple(datasets),
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class RoleState:
    """One entry of an agent's retained roles document."""

    job: str
    role: str
    state: str
    reason: str = ""
    bundle: str | None = None
    since: float | None = None


def parse_roles(raw: Any) -> dict[str, RoleState]:
    """``{"roles": {"<job>/<role>": {"job", "role", "state", "reason", "bundle", "since"}}}``."""
    out: dict[str, RoleState] = {}
    roles = raw.get("roles") if isinstance(raw, Mapping) else None
    if not isinstance(roles, Mapping):
        return out
    for key, entry in roles.items():
        if not isinstance(entry, Mapping):
            continue
        job, _, role = str(key).partition("/")
        job = _str_or_none(entry.get("job")) or job
        role = _str_or_none(entry.get("role")) or role
        state = _str_or_none(entry.get("state"))
        if not job or not role or not state:
            continue
        since = entry.get("since")
        out[f"{job}/{role}"] = RoleState(
            job=job,
            role=role,
            state=state,
            reason=_str_or_none(entry.get("reason")) or "",
            bundle=_str_or_none(entry.get("bundle")),
            since=float(since) if isinstance(since, (int, float)) else None,
        )
    return out


@dataclass(frozen=True)
class AgentView:
    """Everything known about one agent at one moment (an immutable snapshot)."""

    id: str
    online: bool = False
    status: Mapping[str, Any] | None = None
    info_raw: Mapping[str, Any] | None = None
    info: AgentInfo | None = None
    telemetry: Mapping[str, Any] | None = None
    roles: Mapping[str, RoleState] = field(default_factory=dict)
    lan: Mapping[str, Any] | None = None
    last_seen: float = 0.0

    @property
    def since(self) -> float | None:
        ts = self.status.get("ts") if self.status else None
        return float(ts) if isinstance(ts, (int, float)) else None

    @property
    def offline_reason(self) -> str:
        reason = self.status.get("reason") if self.status else None
        return reason if isinstance(reason, str) else ""

    def running_roles(self) -> list[str]:
        return sorted(k for k, r in self.roles.items() if r.state in ("running", "starting"))

    def summary(self) -> dict[str, Any]:
        """The agent as plain data, for ``ember agents ls/show``."""
        info = self.info
        return {
            "agent": self.id,
            "online": self.online,
            "since": self.since,
            "reason": self.offline_reason,
            "labels": dict(info.labels) if info else {},
            "arch": info.arch if info else None,
            "os": info.os if info else None,
            "version": info.version if info else None,
            "cpu": {"model": info.cpu_model, "cores": info.cpu_cores} if info else None,
            "memory_mb": info.memory_mb if info else None,
            "accelerators": list(info.accelerators) if info else [],
            "runtimes": (
                {
                    "onnxruntime": info.onnxruntime,
                    "providers": list(info.providers),
                    "torch": info.torch,
                }
                if info
                else {}
            ),
            "datasets": [d.to_dict() for d in info.datasets] if info else [],
            "roles": {
                key: {"state": r.state, "reason": r.reason, "since": r.since}
                for key, r in sorted(self.roles.items())
            },
            "running_roles": self.running_roles(),
            "telemetry": dict(self.telemetry) if self.telemetry else None,
            "lan": dict(self.lan) if self.lan else None,
            "problems": list(info.problems) if info else ["no info document"],
            "last_seen": self.last_seen,
        }


# -- reading retained documents ------------------------------------------------------------------


class DocumentFeed:
    """Subscriptions to JSON document topics, each message folded in by :meth:`apply` from a
    task of its own; a document that breaks :meth:`apply` is logged, never fatal."""

    name = "documents"

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []

    def filters(self) -> list[tuple[str, int]]:
        """``(topic filter, QoS)`` pairs to follow."""
        raise NotImplementedError

    def apply(self, message: Inbound) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        for topic_filter, qos in self.filters():
            sub = await self.transport.subscribe(topic_filter, qos, max_bytes=64 << 20)
            self._subs.append(sub)
            task = asyncio.create_task(self._consume(sub), name=f"{self.name}-{topic_filter}")
            self._tasks.append(task)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        for sub in self._subs:
            await sub.close()
        self._tasks.clear()
        self._subs.clear()

    async def _consume(self, sub: Subscription) -> None:
        async for message in sub:
            try:
                self.apply(message)
            except Exception:  # a bad document must never stop the feed
                log.exception(f"{self.name}_document_failed", topic=message.topic)


# -- the registry --------------------------------------------------------------------------------

Listener = Callable[[str, str], None]
"""Called as ``listener(agent, leaf)`` after a document changed (leaf: status, info, ...)."""


class Registry(DocumentFeed):
    """The fleet as the retained agent topics (and zeroconf) describe it."""

    name = "agent"

    def __init__(
        self, transport: Transport, topics: Topics, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(transport)
        self.topics = topics
        self.clock = clock
        self._agents: dict[str, AgentView] = {}
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def filters(self) -> list[tuple[str, int]]:
        return [(self.topics.all_agents(leaf), 0 if leaf == "telemetry" else 1) for leaf in LEAVES]

    # reading -----------------------------------------------------------------------------------
    def snapshot(self) -> list[AgentView]:
        return sorted(self._agents.values(), key=lambda a: a.id)

    def get(self, agent: str) -> AgentView | None:
        return self._agents.get(agent)

    def __len__(self) -> int:
        return len(self._agents)

    # updating ----------------------------------------------------------------------------------
    def apply(self, message: Inbound) -> None:
        """Fold one received agent document into the registry."""
        levels = message.topic[len(self.topics.prefix) + 1 :].split("/")
        if len(levels) != 3 or levels[0] != "agents" or levels[2] not in LEAVES:
            return
        agent, leaf = levels[1], levels[2]
        try:
            check_segment(agent, "agent id")
        except ValueError:
            return
        payload = bytes(message.payload)
        doc: Mapping[str, Any] | None = None
        if payload:
            doc = json_document(payload, log=log, kind="agent", agent=agent, leaf=leaf)
            if doc is None:
                return
            problem = _status_problem(agent, payload) if leaf == "status" else None
            if problem:
                log.warning("agent_document_invalid", agent=agent, leaf=leaf, error=problem)
                return
        self.update(agent, leaf, doc)

    def update(self, agent: str, leaf: str, doc: Mapping[str, Any] | None) -> None:
        """Set (or, with ``None``, clear) one document of one agent."""
        view = self._agents.get(agent) or AgentView(id=agent)
        now = self.clock()
        if leaf == "status":
            online = doc is not None and doc.get("state") == "online"
            if view.online != online:
                log.info("agent_presence", agent=agent, online=online)
            view = replace(view, status=doc, online=online)
        elif leaf == "info":
            view = replace(view, info_raw=doc, info=None if doc is None else parse_info(doc))
        elif leaf == "roles":
            view = replace(view, roles=parse_roles(doc) if doc is not None else {})
        elif leaf == "telemetry":
            view = replace(view, telemetry=doc)
        elif leaf == "lan":
            view = replace(view, lan=doc)
        if doc is not None:
            view = replace(view, last_seen=now)
        if (
            all(x is None for x in (view.status, view.info_raw, view.telemetry, view.lan))
            and not view.roles
        ):
            self._agents.pop(agent, None)
        else:
            self._agents[agent] = view
        for listener in list(self._listeners):
            try:
                listener(agent, leaf)
            except Exception:
                log.exception("registry_listener_failed", agent=agent, leaf=leaf)


def _status_problem(agent: str, payload: bytes) -> str | None:
    """Why a status document is not the ``agent_status`` message of ``agent``, or ``None``: the
    online/offline state drives placement, so it is read as strictly as any message."""
    try:
        status = decode_message(payload, expect=AgentStatus)
    except ProtocolError as exc:
        return str(exc)
    if status.agent != agent:
        return f"agent_status names agent {status.agent!r}"
    return None


# -- zeroconf ------------------------------------------------------------------------------------


def agent_id_from_service(name: str, properties: Mapping[bytes, bytes | None]) -> str | None:
    """The agent id of a zeroconf service: TXT ``id`` (or ``agent``), else the instance name."""
    for key in (b"id", b"agent"):
        value = properties.get(key)
        if value:
            with contextlib.suppress(UnicodeDecodeError):
                return value.decode()
    instance = name[: -len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else None
    return instance or None


class LanBrowser:
    """Zeroconf (mDNS/DNS-SD) browsing for Ember agents on the LAN; annotates the registry."""

    def __init__(self, registry: Registry, *, interfaces: Iterable[str] | None = None) -> None:
        self.registry = registry
        self.interfaces = list(interfaces) if interfaces else None
        self._zc: Any = None
        self._browser: Any = None
        self._names: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        ip_version = IPVersion.V4Only
        if self.interfaces:
            versions = {ipaddress.ip_address(i.split("%")[0]).version for i in self.interfaces}
            ip_version = {frozenset({4}): IPVersion.V4Only, frozenset({6}): IPVersion.V6Only}.get(
                frozenset(versions), IPVersion.All
            )
        self._zc = AsyncZeroconf(
            interfaces=self.interfaces or InterfaceChoice.All, ip_version=ip_version
        )

        def on_change(
            zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            if state_change is ServiceStateChange.Removed:
                agent = self._names.pop(name, None)
                if agent is not None:
                    self.registry.update(agent, "lan", None)
                return
            task = asyncio.ensure_future(self._resolve(service_type, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
        log.info("zeroconf_browsing", service=SERVICE_TYPE, interfaces=self.interfaces or "all")

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        agent = agent_id_from_service(name, info.properties)
        if agent is None:
            return
        try:
            check_segment(agent, "agent id")
        except ValueError:
            return
        self._names[name] = agent
        props = {
            k.decode(errors="replace"): (v.decode(errors="replace") if v is not None else None)
            for k, v in info.properties.items()
        }
        self.registry.update(
            agent,
            "lan",
            {
                "addresses": info.parsed_scoped_addresses(),
                "port": info.port,
                "server": info.server,
                "properties": props,
                "seen": time.time(),
            },
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._browser = self._zc = None

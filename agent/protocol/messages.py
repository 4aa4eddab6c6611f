"""Ember's message types and the one place that validates what arrives.

Every message is a frozen dataclass with a protocol version ``v``, a ``type`` and an ``id``; the
id makes each state-changing message idempotent (a QoS 1 redelivery is applied once). On the
wire a message is a map ``{"v": 1, "type": "...", "id": "...", <fields>}``, in msgpack for
machines (tensors, commands, RPC) or JSON for dashboards (status and other retained topics).

:func:`decode_message` accepts either encoding, checks the envelope, every field's type and
bounds, and every tensor, and raises :class:`~agent.protocol.errors.ProtocolError` with a reason
that names the field (``model_update.base_version: must be ≥ 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from agent.protocol.codec import TensorMap, tensors_from_wire, tensors_to_wire
from agent.protocol.errors import PayloadTooLarge, ProtocolError, preview
from agent.protocol.limits import DEFAULT_LIMITS, ProtocolLimits
from agent.protocol.msgpack_view import Buffer, materialize, pack, unpack
from agent.protocol.topics import check_segment

PROTOCOL_VERSION = 1
"""Version of the message format; a receiver rejects messages newer than it speaks."""


# -- field constraints, attached with typing.Annotated ------------------------------------------


@dataclass(frozen=True)
class Range:
    """Inclusive bounds for an int or float field."""

    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Length:
    """Bounds on the length of a str, bytes, list or map field."""

    min: int = 0
    max: int | None = None


@dataclass(frozen=True)
class TopicSegment:
    """The string becomes one MQTT topic level: no ``/``, wildcards, NUL or leading ``$``."""


class _TensorsMarker:
    """Marks a field holding named tensors (``{name: ndarray}``), sent as a tensor list."""


Tensors = Annotated[TensorMap, _TensorsMarker()]
Name = Annotated[str, Length(1, 128), TopicSegment()]
"""An identifier that may appear as a topic segment (agent, job, role)."""
Count = Annotated[int, Range(min=0)]

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def new_message_id() -> str:
    """A random, URL- and topic-safe message id (128 bits)."""
    return secrets.token_hex(16)


# -- the envelope and the registry ---------------------------------------------------------------

M = TypeVar("M", bound="Message")
_REGISTRY: dict[str, type[Message]] = {}


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every Ember message: protocol version, type name and a unique id."""

    TYPE: ClassVar[str] = ""
    id: str = field(default_factory=new_message_id)
    v: int = PROTOCOL_VERSION

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            if cls.TYPE in _REGISTRY:
                raise TypeError(f"message type {cls.TYPE!r} is defined twice")
            _REGISTRY[cls.TYPE] = cls

    def to_wire(self) -> dict[str, Any]:
        """The message as a plain map; tensors as the codec's tensor list."""
        out: dict[str, Any] = {"v": self.v, "type": self.TYPE, "id": self.id}
        for spec in _specs(type(self)):
            value = getattr(self, spec.name)
            out[spec.name] = tensors_to_wire(value) if spec.tensors else value
        return out

    def to_msgpack(self) -> bytes:
        """msgpack bytes; tensor data is spliced in without intermediate copies."""
        return pack(self.to_wire())

    def to_json(self) -> bytes:
        """Compact JSON bytes, for human-facing topics. Messages with tensors cannot be JSON."""
        if any(spec.tensors for spec in _specs(type(self))):
            raise TypeError(f"{self.TYPE} carries tensors and has no JSON form")
        return json.dumps(self.to_wire(), separators=(",", ":"), allow_nan=False).encode()


def message_types() -> Mapping[str, type[Message]]:
    """Every registered message type by its wire name."""
    return types.MappingProxyType(_REGISTRY)


# -- presence (JSON, retained) -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AgentStatus(Message):
    """Retained presence of an agent (MQTT Will pattern; ``session`` counts connections, as
    Sparkplug B's bdSeq does, so a dashboard can tell a restart from a steady connection)."""

    TYPE: ClassVar[str] = "agent_status"
    agent: Name
    state: Literal["online", "offline"]
    session: Count
    ts: float = field(default_factory=time.time)
    reason: Annotated[str, Length(0, 1024)] = ""


# -- inbox commands (msgpack) --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    """Liveness probe; the agent answers with :class:`Pong` on ``reply_to``."""

    TYPE: ClassVar[str] = "ping"
    reply_to: Annotated[str, Length(0, 512)] = ""


@dataclass(frozen=True, kw_only=True)
class Pong(Message):
    """Answer to a :class:`Ping`."""

    TYPE: ClassVar[str] = "pong"
    ping_id: Name
    agent: Name
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True, kw_only=True)
class AssignRole(Message):
    """Run one role of a job: ``bundle`` is the signed role bundle (verified by the agent)."""

    TYPE: ClassVar[str] = "assign_role"
    job: Name
    role: Name
    bundle: bytes


@dataclass(frozen=True, kw_only=True)
class CancelRole(Message):
    """Stop a role this agent runs."""

    TYPE: ClassVar[str] = "cancel_role"
    job: Name
    role: Name
    reason: Annotated[str, Length(0, 1024)] = ""


# -- learning traffic (msgpack, chunked when large) ----------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelUpdate(Message):
    """A trainer's delta against the model version it started from (FedBuff, Nguyen et al.
    2022: Δ = y_Q − y_0 and its base version t_i, so the aggregator can weigh staleness)."""

    TYPE: ClassVar[str] = "model_update"
    job: Name
    agent: Name
    base_version: Count
    num_samples: Annotated[int, Range(min=1)]
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelVersion(Message):
    """A global model version published by an aggregator.

    In synchronous FedAvg rounds (McMahan et al. 2017) ``participants`` names the trainers
    sampled for the round that trains on this version; empty means every trainer (FedBuff).
    ``final`` marks the last version of a job: trainers stop after it.
    """

    TYPE: ClassVar[str] = "model_version"
    job: Name
    version: Count
    tensors: Tensors
    metrics: dict[str, float] = field(default_factory=dict)
    participants: list[Name] = field(default_factory=list)
    final: bool = False


@dataclass(frozen=True, kw_only=True)
class RingChunk(Message):
    """One step of a ring all-reduce among a hybrid group's trainers (Patarasuk and Yuan 2009,
    as Flame's hybrid topology uses it): in ``phase`` ``reduce`` (reduce-scatter) the receiver
    adds the chunk into its own, in ``gather`` (all-gather) it keeps it. ``ring`` names the
    ring instance (the id of the model version message that formed it)."""

    TYPE: ClassVar[str] = "ring_chunk"
    job: Name
    ring: Name
    sender: Name
    phase: Literal["reduce", "gather"]
    step: Count
    index: Count
    tensors: Tensors


@dataclass(frozen=True, kw_only=True)
class UpdateAck(Message):
    """The aggregator's receipt for trainers' updates: the id of the last update it processed
    from each agent (applied, stale, duplicate or rejected alike), with the current version.

    A trainer keeps at most one update in flight and starts its next local run from the newest
    version once its update is acknowledged: FedBuff's "report, then pull the current model"
    (Nguyen et al. 2022), and the flow control that keeps fast trainers from queueing work an
    aggregator cannot keep up with.
    """

    TYPE: ClassVar[str] = "update_ack"
    job: Name
    version: Count
    acks: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelRequest(Message):
    """A trainer without a current model asks the aggregator to publish its latest version
    (model versions are chunked, so they cannot be retained on the broker)."""

    TYPE: ClassVar[str] = "model_request"
    job: Name
    agent: Name
    have_version: Annotated[int, Range(min=-1)] = -1


@dataclass(frozen=True, kw_only=True)
class ShardHeld(Message):
    """A sharded aggregator's shard tells the assembler which update parts it holds (each
    checkpointed before it is named here), by update id: the trainer and base version t_i.
    Sent whole each time (idempotent), after every new part, fold and reconnect (sharded FedBuff,
    Nguyen et al. 2022: :mod:`agent.learning.shard_commit`). ``refused``: the updates whose part
    this shard refused (wrong shape, dtype, non-finite values, ...), by id, with their trainer:
    they can never be whole, so the assembler acknowledges them and no shard keeps them."""

    TYPE: ClassVar[str] = "shard_held"
    job: Name
    shard: Count
    version: Count
    agents: dict[str, Name] = field(default_factory=dict)
    bases: dict[str, Count] = field(default_factory=dict)
    refused: dict[str, Name] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ShardCommit(Message):
    """The assembler's decision for a sharded FedBuff job: model ``version`` is the previous
    version plus the updates ``ids``, folded in this order by every shard (Nguyen et al. 2022's
    buffer of K, agreed across shards). ``final`` ends the job: the shards stop. ``slices``: a
    shard already at ``version`` publishes its slice again (the assembler restarted).
    ``dropped``: updates a shard refused its part of; every shard drops its part of them."""

    TYPE: ClassVar[str] = "shard_commit"
    job: Name
    version: Count
    ids: list[Annotated[str, Length(1, 256)]] = field(default_factory=list)
    final: bool = False
    slices: bool = False
    dropped: list[Annotated[str, Length(1, 256)]] = field(default_factory=list)


# -- request/response between the CLI and the coordinator ----------------------------------------


@dataclass(frozen=True, kw_only=True)
class RpcRequest(Message):
    """A request whose reply topic travels in the payload, so it works on MQTT 3.1.1 brokers
    (MQTT 5's Response Topic and Correlation Data properties, carried by hand). The request's
    ``id`` is the correlation id."""

    TYPE: ClassVar[str] = "rpc_request"
    method: Annotated[str, Length(1, 128)]
    reply_to: Annotated[str, Length(1, 512)]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RpcResponse(Message):
    """The answer to an :class:`RpcRequest`; ``correlation_id`` is the request's id."""

    TYPE: ClassVar[str] = "rpc_response"
    correlation_id: Name
    ok: bool
    result: Any = None
    error: Annotated[str, Length(0, 4096)] = ""


# -- decoding and validation ---------------------------------------------------------------------


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    hint: Any
    required: bool
    tensors: bool


_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {}
_ENVELOPE = frozenset({"v", "type", "id"})


def _specs(cls: type[Message]) -> tuple[_FieldSpec, ...]:
    specs = _SPECS.get(cls)
    if specs is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        specs = tuple(
            _FieldSpec(
                name=f.name,
                hint=hints[f.name],
                required=f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING,
                tensors=_is_tensors(hints[f.name]),
            )
            for f in dataclasses.fields(cls)
            if f.name not in _ENVELOPE
        )
        _SPECS[cls] = specs
    return specs


def _is_tensors(hint: Any) -> bool:
    return typing.get_origin(hint) is Annotated and any(
        isinstance(meta, _TensorsMarker) for meta in hint.__metadata__
    )


def decode_message(
    payload: Buffer,
    *,
    expect: type[M] | tuple[type[M], ...] | None = None,
    limits: ProtocolLimits = DEFAULT_LIMITS,
    require_finite: bool = True,
) -> M:
    """Parse and validate one message (msgpack or JSON map).

    ``expect`` restricts the accepted types. Tensors come back as read-only views of
    ``payload``, refused if a value is NaN or ±inf unless ``require_finite`` is false (for a
    receiver that checks them itself on a pass it makes anyway). Raises
    :class:`ProtocolError` with a precise reason for anything malformed.
    """
    size = memoryview(payload).nbytes
    if size > limits.max_message_bytes:
        raise PayloadTooLarge(
            f"payload of {size} bytes is above the limit of {limits.max_message_bytes}"
        )
    if size == 0:
        raise ProtocolError("empty payload")
    raw = _parse(payload, limits)
    cls = _envelope_type(raw, limits)
    if expect is not None:
        allowed = expect if isinstance(expect, tuple) else (expect,)
        if cls not in allowed:
            names = " or ".join(c.TYPE for c in allowed)
            raise ProtocolError(f"expected a {names} message, got {cls.TYPE}")
    values: dict[str, Any] = {"id": raw["id"], "v": raw["v"]}
    for spec in _specs(cls):
        where = f"{cls.TYPE}.{spec.name}"
        if spec.name not in raw:
            if spec.required:
                raise ProtocolError(f"{where}: missing")
            continue
        if spec.tensors:
            values[spec.name] = tensors_from_wire(
                raw[spec.name], limits=limits, where=where, require_finite=require_finite
            )
        else:
            values[spec.name] = _convert(raw[spec.name], spec.hint, where, limits)
    # Fields this version does not know are ignored: later minor revisions may add some.
    return typing.cast(M, cls(**values))


def _parse(payload: Buffer, limits: ProtocolLimits) -> dict[str, Any]:
    view = memoryview(payload).cast("B")
    first = view[0]
    if first in b" \t\r\n{":
        try:
            raw = json.loads(bytes(view))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"invalid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ProtocolError(f"expected a JSON object, got {type(raw).__name__}")
        return raw
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        decoded = unpack(view, limits)
        assert isinstance(decoded, dict)
        return decoded
    raise ProtocolError(
        f"payload is neither a JSON object nor a msgpack map (first byte 0x{first:02x})"
    )


def _envelope_type(raw: dict[str, Any], limits: ProtocolLimits) -> type[Message]:
    version = raw.get("v")
    if type(version) is not int:
        raise ProtocolError(
            f"envelope.v: expected an integer protocol version, got {preview(version)}"
        )
    if not 1 <= version <= PROTOCOL_VERSION:
        raise ProtocolError(
            f"envelope.v: unsupported protocol version {version} "
            f"(this side speaks 1..{PROTOCOL_VERSION})"
        )
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(f"envelope.type: expected a string, got {preview(kind)}")
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ProtocolError(f"envelope.type: unknown message type {preview(kind)}")
    msg_id = raw.get("id")
    if (
        not isinstance(msg_id, str)
        or not 1 <= len(msg_id) <= limits.max_name_length
        or not _ID_CHARS.issuperset(msg_id)
    ):
        raise ProtocolError(
            f"{kind}.id: expected 1..{limits.max_name_length} characters of [A-Za-z0-9-_.:], "
            f"got {preview(msg_id)}"
        )
    return cls


def _convert(value: Any, hint: Any, where: str, limits: ProtocolLimits) -> Any:
    """Check ``value`` against a type hint (with Range/Length metadata); return it normalised."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        value = _convert(value, hint.__origin__, where, limits)
        for meta in hint.__metadata__:
            _check_constraint(value, meta, where)
        return value
    if hint is Any:
        return materialize(value)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, where, limits)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {preview(value)} matches none of {hint}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ProtocolError(f"{where}: must be one of {allowed}, got {preview(value)}")
        return value
    if hint is type(None):
        if value is not None:
            raise ProtocolError(f"{where}: expected nil, got {preview(value)}")
        return None
    if hint is bool:
        if type(value) is not bool:
            raise ProtocolError(f"{where}: expected a boolean, got {preview(value)}")
        return value
    if hint is int:
        if type(value) is not int:
            raise ProtocolError(f"{where}: expected an integer, got {preview(value)}")
        return value
    if hint is float:
        if type(value) not in (int, float):
            raise ProtocolError(f"{where}: expected a number, got {preview(value)}")
        if not math.isfinite(value):
            raise ProtocolError(f"{where}: must be finite, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected a string, got {preview(value)}")
        return value
    if hint is bytes:
        if isinstance(value, memoryview):
            return value.tobytes()
        raise ProtocolError(f"{where}: expected binary data, got {preview(value)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {preview(value)}")
        item_hint = typing.get_args(hint)[0]
        items = [_convert(v, item_hint, f"{where}[{i}]", limits) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {preview(value)}")
        _, value_hint = typing.get_args(hint)
        return {k: _convert(v, value_hint, f"{where}.{k}", limits) for k, v in value.items()}
    raise TypeError(f"{where}: unsupported field type {hint}")


def _check_constraint(value: Any, meta: Any, where: str) -> None:
    if isinstance(meta, Range):
        if meta.min is not None and value < meta.min:
            raise ProtocolError(f"{where}: must be ≥ {_num(meta.min)}, got {value}")
        if meta.max is not None and value > meta.max:
            raise ProtocolError(f"{where}: must be ≤ {_num(meta.max)}, got {value}")
    elif isinstance(meta, Length):
        size = len(value)
        if size < meta.min or (meta.max is not None and size > meta.max):
            upper = "" if meta.max is None else str(meta.max)
            raise ProtocolError(f"{where}: length must be in {meta.min}..{upper}, got {size}")
    elif isinstance(meta, TopicSegment):
        try:
            check_segment(value, where)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)

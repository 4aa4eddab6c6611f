"""Every message type round-trips; the validator names the field and the problem."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from agent.protocol import (
    AgentStatus,
    AssignRole,
    CancelRole,
    Message,
    ModelRequest,
    ModelUpdate,
    ModelVersion,
    PayloadTooLarge,
    Ping,
    Pong,
    ProtocolError,
    ProtocolLimits,
    RingChunk,
    RpcRequest,
    RpcResponse,
    ShardCommit,
    ShardHeld,
    UpdateAck,
    decode_message,
)
from agent.protocol.enrolment import EnrolReply, EnrolRequest
from agent.protocol.messages import message_types
from agent.protocol.msgpack_view import pack


def update(**overrides: object) -> ModelUpdate:
    fields: dict[str, object] = {
        "job": "digits",
        "agent": "pi-kitchen",
        "base_version": 3,
        "num_samples": 120,
        "tensors": {"fc.weight": np.ones((4, 3), np.float32), "fc.bias": np.zeros(4, np.float32)},
        "metrics": {"loss": 0.25},
    }
    fields.update(overrides)
    return ModelUpdate(**fields)  # type: ignore[arg-type]


EXAMPLES: list[Message] = [
    AgentStatus(agent="pi-kitchen", state="online", session=3),
    Ping(reply_to="ember/v1/coordinator/rpc/replies/cli"),
    Pong(ping_id="abc", agent="pi-kitchen"),
    AssignRole(job="digits", role="trainer", bundle=b"\x00signed bundle"),
    CancelRole(job="digits", role="trainer", reason="job cancelled"),
    update(),
    ModelVersion(
        job="digits",
        version=7,
        tensors={"w": np.arange(3, dtype=np.float64)},
        participants=["pi-1"],
    ),
    ModelRequest(job="digits", agent="pi-1"),
    UpdateAck(job="digits", version=3, acks={"pi-1": "abc"}),
    ShardHeld(job="digits", shard=1, version=4, agents={"abc": "pi-1"}, bases={"abc": 3}),
    ShardCommit(job="digits", version=5, ids=["abc", "def"]),
    RingChunk(
        job="digits",
        ring="abc",
        sender="pi-1",
        phase="reduce",
        step=1,
        index=2,
        tensors={"chunk": np.arange(5, dtype=np.float32)},
    ),
    EnrolRequest(token="0f" * 6, agent="pi-1", client="enrol-pi-1", nonce=b"\x01" * 16),
    EnrolReply(request="abc", ok=False, reason="token already used"),
    RpcRequest(
        method="jobs.list", reply_to="ember/v1/coordinator/rpc/replies/cli", params={"all": True}
    ),
    RpcResponse(correlation_id="abc", ok=False, error="no such job"),
]


def test_every_registered_type_has_an_example() -> None:
    assert {type(m).TYPE for m in EXAMPLES} == set(message_types())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).TYPE)
def test_msgpack_round_trip(message: Message) -> None:
    decoded = decode_message(message.to_msgpack())
    assert type(decoded) is type(message)
    for name, value in vars(message).items():
        got = getattr(decoded, name)
        if name == "tensors":
            assert list(got) == list(value)
            for key in value:
                np.testing.assert_array_equal(got[key], value[key])
        else:
            assert got == value


@pytest.mark.parametrize(
    "message",
    [
        m
        for m in EXAMPLES
        if not hasattr(m, "tensors") and not any(isinstance(v, bytes) for v in vars(m).values())
    ],
    ids=lambda m: type(m).TYPE,
)
def test_json_round_trip(message: Message) -> None:
    assert decode_message(message.to_json()) == message


def test_status_json_is_what_a_dashboard_reads() -> None:
    status = json.loads(AgentStatus(agent="pi", state="offline", session=2, ts=5.0).to_json())
    assert status == {
        "v": 1,
        "type": "agent_status",
        "id": status["id"],
        "agent": "pi",
        "state": "offline",
        "session": 2,
        "ts": 5.0,
        "reason": "",
    }


def test_tensors_have_no_json_form() -> None:
    with pytest.raises(TypeError, match="carries tensors"):
        update().to_json()


def test_expect_restricts_the_type() -> None:
    payload = Ping().to_msgpack()
    assert isinstance(decode_message(payload, expect=(Ping, Pong)), Ping)
    with pytest.raises(ProtocolError, match="expected a model_update message, got ping"):
        decode_message(payload, expect=ModelUpdate)


def envelope(**fields: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "type": "agent_status",
        "id": "m1",
        "agent": "a",
        "state": "online",
        "session": 1,
    }
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty payload"),
        (b"\x93\x01\x02\x03", "neither a JSON object nor a msgpack map"),
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "neither a JSON object"),
        (envelope(v=...), r"envelope\.v: expected an integer protocol version, got nil"),
        (envelope(v=2), "unsupported protocol version 2"),
        (envelope(type="rm -rf"), "unknown message type 'rm -rf'"),
        (envelope(id="a/b"), r"agent_status\.id: expected 1\.\.256 characters"),
        (envelope(agent=...), r"agent_status\.agent: missing"),
        (envelope(agent="pi/+"), "contains '\\+/'"),
        (envelope(agent=""), r"agent_status\.agent: length must be in 1\.\.128, got 0"),
        (
            envelope(state="sleeping"),
            r"agent_status\.state: must be one of 'online', 'offline', got 'sleeping'",
        ),
        (envelope(session=-1), r"agent_status\.session: must be ≥ 0, got -1"),
        (envelope(session=True), r"agent_status\.session: expected an integer, got True"),
        (envelope(ts="now"), r"agent_status\.ts: expected a number, got 'now'"),
        (envelope(ts=float("nan")), r"agent_status\.ts: must be finite, got nan"),
        (
            envelope(reason="x" * 2000),
            r"agent_status\.reason: length must be in 0\.\.1024, got 2000",
        ),
    ],
)
def test_rejections_name_field_and_problem(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_message(payload)


def test_nested_field_errors_carry_the_path() -> None:
    wire = update().to_wire()
    wire["metrics"] = {"loss": "low"}
    with pytest.raises(
        ProtocolError, match=r"model_update\.metrics\.loss: expected a number, got 'low'"
    ):
        decode_message(pack(wire))
    wire = update().to_wire()
    wire["num_samples"] = 0
    with pytest.raises(ProtocolError, match=r"model_update\.num_samples: must be ≥ 1, got 0"):
        decode_message(pack(wire))


def test_non_finite_delta_is_rejected() -> None:
    poisoned = update(tensors={"w": np.array([0.0, np.nan], np.float32)})
    with pytest.raises(
        ProtocolError, match=r"model_update\.tensors: tensor 'w' has 1 non-finite values"
    ):
        decode_message(poisoned.to_msgpack())


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    wire = Ping().to_wire()
    wire["added_in_a_later_minor_release"] = [1, 2]
    assert isinstance(decode_message(pack(wire)), Ping)


def test_oversized_payload_is_refused_before_parsing() -> None:
    payload = update().to_msgpack()
    with pytest.raises(
        PayloadTooLarge, match=f"payload of {len(payload)} bytes is above the limit of 100"
    ):
        decode_message(payload, limits=ProtocolLimits(max_message_bytes=100))


def test_json_from_other_publishers_is_accepted_with_whitespace() -> None:
    text = b'  {"v": 1, "type": "ping", "id": "x1"}'
    assert isinstance(decode_message(text), Ping)


def test_ids_are_unique() -> None:
    assert len({Ping().id for _ in range(1000)}) == 1000

"""An agent's inbox under hostile input: the role runtime's own handler (what the transport
feeds it) with real signed bundles on a real mosquitto.

Malformed commands, bad envelopes, bundles with bad or untrusted signatures, pings that would
make the agent write elsewhere, cancels for roles it does not run and replayed command ids: each
is refused with a logged reason, nothing runs, and the agent still answers a ping.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from agent.protocol.bundle import SignedBundle
from agent.protocol.messages import AssignRole, CancelRole, Ping
from tests.agent.test_runtime import AGENT, Finishes, Rig
from tests.hostile.hostile import (
    feed,
    mutated,
    segments,
    undecodable,
)

EXAMPLES = 1500
REFUSALS = {
    "inbox_rejected": "reason",
    "role_refused": "reason",
    "ping_rejected": "reason",
    "cancel_ignored": "reason",
    "inbox_duplicate": "reason",
}


def bad_bundles(rig: Rig) -> st.SearchStrategy[bytes]:
    """Assignments whose bundle must not run: signed by a stranger, tampered with after
    signing, a signature with a flipped bit, or not a signed bundle at all."""
    stranger = Ed25519PrivateKey.generate()
    good = SignedBundle.from_bytes(rig.bundle(job="h"))

    def flipped(bit: int) -> bytes:
        signature = bytearray(good.signature)
        signature[bit // 8 % len(signature)] ^= 1 << (bit % 8)
        return SignedBundle(good.content, good.key_id, bytes(signature)).to_bytes()

    def tampered(offset: int) -> bytes:
        content = bytearray(good.content)
        content[offset % len(content)] ^= 0xFF
        return SignedBundle(bytes(content), good.key_id, good.signature).to_bytes()

    bundles = st.one_of(
        st.just(rig.bundle(job="h", signer=stranger)),
        st.integers(0, 511).map(flipped),
        st.integers(0, 10_000).map(tampered),
        st.binary(max_size=200),
        st.just(SignedBundle(good.content, "ed25519:unknown", good.signature).to_bytes()),
    )
    return bundles.map(lambda data: AssignRole(job="h", role="trainer", bundle=data).to_msgpack())


def hostile(rig: Rig, replayed: bytes) -> st.SearchStrategy[bytes]:
    """Everything an inbox can carry that an agent must refuse."""
    ping = Ping(reply_to=rig.topics.rpc_replies("rig")).to_wire()
    assign = AssignRole(job="h", role="trainer", bundle=rig.bundle(job="h")).to_wire()
    cancel = CancelRole(job="h", role="trainer", reason="why").to_wire()
    elsewhere = st.sampled_from(
        [
            rig.topics.agent_status(AGENT),
            rig.topics.job_metrics("h", AGENT),
            f"{rig.topics.rpc_replies('x')}/deeper",
            "$SYS/broker",
            "#",
            "other/prefix/coordinator/rpc/replies/x",
        ]
    )
    return st.one_of(
        undecodable(replayed),
        mutated(ping, {"reply_to": "str"}, frozenset({"reply_to"})),
        mutated(assign, {"job": "name", "role": "name", "bundle": "bytes"}),
        mutated(cancel, {"job": "name", "role": "name", "reason": "str"}, frozenset({"reason"})),
        bad_bundles(rig),
        elsewhere.map(lambda topic: Ping(reply_to=topic).to_msgpack()),
        segments.map(lambda job: CancelRole(job=job, role="trainer").to_msgpack()),
        st.just(replayed),
    )


async def test_hostile_commands_are_refused_with_their_reasons(rig: Rig) -> None:
    replies = await rig.coordinator.subscribe(rig.topics.rpc_replies("rig"))
    runtime = await rig.runtime({"trainer": Finishes})
    started = Finishes.started
    replayed = Ping(reply_to=rig.topics.rpc_replies("rig")).to_msgpack()
    await runtime.handle(replayed)
    assert await replies.get(timeout=10)  # answered once

    tally = await feed(runtime.handle, hostile(rig, replayed), EXAMPLES, REFUSALS)

    assert tally.sent >= EXAMPLES
    assert set(tally.events) == set(REFUSALS), tally.events
    for text in (
        "signed by untrusted key",
        "signature does not verify",
        "is not a reply topic",
        "neither a JSON object nor a msgpack map",
        "unsupported protocol version",
        "unknown role",
        "id already handled",
    ):
        assert tally.mention(text), text
    assert Finishes.started == started  # nothing ran
    assert runtime.rejected >= tally.events["inbox_rejected"] + tally.events["ping_rejected"]
    # Still the agent it was: a fresh ping is answered.
    assert await rig.ping_rtt(replies) < 5

"""``ember broker config``'s kit, checked against a real mosquitto started with its files."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.protocol.homeassistant import node_id
from agent.protocol.topics import Topics
from agent.transport import BrokerConfig, Inbound, NotConnectedError, Subscription, Transport
from coordinator.brokerkit.acl import Account, render_acl
from coordinator.brokerkit.passwords import check_password, hash_password, parse_password_file
from tests.coordinator.brokerkit_fixtures import FAST, SecuredBroker, secured
from tests.coordinator.test_cli import Result, ember

__all__ = ["secured"]


def test_password_hashes_are_mosquittos_format() -> None:
    encoded = hash_password("s3cret", salt=b"0123456789ab")
    assert encoded.startswith("$7$101$MDEyMzQ1Njc4OWFi$")
    assert check_password("s3cret", encoded)
    assert not check_password("s3cret!", encoded)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_a_mosquitto_passwd_entry_checks_out(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "pw"], check=True)
    entry = parse_password_file(path.read_text())["alice"]
    assert check_password("pw", entry)
    assert not check_password("pW", entry)


def test_acl_grants_agents_only_their_own_topics() -> None:
    acl = render_acl(Topics("p"), [Account("a", "agent"), Account("g", "agent", aggregator=True)])
    block_a = acl.split("user a\n")[1].split("\n\n")[0].splitlines()
    assert "topic write p/jobs/+/updates/a" in block_a
    assert "topic read p/agents/a/inbox" in block_a
    assert not any("p/agents/+" in line or "p/#" in line for line in block_a)
    assert not any(line.startswith("topic readwrite p/jobs/+/model") for line in block_a)
    assert "topic readwrite p/jobs/+/model/#" in acl.split("user g\n")[1]


async def connected(config: BrokerConfig) -> Transport:
    transport = Transport(config)
    transport.start()
    await transport.wait_connected(10)
    return transport


async def refused(config: BrokerConfig) -> str:
    """Why a client with ``config`` is refused (all reasons logged, "" if none were: a plain
    MQTT CONNECT to a TLS listener is never answered); fails if the client gets in."""
    with capture_logs() as logs:
        async with Transport(config) as transport:
            with pytest.raises(NotConnectedError):
                await transport.wait_connected(3)
    return " ".join(e["error"] for e in logs if e["event"] == "mqtt_connection_failed")


async def test_strangers_are_refused_and_tls_needs_the_kits_ca(secured: SecuredBroker) -> None:
    alice = secured.agent_config("alice")
    anonymous = BrokerConfig(urls=alice.urls, ca_file=alice.ca_file, **FAST)
    assert "authori" in (await refused(anonymous)).lower()
    wrong = BrokerConfig(
        urls=alice.urls, username="alice", password="guess", ca_file=alice.ca_file, **FAST
    )
    assert "authori" in (await refused(wrong)).lower()
    system_ca = BrokerConfig(urls=alice.urls, username="alice", password=alice.password, **FAST)
    assert "certificate verify failed" in (await refused(system_ca))
    plain = BrokerConfig(
        urls=(f"mqtt://127.0.0.1:{secured.process.port}",),
        username="alice",
        password=alice.password,
        **FAST,
    )
    await refused(plain)
    transport = await connected(alice)  # the kit's CA and password: in
    await transport.close()


async def test_a_chunked_update_crosses_tls_intact(secured: SecuredBroker) -> None:
    """Over TLS (no ``sendmsg``) chunk frames go out one part at a time: a 10 MB update in 3
    frames (4 MiB each over MQTT 5 to a broker that states no limit) reaches the aggregator
    byte for byte."""
    t = secured.topics
    gw = await connected(secured.agent_config("gw"))
    alice = await connected(secured.agent_config("alice"))
    try:
        sub = await gw.subscribe(t.all_job_updates("j"))
        payload = os.urandom(10_000_000)
        await alice.publish(t.job_updates("j", "alice"), payload, timeout=30)
        got = await sub.get(timeout=30)
        assert bytes(got.payload) == payload
        assert alice.stats.frames_out == 3
    finally:
        await alice.close()
        await gw.close()


async def next_or_none(sub: Subscription, timeout: float) -> Inbound | None:
    try:
        return await sub.get(timeout=timeout)
    except asyncio.TimeoutError:
        return None


async def received_until(sub: Subscription, last: str) -> list[str]:
    """Topics ``sub`` delivers up to and including ``last`` (QoS 1 from one publisher arrives
    in order, so anything published before ``last`` and allowed through arrives first)."""
    seen: list[str] = []
    while not seen or seen[-1] != last:
        message = await sub.get(timeout=10)
        seen.append(message.topic)
    return seen


async def test_an_agent_writes_only_its_own_topics(secured: SecuredBroker) -> None:
    t = secured.topics
    coordinator = await connected(secured.account_config("ember-coordinator"))
    alice = await connected(secured.agent_config("alice"))
    try:
        everything = await coordinator.subscribe(f"{t.prefix}/#")
        discovery = await coordinator.subscribe("homeassistant/#")
        forged = [
            t.agent_status("bob"),
            t.agent_roles("bob"),
            t.agent_inbox("bob"),
            t.agent_inbox("alice"),
            t.job_updates("j1", "bob"),
            t.job_progress("j1", "bob"),
            t.job_metrics("j1", "alice"),  # "completed" there would end a job: aggregators only
            t.job_metrics("j1", "bob"),
            t.job_model("j1"),
            t.job_state("j1"),
            t.rpc_requests(),
            t.group_updates("j1", "lab", "bob"),
            t.group_model("j1", "lab"),  # a middle aggregator's: aggregators only
            t.group_ring("j1", "lab", "bob", "alice"),
            t.shard_updates("j1", 0, "bob"),
            t.shard_held("j1", 0),  # a shard's and the assembler's: aggregators only
            t.shard_slice("j1", 0),
            t.shard_commits("j1"),
        ]
        for topic in forged:
            await alice.publish(topic, b"forged by alice")
        ha = "homeassistant/sensor/{}/cpu/config"
        await alice.publish(ha.format(node_id("agent", "bob")), b"forged by alice")
        await alice.publish(ha.format(node_id("agent", "alice")), b"alice's discovery config")
        own = [
            t.agent_status("alice"),
            t.job_updates("j1", "alice"),
            t.group_updates("j1", "lab", "alice"),
            t.group_ring("j1", "lab", "alice", "bob"),
            t.shard_updates("j1", 1, "alice"),
            t.job_progress("j1", "alice"),
        ]
        for topic in own:
            await alice.publish(topic, b"alice's own")
        seen = await received_until(everything, own[-1])
        assert seen == own
        assert (await discovery.get(timeout=10)).topic == ha.format(node_id("agent", "alice"))
        assert await next_or_none(discovery, 0.3) is None
    finally:
        await alice.close()
        await coordinator.close()


async def test_an_agent_reads_only_its_inbox_and_the_model_topics(
    secured: SecuredBroker,
) -> None:
    t = secured.topics
    coordinator = await connected(secured.account_config("ember-coordinator"))
    alice = await connected(secured.agent_config("alice"))
    gw = await connected(secured.agent_config("gw"))
    try:
        alice_sees = await alice.subscribe(f"{t.prefix}/#")
        gw_sees = await gw.subscribe(t.all_job_updates("j1"))
        gw_group = await gw.subscribe(t.all_group_updates("j1", "lab"))
        gw_shard = await gw.subscribe(t.all_shard_updates("j1", 1))
        await coordinator.publish(t.agent_inbox("bob"), b"for bob only")
        await coordinator.publish(t.job_updates("j1", "bob"), b"bob's update")
        await coordinator.publish(t.job_state("j1"), b"state")
        await coordinator.publish(t.job_model("j1"), b"model version")
        await coordinator.publish(t.group_updates("j1", "lab", "bob"), b"bob's group update")
        await coordinator.publish(t.group_model("j1", "lab"), b"relayed version")
        await coordinator.publish(t.group_ring("j1", "lab", "bob", "carol"), b"for carol")
        await coordinator.publish(t.group_ring("j1", "lab", "bob", "alice"), b"for alice")
        await coordinator.publish(t.shard_updates("j1", 1, "bob"), b"bob's part for shard 1")
        await coordinator.publish(t.agent_inbox("alice"), b"for alice")
        assert await received_until(alice_sees, t.agent_inbox("alice")) == [
            t.job_model("j1"),
            t.group_model("j1", "lab"),
            t.group_ring("j1", "lab", "bob", "alice"),
            t.agent_inbox("alice"),
        ]
        # The aggregator grant: gw reads every trainer's updates and writes model versions,
        # as a top or a middle aggregator.
        assert (await gw_sees.get(timeout=10)).topic == t.job_updates("j1", "bob")
        assert (await gw_group.get(timeout=10)).topic == t.group_updates("j1", "lab", "bob")
        assert (await gw_shard.get(timeout=10)).topic == t.shard_updates("j1", 1, "bob")
        # ... and, as a shard or an assembler, the held reports, slices and commits.
        shard_traffic = await coordinator.subscribe(f"{t.prefix}/jobs/j1/shards/#")
        commits = await gw.subscribe(t.shard_commits("j1"))
        for topic in (t.shard_held("j1", 1), t.shard_slice("j1", 1), t.shard_commits("j1")):
            await gw.publish(topic, b"gw's")
        assert await received_until(shard_traffic, t.shard_commits("j1")) == [
            t.shard_held("j1", 1),
            t.shard_slice("j1", 1),
            t.shard_commits("j1"),
        ]
        assert (await commits.get(timeout=10)).payload == b"gw's"
        models = await coordinator.subscribe(t.job_model("j1"))
        await alice.publish(t.job_model("j1"), b"alice is no aggregator")
        await gw.publish(t.job_model("j1"), b"gw's version")
        assert (await models.get(timeout=10)).payload == b"gw's version"
        assert await next_or_none(models, 0.5) is None
        metrics = await coordinator.subscribe(t.all_job_metrics("j1"))
        await gw.publish(t.job_metrics("j1", "bob"), b"gw is not bob")
        await gw.publish(t.job_metrics("j1", "gw"), b'{"event": "model_version"}')
        assert (await metrics.get(timeout=10)).payload == b'{"event": "model_version"}'
    finally:
        for client in (alice, gw, coordinator):
            await client.close()


async def test_operators_send_rpc_requests_and_nothing_else(secured: SecuredBroker) -> None:
    t = secured.topics
    coordinator = await connected(secured.account_config("ember-coordinator"))
    operator = await connected(secured.account_config("op"))
    try:
        everything = await coordinator.subscribe(f"{t.prefix}/#")
        await operator.publish(t.agent_inbox("alice"), b"operator to an inbox")
        await operator.publish(t.job_state("j1"), b"operator forging state")
        await operator.publish(t.rpc_requests(), b"request")
        assert await received_until(everything, t.rpc_requests()) == [t.rpc_requests()]
    finally:
        await operator.close()
        await coordinator.close()


async def test_config_runs_again_keep_accounts_and_the_ca(tmp_path: Path) -> None:
    out = tmp_path / "kit"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}

    async def config(*args: str) -> Result:
        return await ember("broker", "config", "--out", str(out), *args, env=env)

    first = await config("--host", "broker.lan", "--port", "18883", "--agent", "pi-a")
    assert first.code == 0, first.err
    conf = (out / "mosquitto.conf").read_text()
    for line in ("per_listener_settings true", "listener 18883", "allow_anonymous false"):
        assert line in conf.splitlines()
    modes = {
        name: oct((out / name).stat().st_mode & 0o777)
        for name in ("passwd", "ca.key", "server.key", "kit.json", "credentials/pi-a/agent.toml")
    }
    assert modes == {
        "passwd": "0o640",
        "ca.key": "0o600",
        "server.key": "0o640",
        "kit.json": "0o600",
        "credentials/pi-a/agent.toml": "0o600",
    }
    hashes = parse_password_file((out / "passwd").read_text())
    ca, server = (out / "ca.crt").read_bytes(), (out / "server.crt").read_bytes()

    again = await config("--agent", "pi-b", "--operator", "alice")
    assert again.code == 0, again.err
    now = parse_password_file((out / "passwd").read_text())
    assert now["pi-a"] == hashes["pi-a"]
    assert {"pi-a", "pi-b", "alice", "ember-coordinator", "ember-enrol"} == now.keys()
    assert (out / "ca.crt").read_bytes() == ca
    assert (out / "server.crt").read_bytes() == server
    assert "listener 18883" in (out / "mosquitto.conf").read_text()

    moved = await config("--host", "broker2.lan")
    assert moved.code == 0, moved.err
    assert (out / "ca.crt").read_bytes() == ca
    assert (out / "server.crt").read_bytes() != server

    bad = await config("--agent", "pi/c")
    assert bad.code == 2
    assert bad.err.count("\n") == 1
    assert "contains '/'" in bad.err

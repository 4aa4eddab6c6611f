"""The agent daemon as a user runs it (``ember-agent run``) against a real mosquitto."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.process import spawn_agent
from agent.protocol.messages import Ping, Pong, decode_message
from agent.protocol.topics import Topics
from agent.transport import BrokerConfig, Transport
from coordinator.mosquitto import MosquittoProcess
from tests.agent.conftest import (
    FAST_BROKER,
    REPO,
    AgentProcess,
    agent_toml,
    make_npz,
    next_json,
)

StartAgent = Callable[..., Awaitable[AgentProcess]]


async def test_online_info_roles_then_clean_stop_and_session_survives_restart(
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    data = make_npz(tmp_path / "digits.npz", samples=120)
    config = agent_toml(
        state_dir=tmp_path / "state",
        broker_url=mosquitto.url,
        topics=topics,
        agent_id="pi-kitchen",
        datasets=[{"name": "digits", "path": str(data), "tags": ["vision"]}],
        telemetry=0.2,
    )
    status = await watcher.subscribe(topics.agent_status("pi-kitchen"))
    info = await watcher.subscribe(topics.agent_info("pi-kitchen"))
    roles = await watcher.subscribe(topics.agent_roles("pi-kitchen"))
    telemetry = await watcher.subscribe(topics.agent_telemetry("pi-kitchen"))

    agent = await start_agent(config)
    online = await next_json(status, 20, state="online")
    assert online["type"] == "agent_status"
    assert online["agent"] == "pi-kitchen"
    first_session = online["session"]
    assert first_session >= 1

    document = await next_json(info, 30, agent="pi-kitchen")
    assert document["labels"] == {"site": "kitchen"}
    [digits] = document["datasets"]
    assert digits["name"] == "digits"
    assert digits["samples"] == 120
    assert digits["feature_shape"] == [8]
    assert digits["label_counts"] == {"0": 40, "1": 40, "2": 40}
    assert digits["tags"] == ["vision"]
    assert len(digits["schema_hash"]) == 16
    assert "path" not in digits  # the path stays on the device
    for key in ("version", "os", "arch", "cpu", "memory", "disk", "board", "accelerators"):
        assert key in document, key
    assert document["runtimes"]["onnxruntime"]["version"]
    assert "CPUExecutionProvider" in document["runtimes"]["onnxruntime"]["providers"]
    assert (await next_json(roles, 10, agent="pi-kitchen"))["roles"] == {}
    # The dataset was summarized (label counts and all) by a child process: the idle daemon
    # never maps numpy (15 MB of its resident memory on a Pi).
    maps = await asyncio.to_thread(Path(f"/proc/{agent.process.pid}/maps").read_text)
    assert "multiarray" not in maps

    sample = await next_json(telemetry, 10, agent="pi-kitchen")
    assert {
        "cpu_percent",
        "load",
        "memory",
        "disk",
        "net",
        "temperature",
        "temperature_max",
        "updates_sent",
    } <= sample.keys()
    assert sample["updates_sent"] == 0
    assert sample["temperature_max"] == max(sample["temperature"].values(), default=None)
    assert sample["roles"] == []

    assert await agent.stop(signal.SIGTERM) == 0
    offline = await next_json(status, 10, state="offline")
    assert offline["reason"] == "stopped"
    assert offline["session"] == first_session

    again = await start_agent(config)
    online = await next_json(status, 20, state="online")
    assert online["session"] == first_session + 1  # kept in state_dir across restarts
    assert await again.stop(signal.SIGINT) == 0
    assert "Traceback" not in agent.output() + again.output()


async def test_kill_9_turns_the_status_offline_through_the_will(
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    config = agent_toml(
        state_dir=tmp_path / "state", broker_url=mosquitto.url, topics=topics, keepalive=2
    )
    status = await watcher.subscribe(topics.agent_status("pi-test"))
    agent = await start_agent(config)
    online = await next_json(status, 20, state="online")
    agent.kill()
    loop = asyncio.get_running_loop()
    killed = loop.time()
    offline = await next_json(status, 3.0, state="offline")  # 1.5 × keepalive
    assert loop.time() - killed <= 3.0
    assert offline["reason"] == "connection lost"
    assert offline["session"] == online["session"]  # the Will belongs to that session


async def test_broker_restart_reconnects_resubscribes_and_republishes(
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    config = agent_toml(state_dir=tmp_path / "state", broker_url=mosquitto.url, topics=topics)
    status = await watcher.subscribe(topics.agent_status("pi-test"))
    pongs = await watcher.subscribe(topics.rpc_replies("t"))
    agent = await start_agent(config)
    online = await next_json(status, 20, state="online")

    await asyncio.to_thread(mosquitto.restart)  # not persistent: retained messages are gone
    again = await next_json(status, 20, state="online")
    assert again["session"] == online["session"] + 1
    assert agent.running

    # The inbox subscription came back with the connection: a ping is answered.
    await watcher.wait_connected(10)
    ping = Ping(reply_to=topics.rpc_replies("t"))
    await watcher.publish(topics.agent_inbox("pi-test"), ping.to_msgpack())
    pong = decode_message((await pongs.get(timeout=10)).payload, expect=Pong)
    assert (pong.ping_id, pong.agent) == (ping.id, "pi-test")

    # And the retained status is there for a client that arrives now.
    async with Transport(BrokerConfig(urls=(mosquitto.url,), **FAST_BROKER)) as newcomer:
        late = await newcomer.subscribe(topics.agent_status("pi-test"))
        assert (await next_json(late, 5))["state"] == "online"
    assert await agent.stop() == 0


async def test_generated_id_is_kept_in_the_state_dir(
    mosquitto: MosquittoProcess,
    watcher: Transport,
    topics: Topics,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = agent_toml(state_dir=state, broker_url=mosquitto.url, topics=topics, agent_id=None)
    status = await watcher.subscribe(topics.all_agents("status"))
    agent = await start_agent(config)
    online = await next_json(status, 20, state="online")
    assert online["agent"] == (state / "agent_id").read_text().strip()
    assert await agent.stop() == 0


async def test_one_process_hosts_several_agents_with_their_own_presence(
    mosquitto: MosquittoProcess, watcher: Transport, topics: Topics, tmp_path: Path
) -> None:
    """``ember-agent run --config A --also B``: two identities, two connections and Wills,
    one process (a simulated fleet starts faster); SIGTERM stops both cleanly."""
    configs = []
    for name in ("pi-a", "pi-b"):
        path = tmp_path / f"{name}.toml"
        path.write_text(
            agent_toml(
                state_dir=tmp_path / name, broker_url=mosquitto.url, topics=topics, agent_id=name
            )
        )
        configs.append(path)
    statuses = {
        name: await watcher.subscribe(topics.agent_status(name)) for name in ("pi-a", "pi-b")
    }
    log = tmp_path / "agents.log"
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as sink:
        process = await spawn_agent(configs[0], sink, also=configs[1:], env=environ)
    try:
        for sub in statuses.values():
            await next_json(sub, 30, state="online")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        for sub in statuses.values():
            assert (await next_json(sub, 10, state="offline"))["state"] == "offline"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_hosted_agents_need_their_own_ids(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[agent]\nid = "same"\n')
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path), "--also", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2
    assert "--also: every agent in one process needs its own id" in done.stderr

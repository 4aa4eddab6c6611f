"""docs/topics.md, the MQTT topic reference, against the code and against real traffic.

The reference's summary tables are parsed (topic pattern, QoS, retain flag, encoding, schema);
the JSON Schemas in agent/protocol/schemas/ are the payload contract. The slow test runs a real
job (coordinator with its embedded agent, two agent processes, Home Assistant discovery on)
against a real mosquitto, records every message on ``#`` with an independent MQTT 5 client
(retain-as-published, QoS 2, so the publisher's QoS and retain flag are seen as sent) and checks
each against the reference; every documented topic must have been seen.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import paho.mqtt.client as paho
import psutil
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.process import reap, spawn_agent, terminate
from agent.protocol.chunking import MAGIC
from agent.protocol.topics import Topics
from agent.transport import BrokerConfig, Transport
from coordinator.bundles import model_artifacts
from coordinator.demo.data import dirichlet_shards, holdout_split, load_digits_scaled
from coordinator.demo.run import DemoOptions, job_spec
from coordinator.dispatcher import Timings
from coordinator.mosquitto import MosquittoProcess
from coordinator.rpc import RpcClient
from coordinator.service import Coordinator, ServiceConfig
from coordinator.spec import parse_spec
from tests.agent.conftest import agent_toml
from tests.ha_templates import is_number_or_unknown, render

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "topics.md"
SCHEMAS = REPO / "agent" / "protocol" / "schemas"
DEFAULT_BASES = {"ember/v1": "ember", "homeassistant": "homeassistant"}

ENROLMENT = "enrolment needs a broker kit with logins (tests/coordinator/test_enrolment.py)"
GROUPS = (
    "the job is two-tier; hierarchical and hybrid jobs run in tests/agent/roles/test_hierarchy.py"
)
SHARDS = "the job has one aggregator; sharded jobs run in tests/agent/roles/test_sharded.py"
NOT_EXERCISED = {
    "enrol/requests": ENROLMENT,
    "enrol/replies/<client>": ENROLMENT,
    "jobs/<job>/groups/<group>/updates/<agent>": GROUPS,
    "jobs/<job>/groups/<group>/model": GROUPS,
    "jobs/<job>/groups/<group>/ring/<agent>/<successor>": GROUPS,
    "jobs/<job>/shards/<shard>/updates/<agent>": SHARDS,
    "jobs/<job>/shards/<shard>/held": SHARDS,
    "jobs/<job>/shards/<shard>/slice": SHARDS,
    "jobs/<job>/shards/commit": SHARDS,
}
"""Documented topics the job below does not produce, each with the reason."""


@dataclass(frozen=True)
class TopicDoc:
    """One row of a summary table in docs/topics.md."""

    pattern: str
    base: str
    """``ember`` (under Ember's prefix) or ``homeassistant`` (under the discovery prefix)."""
    writer: str
    qos: int | None
    retained: bool | None
    encoding: str
    schema: str | None

    def regex(self, prefix: str) -> re.Pattern[str]:
        parts = re.split(r"(<[^>]+>)", self.pattern)
        body = "".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts)
        return re.compile(re.escape(prefix) + "/" + body)

    def validator(self) -> jsonschema.Draft202012Validator | None:
        if self.schema is None:
            return None
        return jsonschema.Draft202012Validator(json.loads((SCHEMAS / self.schema).read_text()))


def topic_reference() -> list[TopicDoc]:
    """Every row of the tables headed ``| Topic (under `<base>/`) | Writer | QoS | ...``."""
    rows: list[TopicDoc] = []
    base: str | None = None
    for line in DOC.read_text().splitlines():
        header = re.match(r"\| Topic \(under `([^`]+)/`\) \| Writer \| QoS \| Retained \|", line)
        if header:
            base = DEFAULT_BASES[header.group(1)]
            continue
        if base is None or not line.startswith("|"):
            base = None if not line.startswith("|") else base
            continue
        if set(line.strip()) <= {"|", "-"}:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        topic, writer, qos, retained, encoding, schema = cells
        link = re.search(r"\(\.\./agent/protocol/schemas/([a-z_]+\.json)\)", schema)
        rows.append(
            TopicDoc(
                pattern=topic.strip("`"),
                base=base,
                writer=writer,
                qos=None if qos == "any" else int(qos),
                retained={"yes": True, "no": False, "any": None}[retained],
                encoding=encoding,
                schema=link.group(1) if link else None,
            )
        )
    return rows


def json_examples() -> Iterator[tuple[str, str]]:
    """(schema file, JSON text) for every ```json block, by the section it stands in: a
    ``### `topic` `` heading names its topic's schema; the Home Assistant section its own."""
    by_pattern = {row.pattern: row.schema for row in topic_reference() if row.base == "ember"}
    schema: str | None = None
    block: list[str] | None = None
    for line in DOC.read_text().splitlines():
        if block is not None:
            if line.startswith("```"):
                if schema is not None:
                    yield schema, "\n".join(block)
                block = None
            else:
                block.append(line)
        elif line.startswith("```json"):
            block = []
        elif line.startswith("## "):
            home = line.startswith("## Home Assistant discovery")
            schema = "homeassistant_config.json" if home else None
        elif line.startswith("### "):
            named = re.match(r"### `([^`]+)`", line)
            schema = by_pattern.get(named.group(1)) if named else None


def test_every_documented_schema_exists_and_every_schema_is_documented() -> None:
    rows = topic_reference()
    assert len(rows) >= 15
    linked = {row.schema for row in rows if row.schema}
    assert linked == {p.name for p in SCHEMAS.glob("*.json")}
    for name in linked:
        jsonschema.Draft202012Validator.check_schema(json.loads((SCHEMAS / name).read_text()))
    json_rows = [r for r in rows if r.encoding.startswith("JSON")]
    assert all(r.schema for r in json_rows), [r.pattern for r in json_rows if not r.schema]


def test_every_json_example_in_the_reference_fits_its_schema() -> None:
    examples = list(json_examples())
    assert len(examples) >= 12
    for schema, text in examples:
        document = json.loads(text)
        validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / schema).read_text()))
        errors = [e.message for e in validator.iter_errors(document)]
        assert not errors, (schema, text[:200], errors)


def test_every_topic_the_code_builds_is_in_the_reference() -> None:
    topics = Topics("p")
    rows = [r for r in topic_reference() if r.base == "ember"]
    generic = {"agent", "job", "agent_of", "job_of", "metrics_sender", "shard_of"}  # parsers
    built = 0
    for name, method in inspect.getmembers(topics, inspect.ismethod):
        if name.startswith(("_", "all_")) or name in generic:
            continue
        parameters = inspect.signature(method).parameters.values()
        arguments = [f"x{i}" for i, p in enumerate(parameters) if p.default is p.empty]
        topic = method(*arguments)
        matches = [r.pattern for r in rows if r.regex("p").fullmatch(topic)]
        assert len(matches) == 1, (name, topic, matches)
        built += 1
    assert built >= 12


# -- real traffic --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    topic: str
    qos: int
    retain: bool
    payload: bytes
    at: float


class Recorder:
    """An MQTT 5 client of its own (paho, in its network thread) that records everything."""

    def __init__(self, port: int) -> None:
        self.messages: list[Seen] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="topic-recorder", protocol=paho.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe("#", options=SubscribeOptions(qos=2, retainAsPublished=True))

    def _on_message(self, client: paho.Client, userdata: Any, message: Any) -> None:
        seen = Seen(message.topic, message.qos, bool(message.retain), message.payload, time.time())
        with self._lock:
            self.messages.append(seen)

    def wait_subscribed(self) -> None:
        assert self._subscribed.wait(10), "the recorder did not subscribe"

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.messages)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def until(predicate: Any, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(poll)


def last_json(messages: list[Seen], topic: str) -> dict[str, Any] | None:
    for seen in reversed(messages):
        if seen.topic == topic and seen.payload:
            document: dict[str, Any] = json.loads(seen.payload)
            return document
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_real_job_publishes_exactly_what_the_reference_says(
    mosquitto: MosquittoProcess,
    topics: Topics,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ha = "ha-" + topics.prefix.rsplit("-", 1)[-1]
    monkeypatch.setenv("EMBER_AGENT__TELEMETRY__INTERVAL", "0.5")  # the embedded agent too
    recorder = Recorder(mosquitto.port)
    children: list[asyncio.subprocess.Process] = []
    coordinator: Coordinator | None = None
    ours: set[tuple[str, bytes]] = set()
    """What the test itself publishes outside the reference (garbage for the aggregator)."""
    try:
        recorder.wait_subscribed()
        x, y = load_digits_scaled()
        train, test = holdout_split(x, y, 0.2, seed=0)
        holdout = test.save(tmp_path / "holdout.npz")
        shards = [
            s.save(tmp_path / f"digits-{i}.npz")
            for i, s in enumerate(dirichlet_shards(train, 2, alpha=0.5, seed=0))
        ]
        broker = BrokerConfig(urls=(mosquitto.url,), backoff_initial=0.05, backoff_max=0.5)
        coordinator = Coordinator(
            ServiceConfig(
                broker=broker,
                state_dir=tmp_path / "coordinator",
                prefix=topics.prefix,
                zeroconf=False,
                agent_id="hub",
                agent_datasets=(("digits-holdout", holdout),),
                homeassistant=True,
                homeassistant_prefix=ha,
                timings=Timings(settle=0.5, tick=0.2, dispatch_timeout=15.0),
            )
        )
        await coordinator.start()
        for i, shard in enumerate(shards):
            config = tmp_path / f"pi-{i}.toml"
            config.write_text(
                agent_toml(
                    state_dir=tmp_path / f"pi-{i}",
                    broker_url=mosquitto.url,
                    topics=topics,
                    agent_id=f"pi-{i}",
                    datasets=[{"name": "digits", "path": str(shard)}],
                    telemetry=0.5,
                    extra=(
                        f"[trust]\ncoordinator_keys = [{json.dumps(coordinator.public_key)}]\n"
                        f'[homeassistant]\nenabled = true\ndiscovery_prefix = "{ha}"\n'
                        # Slow enough for the test to slip garbage in while the job runs.
                        "[simulation]\nslowdown = 5\n"
                    ),
                )
            )
            with (tmp_path / f"pi-{i}.log").open("wb") as log:
                children.append(await spawn_agent(config, log))
        agents = ["hub", "pi-0", "pi-1"]
        registry = coordinator.registry
        assert registry is not None
        await until(
            lambda: sum(1 for a in registry.snapshot() if a.online and a.info) == 3,
            90,
            "three agents online with their info",
        )

        # Submit as `ember jobs submit` does: over the coordinator's RPC topics.
        raw = job_spec(DemoOptions(agents=2))
        raw["stop"] = {"max_versions": 8}
        spec = parse_spec(raw)
        built = await asyncio.to_thread(model_artifacts, spec, None)
        async with Transport(broker, name="cli") as cli_transport:
            await cli_transport.wait_connected(5)
            async with RpcClient(cli_transport, topics) as client:
                summary = await client.call(
                    "jobs.submit",
                    {"spec": spec.to_dict(), "artifacts": built.artifacts, "code": built.code},
                    timeout=60,
                )
                job = summary["job"]
                await client.call("jobs.ls", timeout=30)

            # Garbage on a trainer's updates topic once the aggregator listens (it subscribes
            # before it publishes its first version): rejected, and the job state lists it
            # with its reason.
            model = topics.job_model(job)
            await until(
                lambda: any(s.topic == model for s in recorder.snapshot()),
                90,
                "the aggregator's first model version",
                poll=0.005,
            )
            garbage = (topics.job_updates(job, "pi-1"), b"\x93not msgpack at all")
            ours.add(garbage)
            await cli_transport.publish(*garbage, qos=1)
            # Home Assistant (re)starts and says so: every config comes again.
            await cli_transport.publish(f"{ha}/status", b"online", qos=1)

            state_topic = topics.job_state(job)
            await until(
                lambda: (
                    (last_json(recorder.snapshot(), state_topic) or {}).get("phase") == "completed"
                ),
                120,
                "the job completed",
            )
            job_configs = lambda: {  # noqa: E731
                s.topic: s.payload
                for s in recorder.snapshot()
                if s.topic.startswith(f"{ha}/") and f"/ember_job_{job}/" in s.topic
            }
            await until(
                lambda: len(job_configs()) == 5 and not any(job_configs().values()),
                30,
                "the job's Home Assistant device removed",
            )
            await until(
                lambda: all(
                    any(s.topic == topics.agent_telemetry(a) for s in recorder.snapshot())
                    for a in agents
                ),
                30,
                "telemetry from every agent",
            )
        for child in children:
            terminate(child)
        for child in children:
            await reap(child, 15)
        await coordinator.stop()
        coordinator = None
        await until(
            lambda: (
                sum(
                    1
                    for s in recorder.snapshot()
                    if s.topic.endswith("/status") and b'"offline"' in s.payload
                )
                >= 3
            ),
            30,
            "every agent offline",
        )
    finally:
        for child in children:
            terminate(child)
            await reap(child, 15)
        if coordinator is not None:
            await coordinator.stop()
        recorder.stop()

    messages = [s for s in recorder.snapshot() if (s.topic, s.payload) not in ours]
    with (tmp_path / "recorded.jsonl").open("w") as out:  # for whoever debugs a failure
        for s in messages:
            text = s.payload.decode() if s.payload[:1] in (b"{", b"o") else s.payload.hex()[:64]
            out.write(
                json.dumps({"topic": s.topic, "qos": s.qos, "retain": s.retain, "payload": text})
                + "\n"
            )
    check_against_reference(messages, topics.prefix, ha)
    check_home_assistant(messages, topics, ha, agents=agents, job=job)
    final = last_json(messages, topics.job_state(job))
    assert final is not None
    reported = [
        (json.loads(s.payload).get("event"), json.loads(s.payload).get("version"))
        for s in messages
        if s.topic == topics.job_metrics(job, "hub") and s.payload[:1] == b"{"
    ]
    assert final["history"]["versions"] == 9, (  # 0 to 8
        f"history {[p['version'] for p in final['history']['points']]}; the aggregator's "
        f"events as recorded {reported}; see {tmp_path} (recorded.jsonl, hub's log)"
    )
    assert [p["version"] for p in final["history"]["points"]][-1] == final["model_version"]
    assert all("accuracy" in p for p in final["history"]["points"])
    [refusal] = [r for r in final["rejected"]["recent"] if r["topic"] == garbage[0]]
    assert refusal["kind"] == "rejected"
    assert refusal["agent"] == "pi-1"
    assert refusal["reason"]


def check_against_reference(messages: list[Seen], prefix: str, ha: str) -> None:
    rows = topic_reference()
    prefixes = {"ember": prefix, "homeassistant": ha}
    validators = {row.pattern: row.validator() for row in rows}
    seen_rows: set[str] = set()
    problems: list[str] = []
    for s in messages:
        matches = [r for r in rows if r.regex(prefixes[r.base]).fullmatch(s.topic)]
        if len(matches) != 1:
            problems.append(f"{s.topic}: matches {[r.pattern for r in matches]} in the reference")
            continue
        [row] = matches
        seen_rows.add(row.pattern)
        if row.qos is not None and s.qos != row.qos:
            problems.append(f"{s.topic}: QoS {s.qos}, the reference says {row.qos}")
        if row.retained is not None and s.retain != row.retained:
            problems.append(f"{s.topic}: retain={s.retain}, the reference says {row.retained}")
        problem = payload_problem(row, s.payload, validators[row.pattern])
        if problem:
            problems.append(f"{s.topic}: {problem}")
    assert not problems, "\n".join(sorted(set(problems))[:40])
    missing = {r.pattern for r in rows} - seen_rows - set(NOT_EXERCISED)
    assert not missing, f"documented but never published in this run: {sorted(missing)}"
    assert not (set(NOT_EXERCISED) & seen_rows), "marked not exercised, but seen"


def payload_problem(
    row: TopicDoc, payload: bytes, validator: jsonschema.Draft202012Validator | None
) -> str:
    if row.encoding.startswith("JSON"):
        if not payload and "empty" in row.encoding:
            return ""
        try:
            document = json.loads(payload)
        except ValueError as exc:
            return f"not JSON: {exc}"
        assert validator is not None
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
        return "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:3])
    if row.encoding == "msgpack":
        if payload[:4] == MAGIC:
            return ""  # a chunk frame
        try:
            message = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            return f"not msgpack: {exc}"
        ok = isinstance(message, dict) and {"v", "type", "id"} <= message.keys()
        return "" if ok else "msgpack without the envelope (v, type, id)"
    if row.encoding.startswith("text"):
        return "" if payload in (b"online", b"offline") else f"text {payload[:40]!r}"
    return f"unknown encoding {row.encoding!r} in the reference"


def check_home_assistant(
    messages: list[Seen], topics: Topics, ha: str, *, agents: list[str], job: str
) -> None:
    """Valid discovery configs for every agent and the job, whose state topics carry the values
    their templates point to."""
    configs: dict[str, list[dict[str, Any]]] = {}
    for s in messages:
        if s.topic.startswith(f"{ha}/") and s.topic.endswith("/config") and s.payload:
            configs.setdefault(s.topic, []).append(json.loads(s.payload))
    by_device: dict[str, set[str]] = {}
    for topic, versions in configs.items():
        by_device.setdefault(versions[0]["device"]["identifiers"][0], set()).add(topic)
    for agent in agents:
        node = f"ember_agent_{agent}"
        assert len(by_device[node]) == 6, (agent, sorted(by_device.get(node, ())))
        # Published at connect and again after Home Assistant's birth message.
        assert all(len(configs[t]) >= 2 for t in by_device[node]), agent
    assert len(by_device[f"ember_job_{job}"]) == 5
    payloads: dict[str, list[bytes]] = {}
    for s in messages:
        if s.payload and not s.topic.startswith(f"{ha}/"):
            payloads.setdefault(s.topic, []).append(s.payload)
    no_sensors = not getattr(psutil, "sensors_temperatures", dict)()
    for topic, versions in configs.items():
        config = versions[-1]
        states = payloads.get(config["state_topic"])
        assert states, f"{topic}: nothing seen on {config['state_topic']}"
        rendered = [render(config["value_template"], p) for p in states]
        path = re.fullmatch(r"\{\{ value_json\.([\w.]+) \}\}", config["value_template"])
        for payload, value in zip(states, rendered, strict=True):
            if path:  # the rendered state is the field the template points to
                field: Any = json.loads(payload)
                for key in path.group(1).split("."):
                    field = field[key]
                assert value == str(field), (topic, value, field)
        if topic.split("/")[1] == "binary_sensor":
            assert set(rendered) <= {config["payload_on"], config["payload_off"]}, rendered
            assert config["payload_on"] in rendered
        elif "unit_of_measurement" in config or "state_class" in config:
            assert all(is_number_or_unknown(v) for v in rendered), (topic, rendered)
            known = [v for v in rendered if v != "None"]
            assert known or (config["name"] == "Temperature" and no_sensors), topic
        else:
            assert all(v and v != "None" for v in rendered), (topic, rendered)
        for availability in config.get("availability", []):
            statuses = payloads[availability["topic"]]
            allowed = {availability["payload_available"], availability["payload_not_available"]}
            assert {render(availability["value_template"], p) for p in statuses} <= allowed
    accuracy = next(c[-1] for t, c in configs.items() if t.endswith(f"_{job}/accuracy/config"))
    values = [render(accuracy["value_template"], p) for p in payloads[topics.job_state(job)]]
    assert any(v != "None" and 0 <= float(v) <= 1 for v in values), values

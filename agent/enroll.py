"""``ember-agent enroll``: trade a one-time token for this device's broker login.

The device connects with the enrolment login in the ``--coordinator`` URL (it may only send
enrolment requests and read its own reply), proves it holds the token, and receives its own
login, the broker URL, the fleet's CA and the coordinator's public key, sealed with the token
(:mod:`agent.protocol.enrolment`). It then writes ``agent.toml`` (keeping what an existing one
held: state directory, labels, datasets) and the CA beside it. Without ``--ca`` the enrolment
connection cannot check the broker's certificate; what it receives is authenticated by the
token instead, and every later connection checks the broker against the received CA.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.config import parse_config
from agent.credentials import AgentCredentials, write_atomic
from agent.protocol.enrolment import EnrolReply, EnrolRequest, Token, grant_fields
from agent.protocol.errors import ProtocolError
from agent.protocol.messages import decode_message
from agent.protocol.topics import Topics
from agent.transport import BrokerConfig, BrokerEndpoint, NotConnectedError, Transport

log = structlog.get_logger("ember.enroll")
_toml: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")

CA_FILE = "ember-ca.crt"


class EnrolmentError(Exception):
    """Enrolment did not work; the message says why, in one line."""


@dataclass(frozen=True)
class Enrolled:
    agent: str
    config: Path
    ca: Path


async def request_grant(
    *,
    url: str,
    token: Token,
    agent_id: str,
    prefix: str,
    ca_file: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Ask the coordinator for a login with ``token``; the opened, checked grant."""
    try:
        endpoint = BrokerEndpoint.parse(url)
    except ValueError as exc:
        raise EnrolmentError(f"--coordinator: {exc}") from None
    if not endpoint.username:
        raise EnrolmentError(
            "--coordinator: the URL needs the enrolment login, mqtts://ember-enrol:PASSWORD@host "
            "(as 'ember agents token' prints it)"
        )
    client = f"enrol-{secrets.token_hex(8)}"
    topics = Topics(prefix)
    config = BrokerConfig(
        urls=(url,),
        client_id=client,
        ca_file=ca_file,
        tls_verify=ca_file is not None,
        connect_timeout=min(timeout, 10.0),
        backoff_initial=0.2,
        backoff_max=2.0,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with Transport(config, name="enrol") as transport:
        try:
            await transport.wait_connected(timeout)
        except NotConnectedError:
            raise EnrolmentError(
                f"cannot log in to the broker at {endpoint} within {timeout:g} s "
                "(is the enrolment URL, with its password, the one 'ember agents token' printed?)"
            ) from None
        replies = await transport.subscribe(topics.enrol_replies(client), qos=1)
        request = EnrolRequest(
            token=token.id,
            agent=agent_id,
            client=client,
            nonce=os.urandom(16),
            version=__version__,
        ).signed(token)
        await transport.publish(topics.enrol_requests(), request.to_msgpack(), timeout=timeout)
        log.info("enrolment_requested", agent=agent_id, token=token.id, broker=str(endpoint))
        while True:
            left = deadline - loop.time()
            try:
                message = await replies.get(timeout=max(0.01, left))
            except asyncio.TimeoutError:
                raise EnrolmentError(
                    f"no answer from the coordinator within {timeout:g} s (is 'ember serve "
                    "--broker-kit' running, with the same --prefix?)"
                ) from None
            try:
                reply = decode_message(message.payload, expect=EnrolReply)
            except ProtocolError as exc:
                log.warning("enrolment_reply_rejected", reason=str(exc))
                continue
            if reply.request != request.id:
                continue
            if not reply.ok:
                raise EnrolmentError(f"enrolment refused: {reply.reason}")
            try:
                return grant_fields(token.open(request.id, reply.sealed))
            except ProtocolError as exc:
                # Not sealed with our token: forged or garbled. Keep waiting for the real one.
                log.warning("enrolment_reply_rejected", reason=str(exc))


def write_config(path: Path, grant: dict[str, Any], *, state_dir: str | None = None) -> Enrolled:
    """Write ``path`` (merged into what it held) and the CA beside it; both atomically."""
    document: dict[str, Any] = {}
    if path.exists():
        try:
            document = _toml.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, _toml.TOMLDecodeError) as exc:
            raise EnrolmentError(f"--config: cannot read {path}: {exc}") from None
    if state_dir is not None:
        document.setdefault("agent", {})["state_dir"] = state_dir
    credentials = AgentCredentials(
        agent_id=grant["agent"],
        prefix=grant["prefix"],
        urls=tuple(str(u) for u in grant["urls"]),
        username=grant["username"],
        password=grant["password"],
        ca_file=CA_FILE,
        coordinator_keys=tuple(str(k) for k in grant["coordinator_keys"]),
    )
    text = credentials.toml(
        header=f"Enrolled as {grant['agent']!r} by 'ember-agent enroll' (keep this file private).",
        document=document,
    )
    parse_config(text, env={}, source=path)  # never write a configuration the agent refuses
    ca = path.parent / CA_FILE
    write_atomic(ca, grant["ca"].encode(), 0o644)
    write_atomic(path, text.encode(), 0o600)
    return Enrolled(grant["agent"], path, ca)

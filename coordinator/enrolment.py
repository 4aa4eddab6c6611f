"""The coordinator's side of enrolment by one-time token (:mod:`agent.protocol.enrolment`).

``ember agents token`` asks :meth:`Enrolment.make_token` for a token; it is kept in SQLite with
its expiry. An :class:`~agent.protocol.enrolment.EnrolRequest` on ``<prefix>/enrol/requests``
is answered on the requester's reply topic: refused with a reason (unknown, wrong, spent or
expired token, a token made for another agent id, an agent id that already has a login), or
granted. A grant spends the token (atomically: of two requests with one token one wins), adds
the agent's login and ACL to the broker kit (:mod:`coordinator.brokerkit`), sends mosquitto a
SIGHUP through the pid file so it re-reads both, and seals the login, the broker URL, the CA
and the coordinator's public key with the token.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.protocol.enrolment import EnrolReply, EnrolRequest, Token
from agent.protocol.errors import ProtocolError
from agent.protocol.messages import decode_message
from agent.protocol.topics import Topics
from agent.tasks import cancel_and_wait
from agent.transport import NotConnectedError, Subscription, Transport
from coordinator.brokerkit import ENROL_USER, BrokerKit, KitError
from coordinator.brokerkit.kit import kit_lock
from coordinator.store import EnrolmentToken, Store

log = structlog.get_logger("ember.enrolment")

MAX_TTL = 30 * 86400.0


class Refused(Exception):
    """An enrolment request that gets a reason instead of a login."""


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


class Enrolment:
    """Hands out broker logins for one-time tokens (the kit in ``kit_dir`` is the truth)."""

    def __init__(
        self,
        *,
        transport: Transport,
        topics: Topics,
        store: Store,
        kit_dir: Path,
        coordinator_keys: Sequence[str],
        pid_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.store = store
        self.kit_dir = kit_dir
        self.coordinator_keys = tuple(coordinator_keys)
        self.pid_file = pid_file
        self.clock = clock
        self._lock = asyncio.Lock()
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        kit = await asyncio.to_thread(BrokerKit.load, self.kit_dir)
        if kit.settings.prefix != self.topics.prefix:
            raise KitError(
                f"{self.kit_dir}: the kit is for prefix {kit.settings.prefix!r}, "
                f"the coordinator uses {self.topics.prefix!r}"
            )
        self._sub = await self.transport.subscribe(self.topics.enrol_requests(), qos=1)
        self._task = asyncio.create_task(self._serve(self._sub), name="enrolment")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._sub is not None:
            await self._sub.close()

    async def make_token(
        self, ttl: float, *, agent: str | None = None, aggregator: bool = False
    ) -> dict[str, Any]:
        """A new token and the command that enrols a device with it."""
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl: between 1 second and {MAX_TTL / 86400:g} days, got {ttl:g}")
        kit = await asyncio.to_thread(BrokerKit.load, self.kit_dir)
        token = Token.new()
        now = self.clock()
        record = EnrolmentToken(
            token.id, token.secret, expires_at=now + ttl, created_at=now, agent=agent,
            aggregator=aggregator,
        )  # fmt: skip
        await self.store.add_token(record)
        url = kit.settings.url()
        scheme, rest = url.split("://", 1)
        enrol_url = f"{scheme}://{ENROL_USER}:{kit.enrol_password}@{rest}"
        command = f"ember-agent enroll --coordinator {enrol_url} --token {token}"
        if self.topics.prefix != "ember/v1":
            command += f" --prefix {self.topics.prefix}"
        if agent:
            command += f" --id {agent}"
        log.info("enrolment_token_made", token=token.id, expires=_when(record.expires_at))
        return {
            "token": str(token),
            "id": token.id,
            "expires_at": record.expires_at,
            "agent": agent,
            "aggregator": aggregator,
            "url": enrol_url,
            "command": command,
        }

    async def _serve(self, sub: Subscription) -> None:
        async for message in sub:
            try:
                await self.handle(message.payload)
            except Exception:  # a bug here must not end enrolment
                log.exception("enrolment_failed")

    async def handle(self, payload: bytes | bytearray | memoryview) -> EnrolReply | None:
        """Answer one request (published on its reply topic, and returned)."""
        try:
            request = decode_message(payload, expect=EnrolRequest)
        except ProtocolError as exc:
            log.warning("enrolment_rejected", reason=str(exc))
            return None
        try:
            async with self._lock:
                reply = await self._grant(request)
        except Refused as exc:
            log.warning(
                "enrolment_refused", agent=request.agent, token=request.token, reason=str(exc)
            )
            reply = EnrolReply(request=request.id, ok=False, reason=str(exc))
        try:
            await self.transport.publish(
                self.topics.enrol_replies(request.client), reply.to_msgpack(), timeout=30
            )
        except NotConnectedError as exc:
            log.warning("enrolment_reply_failed", agent=request.agent, error=str(exc))
        return reply

    async def _grant(self, request: EnrolRequest) -> EnrolReply:
        record = await self.store.token(request.token)
        if record is None:
            raise Refused("unknown enrolment token (make one with 'ember agents token')")
        token = Token(record.id, record.secret)
        if not request.proves(token):
            raise Refused("wrong enrolment token: its secret does not match")
        now = self.clock()
        if record.used_at is not None:
            raise Refused(
                f"enrolment token already used by {record.used_by} at {_when(record.used_at)}"
            )
        if record.expires_at <= now:
            raise Refused(f"enrolment token expired at {_when(record.expires_at)}")
        if record.agent and record.agent != request.agent:
            raise Refused(f"this enrolment token is for agent {record.agent!r} only")
        kit = await asyncio.to_thread(BrokerKit.load, self.kit_dir)
        if request.agent in kit.accounts:
            raise Refused(f"agent id {request.agent!r} already has a broker login")
        if not await self.store.spend_token(record.id, request.agent, now):
            raise Refused("enrolment token already used or expired")

        def add() -> tuple[BrokerKit, str]:
            with kit_lock(self.kit_dir):  # against a concurrent 'ember broker config'
                fresh = BrokerKit.load(self.kit_dir)
                try:
                    password = fresh.add_account(
                        request.agent,
                        "agent",
                        aggregator=record.aggregator,
                        coordinator_keys=self.coordinator_keys,
                    )
                except KitError as exc:
                    raise Refused(str(exc)) from None
                if password is None:
                    raise Refused(f"agent id {request.agent!r} already has a broker login")
                fresh.save()
                return fresh, password

        kit, password = await asyncio.to_thread(add)
        pid = await asyncio.to_thread(kit.reload_broker, self.pid_file)
        if pid is None:
            log.warning(
                "broker_not_reloaded",
                reason=f"no running mosquitto named by {self.pid_file or kit.pid_file}; "
                "reload it yourself (kill -HUP) before the agent can log in",
            )
        ca = await asyncio.to_thread((self.kit_dir / "ca.crt").read_text)
        grant = {
            "agent": request.agent,
            "username": request.agent,
            "password": password,
            "urls": [kit.settings.url()],
            "prefix": kit.settings.prefix,
            "ca": ca,
            "coordinator_keys": list(self.coordinator_keys),
            "aggregator": record.aggregator,
        }
        log.info("agent_enrolled", agent=request.agent, token=record.id, broker_reloaded=pid)
        return EnrolReply(request=request.id, ok=True, sealed=token.seal(request.id, grant))

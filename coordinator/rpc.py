"""Request/response between the ``ember`` CLI and ``ember serve``, over plain MQTT.

MQTT 5 has request/response built in (the Response Topic and Correlation Data properties); MQTT
3.1.1 does not, and the embedded pure-Python broker speaks only 3.1.1. So the same pattern is
carried in the payload (:class:`~agent.protocol.messages.RpcRequest`): a client subscribes to
its own reply topic ``coordinator/rpc/replies/<client>``, sends a request naming that topic in
``reply_to`` to ``coordinator/rpc/requests``, and matches the answer by ``correlation_id`` (the
request's ``id``). It works the same on every broker.

The server answers only on reply topics (never on an arbitrary topic a request names), runs
each request in its own task, and remembers recent answers by reply topic and request id so a
redelivered QoS 1 request gets the same answer instead of running twice (and nobody else's
answer). Whoever can publish on the requests topic is bounded too (broker ACLs decide who that
is): requests above :data:`MAX_REQUEST_BYTES` are refused unread, at most
:data:`MAX_CONCURRENT` are answered at once and :data:`RATE` a second on average; each refusal
is logged with its reason and counted in :attr:`RpcServer.refused`.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import MiB, ProtocolLimits
from agent.protocol.messages import RpcRequest, RpcResponse, decode_message
from agent.protocol.topics import Topics, check_segment
from agent.ratelimit import TokenBucket
from agent.tasks import cancel_and_wait
from agent.transport import Inbound, NotConnectedError, Subscription, Transport
from coordinator.spec import SpecError

log = structlog.get_logger("ember.rpc")

DEFAULT_TIMEOUT = 5.0
MAX_ERROR = 4096
MAX_REQUEST_BYTES = 256 * MiB
"""A job submission carries the model's artifacts; nothing else comes close."""
RPC_LIMITS = ProtocolLimits(max_message_bytes=MAX_REQUEST_BYTES, max_collection_length=10_000)
MAX_CONCURRENT = 32
"""Requests being answered at once; more are refused until some finish."""
RATE = 100.0
"""Requests a second on average, in bursts of up to :data:`BURST`."""
BURST = 400.0


class RpcError(Exception):
    """The coordinator answered with an error; ``str(error)`` is its one-line message."""


class CoordinatorNotRunning(RpcError):
    """No answer came within the timeout."""


Handler = Callable[[Mapping[str, Any], RpcRequest], Awaitable[Any]]


class RpcServer:
    """Answers requests on ``coordinator/rpc/requests`` with registered handlers."""

    def __init__(self, transport: Transport, topics: Topics, *, remember: int = 512) -> None:
        self.transport = transport
        self.topics = topics
        self._handlers: dict[str, Handler] = {}
        self._answers: OrderedDict[tuple[str, str], RpcResponse] = OrderedDict()
        self._running: dict[tuple[str, str], asyncio.Task[RpcResponse]] = {}
        self._remember = remember
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reply_prefix = topics.rpc_replies("x")[:-1]
        self._bucket = TokenBucket(RATE, BURST)
        self.refused = 0
        """Requests refused: malformed, too large, a bad reply topic, over the rate or the
        concurrency bound."""

    def register(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    @property
    def methods(self) -> list[str]:
        return sorted(self._handlers)

    async def start(self) -> None:
        self._sub = await self.transport.subscribe(self.topics.rpc_requests(), 1)
        self._task = asyncio.create_task(self._serve(self._sub), name="rpc-server")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        await cancel_and_wait(self._tasks)
        if self._sub is not None:
            await self._sub.close()
            self._sub = None

    async def _serve(self, sub: Subscription) -> None:
        async for message in sub:
            if len(self._tasks) >= MAX_CONCURRENT:
                self._refuse(f"{MAX_CONCURRENT} requests are being answered already")
                continue
            if not self._bucket.take():
                self._refuse(f"more than {RATE:g} requests a second")
                continue
            task = asyncio.create_task(self._handle(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _reply_topic_ok(self, topic: str) -> bool:
        if not topic.startswith(self._reply_prefix):
            return False
        try:
            check_segment(topic[len(self._reply_prefix) :], "client id")
        except ValueError:
            return False
        return True

    def _refuse(self, reason: str, **fields: Any) -> None:
        self.refused += 1
        log.warning("rpc_request_refused", reason=reason, **fields)

    async def _handle(self, message: Inbound) -> None:
        try:
            request = decode_message(message.payload, expect=RpcRequest, limits=RPC_LIMITS)
        except ProtocolError as exc:
            self._refuse(str(exc))
            return
        if not self._reply_topic_ok(request.reply_to):
            self._refuse(f"reply_to {request.reply_to[:200]!r} is not a reply topic", id=request.id)
            return
        key = (request.reply_to, request.id)
        response = self._answers.get(key)
        if response is None:
            running = self._running.get(key)
            if running is None:  # not a redelivery of a request being answered right now
                running = asyncio.ensure_future(self._answer(request))
                self._running[key] = running
                running.add_done_callback(lambda _: self._running.pop(key, None))
            response = await running
            self._answers[key] = response
            while len(self._answers) > self._remember:
                self._answers.popitem(last=False)
        if not response.ok:
            log.info("rpc_request_failed", method=request.method[:128], reason=response.error)
        try:
            await self.transport.publish(request.reply_to, response.to_msgpack(), qos=1, timeout=30)
        except NotConnectedError as exc:
            log.warning("rpc_reply_failed", method=request.method, error=str(exc))

    async def _answer(self, request: RpcRequest) -> RpcResponse:
        handler = self._handlers.get(request.method)
        if handler is None:
            return self._error(request, f"unknown method {request.method!r}")
        try:
            result = await handler(request.params, request)
        except (RpcError, SpecError, ValueError, LookupError) as exc:
            return self._error(request, str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("rpc_handler_failed", method=request.method)
            return self._error(request, f"internal error in {request.method}: {exc}")
        log.debug("rpc_answered", method=request.method, id=request.id)
        return RpcResponse(correlation_id=request.id, ok=True, result=result)

    @staticmethod
    def _error(request: RpcRequest, text: str) -> RpcResponse:
        line = " ".join(text.split())[:MAX_ERROR]
        return RpcResponse(correlation_id=request.id, ok=False, error=line)


class RpcClient:
    """Sends requests to the coordinator and waits for the matching answers."""

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        *,
        broker: str = "",
        client_id: str | None = None,
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.broker = broker or ", ".join(transport.config.urls)
        self.client_id = client_id or f"cli-{secrets.token_hex(8)}"
        self.reply_to = topics.rpc_replies(self.client_id)
        self._pending: dict[str, asyncio.Future[RpcResponse]] = {}
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RpcClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self.transport.subscribe(self.reply_to, 1)
            self._task = asyncio.create_task(self._receive(self._sub), name="rpc-client")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        if self._sub is not None:
            await self._sub.close()
            self._sub = None

    async def _receive(self, sub: Subscription) -> None:
        async for message in sub:
            try:
                response = decode_message(message.payload, expect=RpcResponse)
            except ProtocolError as exc:
                log.warning("rpc_response_invalid", reason=str(exc))
                continue
            future = self._pending.get(response.correlation_id)
            if future is not None and not future.done():
                future.set_result(response)

    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Send one request and return the result; :class:`RpcError` carries the coordinator's
        error, :class:`CoordinatorNotRunning` says nobody answered within ``timeout``."""
        await self.start()
        request = RpcRequest(method=method, reply_to=self.reply_to, params=dict(params or {}))
        future: asyncio.Future[RpcResponse] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            try:
                await self.transport.publish(
                    self.topics.rpc_requests(), request.to_msgpack(), qos=1, timeout=timeout
                )
                response = await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, NotConnectedError):
                raise CoordinatorNotRunning(
                    f"no answer from the coordinator on {self.broker} within {timeout:g} s "
                    "— is 'ember serve' running?"
                ) from None
        finally:
            self._pending.pop(request.id, None)
        if not response.ok:
            raise RpcError(response.error or f"{method} failed")
        return response.result

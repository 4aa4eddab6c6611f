"""Request/response between the ``ember`` CLI and ``ember serve``, over plain MQTT.

MQTT 5 has request/response built in (the Response Topic and Correlation Data properties); MQTT
3.1.1 does not, and the embedded pure-Python broker speaks only 3.1.1. So the same pattern is
carried in the payload (:class:`~agent.protocol.messages.RpcRequest`): a client subscribes to
its own reply topic ``coordinator/rpc/replies/<client>``, sends a request naming that topic in
``reply_to`` to ``coordinator/rpc/requests``, and matches the answer by ``correlation_id`` (the
request's ``id``). It works the same on every broker.

The server answers only on reply topics (never on an arbitrary topic a request names), runs
each request in its own task, and remembers recent answers by request id so a redelivered
QoS 1 request gets the same answer instead of running twice.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from agent.protocol.errors import ProtocolError
from agent.protocol.messages import RpcRequest, RpcResponse, decode_message
from agent.protocol.topics import Topics, check_segment
from agent.tasks import cancel_and_wait
from agent.transport import Inbound, NotConnectedError, Subscription, Transport
from coordinator.spec import SpecError

log = structlog.get_logger("ember.rpc")

DEFAULT_TIMEOUT = 5.0
MAX_ERROR = 4096


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
        self._answers: OrderedDict[str, RpcResponse] = OrderedDict()
        self._running: dict[str, asyncio.Task[RpcResponse]] = {}
        self._remember = remember
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reply_prefix = topics.rpc_replies("x")[:-1]

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

    async def _handle(self, message: Inbound) -> None:
        try:
            request = decode_message(message.payload, expect=RpcRequest)
        except ProtocolError as exc:
            log.warning("rpc_request_invalid", reason=str(exc))
            return
        if not self._reply_topic_ok(request.reply_to):
            log.warning("rpc_reply_topic_refused", reply_to=request.reply_to, id=request.id)
            return
        response = self._answers.get(request.id)
        if response is None:
            running = self._running.get(request.id)
            if running is None:  # not a redelivery of a request being answered right now
                running = asyncio.ensure_future(self._answer(request))
                self._running[request.id] = running
                running.add_done_callback(lambda _: self._running.pop(request.id, None))
            response = await running
            self._answers[request.id] = response
            while len(self._answers) > self._remember:
                self._answers.popitem(last=False)
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

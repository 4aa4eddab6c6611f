"""An in-process MQTT broker for `ember demo` and one-machine trials, so nothing needs installing.

It wraps amqtt (pure Python, MQTT 3.1.1 only: it refuses MQTT 5 with "unsupported protocol
version", which the transport handles by falling back). Production fleets use mosquitto or a
clustered broker; this one exists so the quick start is one command.
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator.mosquitto import free_port


class EmbeddedBroker:
    """amqtt listening on one loopback TCP port, anonymous, retained messages kept in memory."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> str:
        """Start listening; returns the broker URL."""
        from amqtt.broker import Broker  # the demo extra; not needed by the coordinator itself

        # amqtt logs every refused MQTT 5 attempt and every client at INFO/ERROR: keep it quiet.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").addFilter(_amqtt_accept_race)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        if not self.port:
            self.port = free_port(self.host)
        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await self._broker.start()
        return self.url

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _amqtt_accept_race(record: logging.LogRecord) -> bool:
    """Drop amqtt's "dictionary changed size during iteration" on simultaneous connects: an
    amqtt bug in its accept callback, after which the client simply connects again."""
    return not (
        record.getMessage().startswith("Unhandled exception in client_connected_cb")
        and "dictionary changed size" in str(record.exc_info[1] if record.exc_info else "")
    )

"""The dashboard's HTTP server: the page's fixed set of files and its ``config.json``.

Nothing but those names is served (no file system paths come from a request). Every answer
carries a Content-Security-Policy that lets the page load only its own scripts and styles and
open WebSocket connections (the broker may be on another host), so data from the broker can
never become code in the page.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import structlog

from agent import __version__
from agent.transport import BrokerEndpoint

log = structlog.get_logger("ember.dashboard")

DEFAULT_WS_PORT = 9001
"""The port mosquitto's documentation and ``ember broker config`` use for WebSockets."""

FILES = {
    "/": "index.html",
    "/index.html": "index.html",
    "/app.js": "app.js",
    "/mqtt-ws.js": "mqtt-ws.js",
    "/dashboard.css": "dashboard.css",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; form-action 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def default_ws_url(broker: str) -> str:
    """The broker's WebSockets URL guessed from its MQTT URL: same host, port 9001,
    ``wss://`` for ``mqtts://``."""
    endpoint = BrokerEndpoint.parse(broker)
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{'wss' if endpoint.tls else 'ws'}://{host}:{DEFAULT_WS_PORT}"


def check_ws_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{url!r}: a WebSocket URL is ws://host:port or wss://host:port")
    if parts.username or parts.password:
        raise ValueError(f"{url!r}: credentials do not belong in a URL the page is given")
    return url


@dataclass(frozen=True)
class DashboardConfig:
    """What the page is told: where the broker's WebSockets listener is and the topic prefix.
    Never credentials: the browser asks the user when the broker wants them."""

    ws_url: str
    prefix: str

    def to_json(self) -> bytes:
        body = {"ws_url": self.ws_url, "prefix": self.prefix, "version": __version__}
        return json.dumps(body).encode()


def static_files() -> dict[str, bytes]:
    folder = resources.files(__package__) / "static"
    return {name: (folder / name).read_bytes() for name in set(FILES.values())}


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "ember-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/config.json":
            self._send(HTTPStatus.OK, "application/json", self.server.config.to_json(), body)
        elif path in FILES:
            name = FILES[path]
            kind = TYPES[name[name.rfind(".") :]]
            self._send(HTTPStatus.OK, kind, self.server.files[name], body)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", body)

    def _send(self, status: HTTPStatus, kind: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard_request", client=self.client_address[0], request=format % args)


class DashboardServer(ThreadingHTTPServer):
    """Serves the dashboard page on ``host:port`` (loopback unless told otherwise)."""

    daemon_threads = True

    def __init__(self, config: DashboardConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        check_ws_url(config.ws_url)
        self.config = config
        self.files = static_files()
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{f'[{name}]' if ':' in name else name}:{port}/"

    def start(self) -> DashboardServer:
        """Serve from a background thread (for tests and embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(5)

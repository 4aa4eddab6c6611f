"""``ember dashboard``: one static page that watches the fleet from the browser.

The page (``static/``: HTML, CSS and plain JavaScript modules, no build step) connects to the
broker itself over MQTT-over-WebSockets (the WebSocket transport of OASIS MQTT 3.1.1, section 6)
with a small subscribe-only client of its own (``static/mqtt-ws.js``), and shows what
``ember top`` shows plus every job's accuracy curve. This package only serves those files and a
``config.json`` naming the broker's WebSocket URL and the topic prefix, with the standard
library's HTTP server.
"""

from coordinator.dashboard.server import DashboardConfig, DashboardServer, default_ws_url

__all__ = ["DashboardConfig", "DashboardServer", "default_ws_url"]

"""sd_notify(3): tell systemd the agent is ready, alive (watchdog) and stopping.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named in
``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract namespace). That is a dozen lines,
so it is written here by hand rather than adding a dependency (python-systemd needs libsystemd
headers to build, sdnotify is unmaintained) to a package that must install on every device.

Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a no-op. A send never blocks
the event loop: the socket is non-blocking and a full queue drops the message with a log line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("ember.notify")


class Notifier:
    """A connection to systemd's notification socket (sd_notify(3) protocol)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *assignments: str) -> bool:
        """Send ``READY=1``, ``WATCHDOG=1``, ``STATUS=...`` (several form one datagram).
        Returns whether the datagram went out."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(assignments).encode(), target)
        except OSError as exc:
            log.warning("sd_notify_failed", socket=self.address, error=str(exc))
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)),
    or ``None`` when the service has no watchdog or ``$WATCHDOG_PID`` names another process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6

"""Advertise the agent on the local network with DNS-SD over multicast DNS (RFC 6763, RFC 6762).

Service type ``_ember-agent._tcp.local.``, one instance per agent named by its id. The TXT
record follows RFC 6763 §6: short keys, ``txtvers`` first, every ``key=value`` entry at most
255 bytes (a longer value is cut at a UTF-8 boundary; the dataset list is cut at a name and
ends with ``+N`` saying how many names did not fit). Keys:

``txtvers``  TXT format version (1)
``id``       agent id
``v``        agent version
``arch``     machine architecture (``aarch64``, ``x86_64``)
``ds``       dataset names, comma-separated
``info``     the MQTT topic of the agent's retained capabilities document
``prefix``   the topic prefix the agent speaks under

The agent listens on no port of its own (everything goes through the MQTT broker), so the SRV
record carries port 0; a browser reads the TXT record and subscribes to ``info``.
Registration (mDNS probing takes about a second) runs in the background and never delays the
agent; a network that refuses multicast costs a warning, not the daemon.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence

import psutil
import structlog
from zeroconf import InterfaceChoice, IPVersion, NonUniqueNameException
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

log = structlog.get_logger("ember.discovery")

SERVICE_TYPE = "_ember-agent._tcp.local."
TXT_ENTRY_MAX = 255
_INSTANCE_MAX = 63


def fit(key: str, value: str, limit: int = TXT_ENTRY_MAX) -> str:
    """``value`` cut so that ``key=value`` is at most ``limit`` UTF-8 bytes."""
    room = limit - len(key.encode()) - 1
    data = value.encode()
    if len(data) <= room:
        return value
    return data[:room].decode(errors="ignore")


def dataset_list(names: Sequence[str], limit: int = TXT_ENTRY_MAX, key: str = "ds") -> str:
    """Comma-separated names that fit one TXT entry; ``+N`` at the end counts the rest."""
    room = limit - len(key.encode()) - 1
    for keep in range(len(names), -1, -1):
        parts = list(names[:keep])
        if keep < len(names):
            parts.append(f"+{len(names) - keep}")
        text = ",".join(parts)
        if len(text.encode()) <= room:
            return text
    return ""


def txt_record(
    *, agent_id: str, version: str, arch: str, datasets: Sequence[str], info_topic: str, prefix: str
) -> dict[str, str]:
    """The TXT properties, each entry within RFC 6763's 255-byte limit."""
    values = {
        "txtvers": "1",
        "id": agent_id,
        "v": version,
        "arch": arch,
        "ds": dataset_list(datasets),
        "info": info_topic,
        "prefix": prefix,
    }
    return {key: fit(key, value) for key, value in values.items()}


def _host_label(agent_id: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", agent_id.lower()).strip("-")[:50] or "agent"
    return f"ember-{label}"


def advertised_addresses(interfaces: Sequence[str] | None) -> list[str]:
    """The configured interface addresses, or every non-loopback address of this host
    (loopback when there is no other)."""
    if interfaces:
        return list(interfaces)
    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(addr.address.split("%")[0])
            if not (ip.is_loopback or (ip.is_link_local and ip.version == 6)):
                found.append(str(ip))
    return found or ["127.0.0.1"]


class Advertiser:
    """Publishes this agent as a DNS-SD service instance (RFC 6763) over mDNS (RFC 6762)."""

    def __init__(
        self,
        *,
        agent_id: str,
        properties: Mapping[str, str],
        interfaces: Sequence[str] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.properties = dict(properties)
        self.interfaces = tuple(interfaces) if interfaces else None
        self.registered = asyncio.Event()
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    @property
    def instance_name(self) -> str:
        name = self.agent_id.encode()[:_INSTANCE_MAX].decode(errors="ignore")
        return f"{name}.{SERVICE_TYPE}"

    def _ip_version(self) -> IPVersion:
        if not self.interfaces:
            return IPVersion.V4Only
        versions = {ipaddress.ip_address(i).version for i in self.interfaces}
        if versions == {4}:
            return IPVersion.V4Only
        return IPVersion.V6Only if versions == {6} else IPVersion.All

    async def start(self) -> None:
        """Register the service; logs and returns on failure (discovery is a convenience)."""
        addresses = advertised_addresses(self.interfaces)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            self.instance_name,
            port=0,
            properties=self.properties,
            server=f"{_host_label(self.agent_id)}.local.",
            parsed_addresses=addresses,
        )
        try:
            self._zc = AsyncZeroconf(
                interfaces=list(self.interfaces) if self.interfaces else InterfaceChoice.All,
                ip_version=self._ip_version(),
            )
            await self._zc.async_register_service(info, allow_name_change=True)
        except (OSError, NonUniqueNameException, ValueError) as exc:
            log.warning("zeroconf_unavailable", error=str(exc), interfaces=self.interfaces)
            await self.close()
            return
        self._info = info
        self.registered.set()
        log.info(
            "zeroconf_registered", name=info.name, addresses=addresses, interfaces=self.interfaces
        )

    async def close(self) -> None:
        """Send goodbye packets (TTL 0) and close the sockets."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            if self._info is not None:
                await zc.async_unregister_service(self._info)
        except Exception as exc:  # goodbye is best effort; closing must go on
            log.warning("zeroconf_unregister_failed", error=str(exc))
        finally:
            self._info = None
            await zc.async_close()

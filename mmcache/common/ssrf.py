"""The address policy of http(s) image fetches (SSRF): which addresses are public, and an aiohttp
resolver and connector that drop the others, so that the address checked is the one connected to
(DNS is resolved once; ``mmcache.common.http_fetch`` follows redirects hop by hop and checks each).
Shared by the encoders' image fetches and ``mmcache warm``'s.
Tests patch ``address_is_public`` here: every check goes through this module's global."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Union

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

logger = logging.getLogger(__name__)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def address_is_public(ip: IPAddress | str) -> bool:
    """Whether an http(s) image may be fetched from ``ip`` without ``allow_private_urls``.

    Public means globally routable unicast: loopback, RFC 1918, CGNAT (100.64/10), link-local
    (169.254/16, cloud metadata included; fe80::/10), unique-local (fc00::/7), unspecified,
    reserved, documentation and multicast addresses are not, nor is an IPv6 address embedding
    an IPv4 one that is not (``::ffff:a.b.c.d``, 6to4, Teredo, NAT64, IPv4-compatible).
    """
    if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = ipaddress.ip_address(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return address_is_public(ip.ipv4_mapped)  # NOTE: reaches exactly that IPv4 address
    if ip.is_multicast or ip.is_reserved or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        # NOTE: through the module global, so that a test's monkeypatch applies here too.
        return all(v4 is None or address_is_public(v4) for v4 in embedded)
    return True


class AddressRefused(Exception):
    """Raised by ``CheckingResolver`` (inside aiohttp's connector) for a host with no public
    address; the fetch finds it in the exception chain and names the image."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} has no public address")
        self.host = host


def _is_public_text(address: str) -> bool:
    try:
        return address_is_public(ipaddress.ip_address(address))
    except ValueError:  # not an address we can judge: not public
        return False


class CheckingResolver(AbstractResolver):
    """aiohttp's threaded resolver, dropping the addresses ``address_is_public`` refuses.

    aiohttp connects to exactly the addresses its resolver returns (Host and SNI keep the
    name), so the address checked is the one connected to: a name cannot resolve to a public
    address for the check and to a private one for the connection (DNS rebinding). IP-literal
    hosts never reach a resolver; ``_fetch_http`` checks those itself.
    """

    def __init__(self, allow_private_urls: bool = False, inner: AbstractResolver | None = None) -> None:
        self.allow_private_urls = allow_private_urls
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.allow_private_urls:
            return results
        kept = [r for r in results if _is_public_text(r["host"])]
        if not kept:
            raise AddressRefused(host)
        if len(kept) < len(results):
            logger.info("image host %s: dropped its non-public addresses %s", host,
                        sorted({r["host"] for r in results} - {r["host"] for r in kept}))
        return kept

    async def close(self) -> None:
        await self._inner.close()


class CheckingConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` resolving through a ``CheckingResolver`` of a known policy."""

    def __init__(self, allow_private_urls: bool, resolver: AbstractResolver | None = None, **kwargs) -> None:
        super().__init__(resolver=CheckingResolver(allow_private_urls, resolver), **kwargs)
        self.allow_private_urls = allow_private_urls


def literal_address(host: str) -> IPAddress | None:
    """The address an IP-literal ``host`` names; None for a name (left to the resolver).

    NOTE: aiohttp skips its resolver for any host that is all digits and dots or holds a ':'
    (``aiohttp.helpers.is_ip_address``), and the socket layer reads legacy forms such as
    ``127.1``; such a host that no parser here can read is refused as non-public.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host or host.replace(".", "").isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return ipaddress.IPv4Address("0.0.0.0")  # unreadable: judged as unspecified
    return None

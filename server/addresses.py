"""Who is asking: the network address a request came from, as far as this server can tell.

Every decision that must not be one client's to make — rate limits, the share one source
may have in a guardrail — is keyed on the address, never on anything the client writes in
its body (a ``client_id`` is free to rotate). The address is the TCP peer, unless the peer
is a proxy the operator listed as trusted (``POLLINATE_TRUSTED_PROXIES``: addresses or
networks, comma-separated, e.g. ``127.0.0.1,10.0.0.0/8``); then it is the right-most entry
of ``X-Forwarded-For`` that is not itself a trusted proxy (each proxy appends the peer it
saw, so entries left of a hop we trust are only as honest as that hop's client). A direct
caller's ``X-Forwarded-For`` is ignored: with no trusted proxy listed, the header changes
nothing. (uvicorn's own proxy-header handling, which trusts 127.0.0.1 by default, is off:
``server/serving.py``.)

IPv6 addresses are grouped by their /64: one subscriber usually holds a whole /64, so a
client rotating through it would otherwise be a new source each time.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from functools import lru_cache

from core.errors import InvalidInput

ENV_TRUSTED_PROXIES = "POLLINATE_TRUSTED_PROXIES"
IPV6_GROUP = 64  # prefix length one IPv6 source stands for

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """The trusted proxies as normalised network strings ("127.0.0.1/32", "10.0.0.0/8"), or
    InvalidInput naming the entry that is not an address or a network."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            out.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise InvalidInput(f"{ENV_TRUSTED_PROXIES}: {text!r} is not an IP address or network "
                               "(e.g. 127.0.0.1 or 10.0.0.0/8)") from None
    return tuple(dict.fromkeys(out))


_PTON = socket.inet_pton
_NTOP = socket.inet_ntop
_V4 = socket.AF_INET


def _v4(text: str) -> bytes | None:
    """The 4 bytes of a dotted-quad IPv4 address (the usual case: one C call, no Python
    parser), None for anything else."""
    try:
        return _PTON(_V4, text)
    except (OSError, ValueError, TypeError):
        return None


@lru_cache(maxsize=65536)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def source_of(address: str) -> str:
    """The source an address counts as: IPv4 as it is, IPv6 as its /64 ("2001:db8:1:2::/64");
    anything that is not an IP address (a Unix socket, a test client's name) as it is."""
    packed = _v4(address)
    if packed is not None:
        return _NTOP(_V4, packed)  # canonical (no leading zeros)
    return _source_slow(address)


@lru_cache(maxsize=65536)
def _source_slow(address: str) -> str:
    ip = _ip(address)
    if ip is None:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_GROUP}", strict=False))
    return str(ip)


class ClientAddress:
    """``resolve(scope)`` → the source (see ``source_of``) an ASGI request comes from.

    Cheap on the hot POSTs, where every request resolves its address (and a flood brings a
    new address each time): an IPv4 peer or hop is parsed by one C call and checked against
    the trusted IPv4 networks as integers; anything else goes through ``ipaddress``."""

    def __init__(self, trusted: Iterable[str] = ()):
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        # IPv4 networks as (address, mask) integers
        self._v4_networks = tuple((int(n.network_address), int(n.netmask)) for n in self.networks if n.version == 4)
        self._peers: dict[str, bool] = {}  # peer -> trusted: behind a proxy it is the same few again and again

    def trusts(self, address: str) -> bool:
        if not self.networks:
            return False
        packed = _v4(address.strip())
        if packed is not None:
            value = int.from_bytes(packed, "big")
            return any(value & mask == network for network, mask in self._v4_networks)
        return self._trusts_slow(address.strip())

    @lru_cache(maxsize=4096)  # noqa: B019 - a handful of ClientAddress live as long as the process
    def _trusts_slow(self, address: str) -> bool:
        ip = _ip(address)
        if ip is not None and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip is not None and any(ip in network for network in self.networks)

    def peer(self, scope) -> str:
        client = scope.get("client")
        return str(client[0]) if client else ""

    def resolve(self, scope) -> str:
        peer = self.peer(scope)
        if not self.networks:
            return source_of(peer)
        trusted = self._peers.get(peer)
        if trusted is None:
            if len(self._peers) >= 4096:  # many direct callers: a bound on memory, not a cache that matters
                self._peers.clear()
            trusted = self._peers[peer] = self.trusts(peer)
        if trusted:
            forwarded = _forwarded_for(scope.get("headers") or ())
            for hop in reversed(forwarded):
                if not self.trusts(hop):
                    return source_of(hop)
            if forwarded:  # every hop is a proxy we trust: the first one is where it began
                return source_of(forwarded[0])
        return source_of(peer)

    __call__ = resolve


def _forwarded_for(headers) -> list[str]:
    """Every X-Forwarded-For entry, in order, over all such headers (ports and brackets off)."""
    hops: list[str] = []
    for key, value in headers:
        if key == b"x-forwarded-for":
            for part in value.decode("latin-1").split(","):
                hop = part.strip()
                if hop.startswith("[") and "]" in hop:  # [v6]:port
                    hop = hop[1:hop.index("]")]
                elif hop.count(":") == 1:  # v4:port
                    hop = hop.split(":", 1)[0]
                if hop:
                    hops.append(hop)
    return hops

"""Lists of trusted clients, written as addresses or CIDR networks (10.0.0.5, 10.0.0.0/24, ::1/128):
parsed by one rule wherever a setting or an option names them, and matched against a peer by one."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse(values: Iterable[str]) -> tuple[Network, ...]:
    """The networks ``values`` name; ValueError names the first that is neither an address nor a
    network. Host bits are allowed (10.0.0.5/24 is 10.0.0.0/24), as operators write them."""
    parsed = []
    for value in values:
        try:
            parsed.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network (10.0.0.5, 10.0.0.0/24)") from None
    return tuple(parsed)


def contains(networks: Iterable[Network], host: str) -> bool:
    """Whether the peer ``host`` is in one of ``networks``. A dual-stack socket reports an IPv4
    peer as ::ffff:a.b.c.d: it is matched as the IPv4 address it is. Anything unparsable is not."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)

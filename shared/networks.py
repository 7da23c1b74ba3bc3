"""Lists of trusted clients, written as addresses or CIDR networks (10.0.0.5, 10.0.0.0/24, ::1/128):
parsed by one rule wherever a setting or an option names them, and matched against a peer by one."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse(values: Iterable[str]) -> tuple[Network, ...]:
    """The networks ``values`` name; ValueError names the first that is neither an address nor a
    network. Host bits are allowed (10.0.0.5/24 is 10.0.0.0/24), as operators write them."""
    parsed = []
    for value in values:
        if "%" in value:  # fe80::1%eth0: a peer's scope is not compared, so none is taken
            raise ValueError(f"{value!r} names an interface: give an address or network without %scope")
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network (10.0.0.5, 10.0.0.0/24)") from None
        parsed.append(_ipv4_if_mapped(network))
    return tuple(parsed)


def _ipv4_if_mapped(network: Network) -> Network:
    """::ffff:10.0.0.0/120 is 10.0.0.0/24: peers are matched as IPv4, so their networks are too."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(MAPPED) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


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

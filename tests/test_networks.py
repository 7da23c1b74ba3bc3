"""The one rule for lists of trusted clients (the receiver's --allow, api_trusted_proxies)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from shared import networks
from shared.config import Settings


def test_addresses_and_networks_are_parsed_and_bad_ones_named() -> None:
    parsed = networks.parse(["10.0.0.5", "10.1.0.9/16", "::1/128"])
    assert [str(n) for n in parsed] == ["10.0.0.5/32", "10.1.0.0/16", "::1/128"]
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not an IP address or CIDR network"):
        networks.parse(["10.0.0.1", "10.0.0.0/33"])
    # Written as IPv4-mapped IPv6, a network is the IPv4 one it is, as its peers are matched.
    assert [str(n) for n in networks.parse(["::ffff:10.0.0.5", "::ffff:10.0.0.0/120", "::ffff:0:0/96"])] == [
        "10.0.0.5/32", "10.0.0.0/24", "0.0.0.0/0"]
    assert networks.contains(networks.parse(["::ffff:10.0.0.0/120"]), "10.0.0.7")
    with pytest.raises(ValueError, match="'fe80::1%eth0' names an interface"):
        networks.parse(["fe80::1%eth0"])
    with pytest.raises(ValidationError, match="'slurmctld' is not an IP address or CIDR network"):
        Settings(api_trusted_proxies=["slurmctld"])


@pytest.mark.parametrize(("host", "inside"), [
    ("10.0.0.7", True), ("10.0.1.7", False),
    ("::ffff:10.0.0.7", True),  # an IPv4 peer as a dual-stack socket reports it
    ("::ffff:10.0.1.7", False), ("fd00::7", False), ("", False), ("not an address", False),
])
def test_a_peer_is_matched_as_the_address_it_is(host: str, inside: bool) -> None:
    assert networks.contains(networks.parse(["10.0.0.0/24"]), host) is inside


def test_the_api_believes_a_trusted_proxy_behind_a_dual_stack_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    from openacct.api import auth

    monkeypatch.setattr(auth, "get_settings", lambda: Settings(api_trusted_proxies=["127.0.0.2/32"]))
    for host, trusted in [("::ffff:127.0.0.2", True), ("127.0.0.2", True), ("127.0.0.3", False)]:
        request = SimpleNamespace(client=SimpleNamespace(host=host))
        assert auth._from_trusted_proxy(request) is trusted  # type: ignore[arg-type]
    assert auth._from_trusted_proxy(SimpleNamespace(client=None)) is False  # type: ignore[arg-type]

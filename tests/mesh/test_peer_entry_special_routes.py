"""A peer's subnet route into address space the server refuses too (signal_server/routes.py) is refused on the node:
a corrupted server or cache must not route 'this network', the unspecified IPv6 address or IPv4-mapped IPv6
addresses into the mesh."""

from __future__ import annotations

import ipaddress

import pytest

from meshwg.mesh.peer_entry import EntryPolicy


@pytest.mark.parametrize("cidr", ["0.0.0.0/8", "0.0.0.1/32", "::/128", "::ffff:0:0/96", "::ffff:10.0.0.0/104"])
def test_special_space_is_never_a_peer_route(cidr):
    policy = EntryPolicy(mesh_nets=(ipaddress.ip_network("100.64.0.0/10"),))
    assert policy.route_refused(ipaddress.ip_network(cidr)) == "drop_peer_route_special"


def test_ordinary_lan_routes_still_pass():
    policy = EntryPolicy(mesh_nets=(ipaddress.ip_network("100.64.0.0/10"),))
    assert policy.route_refused(ipaddress.ip_network("10.77.0.0/24")) is None
    assert policy.route_refused(ipaddress.ip_network("fd77::/64")) is None

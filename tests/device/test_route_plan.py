"""The route planner (wanted routes vs the kernel's) and the rtnetlink parsing that feeds it."""

from __future__ import annotations

import ipaddress
import socket
import struct

from meshwg.io.oscfg import rtnl
from meshwg.io.oscfg.route_plan import KernelRoute, RoutePlan, plan

OURS, ETH, DUMMY = 7, 2, 9


def test_a_missing_route_is_added():
    found = [KernelRoute("10.1.0.2/32", frozenset({OURS}))]
    assert plan(["10.1.0.2/32", "10.1.0.3/32", "fd01::3/128"], found, OURS) == \
        RoutePlan(add=("10.1.0.3/32", "fd01::3/128"))


def test_wanted_prefixes_are_normalised():
    wanted = [ipaddress.ip_network("10.1.0.0/24"), "10.1.0.7/24", "FD01::0/64"]
    assert plan(wanted, [], OURS).add == ("10.1.0.0/24", "fd01::/64")


def test_a_prefix_routed_through_another_interface_is_a_conflict_not_an_add():
    theirs = KernelRoute("10.2.0.0/24", frozenset({DUMMY}))
    assert plan(["10.2.0.0/24", "10.2.1.0/24"], [theirs], OURS) == \
        RoutePlan(add=("10.2.1.0/24",), conflicts=(("10.2.0.0/24", theirs),))


def test_a_blackhole_on_the_prefix_is_a_conflict():
    blackhole = KernelRoute("10.2.0.0/24", frozenset())
    assert plan(["10.2.0.0/24"], [blackhole], OURS) == RoutePlan(conflicts=(("10.2.0.0/24", blackhole),))


def test_ours_beside_another_route_is_present():
    found = [KernelRoute("10.2.0.0/24", frozenset({DUMMY})), KernelRoute("10.2.0.0/24", frozenset({OURS}))]
    assert plan(["10.2.0.0/24"], found, OURS) == RoutePlan()


def test_multipath_through_us_counts_as_ours():
    assert plan(["10.2.0.0/24"], [KernelRoute("10.2.0.0/24", frozenset({ETH, OURS}))], OURS) == RoutePlan()


def test_other_tables_are_ignored():
    found = [KernelRoute("10.3.0.2/32", frozenset({OURS}), table=100),   # ours, but not in main: still missing
             KernelRoute("10.3.0.3/32", frozenset({DUMMY}), table=255)]  # theirs, elsewhere: no conflict
    assert plan(["10.3.0.2/32", "10.3.0.3/32"], found, OURS) == RoutePlan(add=("10.3.0.2/32", "10.3.0.3/32"))


def test_other_interfaces_routes_for_other_prefixes_are_ignored():
    found = [KernelRoute("10.0.0.0/8", frozenset({ETH})),      # broader: longest prefix still picks ours
             KernelRoute("10.4.0.2/32", frozenset({ETH})),     # a host route inside our prefix
             KernelRoute("0.0.0.0/0", frozenset({ETH}))]
    assert plan(["10.4.0.0/24"], found, OURS) == RoutePlan(add=("10.4.0.0/24",))


def test_nothing_wanted_nothing_to_do():
    assert plan([], [KernelRoute("10.0.0.0/8", frozenset({ETH}))], OURS) == RoutePlan()


# ---- rtnetlink bytes --------------------------------------------------------------------------

def _rta(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def _route_msg(kind: int, net: str, oif: int | None = None, table: int = 254, flags: int = 0,
               multipath: tuple = ()) -> bytes:
    n = ipaddress.ip_network(net)
    family = socket.AF_INET if n.version == 4 else socket.AF_INET6
    body = struct.pack("=BBBBBBBBI", family, n.prefixlen, 0, 0, min(table, 252), 3, 0, 1, flags)
    if n.prefixlen:
        body += _rta(rtnl.RTA_DST, n.network_address.packed)
    body += _rta(rtnl.RTA_TABLE, struct.pack("=I", table))
    if oif is not None:
        body += _rta(rtnl.RTA_OIF, struct.pack("=i", oif))
    if multipath:
        body += _rta(rtnl.RTA_MULTIPATH, b"".join(struct.pack("=HBBi", 8, 0, 0, i) for i in multipath))
    return _nlmsg(kind, body)


def _nlmsg(kind: int, body: bytes) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body
    return raw + bytes(-len(raw) % 4)


def test_parse_a_dump():
    data = (_route_msg(rtnl.RTM_NEWROUTE, "10.5.0.0/24", OURS)
            + _route_msg(rtnl.RTM_NEWROUTE, "0.0.0.0/0", ETH)
            + _route_msg(rtnl.RTM_NEWROUTE, "fd05::2/128", OURS, table=1000)
            + _route_msg(rtnl.RTM_NEWROUTE, "fd05::3/128", OURS, flags=rtnl.RTM_F_CLONED)  # a cache entry
            + _route_msg(rtnl.RTM_NEWROUTE, "10.6.0.0/24", multipath=(ETH, DUMMY))
            + _nlmsg(rtnl.NLMSG_DONE, bytes(4)))
    routes, done, code = rtnl.parse_dump(data)
    assert (done, code) == (True, 0)
    assert routes == [KernelRoute("10.5.0.0/24", frozenset({OURS})), KernelRoute("0.0.0.0/0", frozenset({ETH})),
                      KernelRoute("fd05::2/128", frozenset({OURS}), 1000),
                      KernelRoute("10.6.0.0/24", frozenset({ETH, DUMMY}))]


def test_parse_a_refused_dump_and_an_unfinished_one():
    assert rtnl.parse_dump(_nlmsg(rtnl.NLMSG_ERROR, struct.pack("=i", -1) + bytes(16))) == ([], True, 1)
    assert rtnl.parse_dump(_route_msg(rtnl.RTM_NEWROUTE, "10.5.0.0/24", OURS)) == \
        ([KernelRoute("10.5.0.0/24", frozenset({OURS}))], False, 0)


def test_malformed_messages_never_raise():
    good = _route_msg(rtnl.RTM_NEWROUTE, "10.5.0.0/24", OURS)
    for cut in range(len(good)):
        rtnl.parse_dump(good[:cut])
        rtnl.concerns(good[:cut], {"10.5.0.0/24"}, OURS)
    bad_len = struct.pack("=IHHII", 3, rtnl.RTM_NEWROUTE, 0, 0, 0) + good[16:]
    assert rtnl.parse_dump(bad_len) == ([], False, 0)
    wrong_dst = bytearray(good)
    wrong_dst[16 + 1] = 40  # a /40 IPv4 prefix
    assert rtnl.parse_dump(bytes(wrong_dst)) == ([], False, 0)


def test_events_that_concern_us():
    wanted = {"10.5.0.2/32"}
    assert rtnl.concerns(_route_msg(rtnl.RTM_DELROUTE, "10.5.0.2/32", OURS), wanted, OURS)
    assert rtnl.concerns(_route_msg(rtnl.RTM_NEWROUTE, "10.5.0.2/32", DUMMY), wanted, OURS)  # replaced
    assert rtnl.concerns(_route_msg(rtnl.RTM_DELROUTE, "10.9.0.0/24", OURS), wanted, OURS)   # any of ours
    assert not rtnl.concerns(_route_msg(rtnl.RTM_NEWROUTE, "10.9.0.0/24", ETH), wanted, OURS)
    link = struct.pack("=BxHiII", 0, 1, OURS, 0, 0)
    assert rtnl.concerns(_nlmsg(rtnl.RTM_NEWLINK, link), wanted, OURS)
    assert not rtnl.concerns(_nlmsg(rtnl.RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, ETH, 0, 0)), wanted, OURS)

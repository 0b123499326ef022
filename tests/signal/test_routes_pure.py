"""Subnet routes and exit nodes (issue 12), the pure parts: the T_ROUTES parser (protocol.routes_untrusted), what
may never be approved (routes.Policy: default routes, the mesh prefixes, the server's addresses, special ranges),
overlaps with another node's approved route, what an advertisement does to a node's stored routes (invite
auto-approval, decisions that outlive the advertisement), and the control core's side (bad input counted, a
repeated advertisement not written again, refusals logged once per change, entries with routes/exit)."""

from __future__ import annotations

import logging

import pytest

from meshwg.signaling import protocol as P
from signal_server import routes as R
from signal_server.control_core import DIR_CHANGED, AdvertiseRoutes, ControlCore, Log
from signal_server.directory import Directory
from signal_server.store_api import NodeRow

MESH = ("100.64.0.0/10", "fd00:1::/48")
POLICY = R.Policy.make(MESH, ["203.0.113.7", "2001:db8::7", "::ffff:198.51.100.9", "vpn.example.org", "0.0.0.0"])
A, B = bytes([1]) * 32, bytes([2]) * 32


# --- the wire parser


def test_routes_untrusted_canonicalises_deduplicates_sorts_and_drops_junk():
    msg = {"type": P.T_ROUTES, "exit_node": True,
           "routes": ["192.168.1.0/24", "FD12:0::/64", "10.0.0.0/8", "192.168.1.0/24", "192.168.1.1/24", "10.0.0.1",
                      "nonsense/8", 17, None, "x" * 1000 + "/8", ["10.1.0.0/16"], "fd12::/64"]}
    assert P.routes_untrusted(msg) == (("10.0.0.0/8", "192.168.1.0/24", "fd12::/64"), True)
    assert P.routes_untrusted({"type": P.T_ROUTES}) == ((), False)  # nothing advertised
    assert P.routes_untrusted({"type": P.T_ROUTES, "routes": [], "exit_node": False}) == ((), False)


@pytest.mark.parametrize("msg", [{"routes": "10.0.0.0/8"}, {"routes": {"a": 1}}, {"routes": [], "exit_node": 1},
                                 {"routes": [], "exit_node": "yes"}, {"routes": None}, "routes", None])
def test_routes_untrusted_malformed_is_none(msg):
    assert P.routes_untrusted(msg) is None


def test_routes_untrusted_keeps_at_most_64():
    many = [f"10.{i // 256}.{i % 256}.0/24" for i in range(300)]
    got, _ = P.routes_untrusted({"routes": many})
    assert len(got) == 64 and set(got) <= set(many)


# --- what may never be approved


@pytest.mark.parametrize("prefix, words", [
    ("0.0.0.0/0", "default route"), ("::/0", "default route"),
    ("100.64.0.0/10", "covers the mesh prefix 100.64.0.0/10"), ("64.0.0.0/2", "covers the mesh prefix 100.64.0.0/10"),
    ("100.64.5.0/24", "is inside the mesh prefix 100.64.0.0/10"), ("fd00:1:0:5::/64", "inside the mesh prefix fd00:1::/48"),
    ("fd00::/8", "covers the mesh prefix fd00:1::/48"),
    ("203.0.113.0/24", "contains the server's address 203.0.113.7"), ("203.0.113.7/32", "203.0.113.7"),
    ("2001:db8::/32", "contains the server's address 2001:db8::7"),
    ("198.51.100.0/24", "contains the server's address 198.51.100.9"),  # a dual-stack socket's mapped address
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
    ("fe80::/64", "link-local"), ("0.0.0.0/7", "'this network'"), ("ff02::/16", "multicast"),
])
def test_forbidden_routes_say_why(prefix, words):
    reason = POLICY.forbidden(prefix)
    assert reason is not None and words in reason and "\n" not in reason


@pytest.mark.parametrize("prefix", ["192.168.1.0/24", "10.0.0.0/8", "203.0.114.0/24", "fd12:3456::/64", "100.128.0.0/16",
                                    "172.16.0.0/12", R.EXIT])
def test_ordinary_routes_and_exit_are_allowed(prefix):
    assert POLICY.forbidden(prefix) is None


def test_overlap_with_another_nodes_approved_route():
    others = [("office", "192.168.0.0/16"), ("lab", "fd12::/48"), ("gw", R.EXIT)]
    assert R.overlap("192.168.1.0/24", others) == "overlaps office's approved route 192.168.0.0/16"
    assert R.overlap("192.0.0.0/8", others) == "overlaps office's approved route 192.168.0.0/16"  # covering it too
    assert "lab's" in R.overlap("fd12::/64", others)
    assert R.overlap("10.0.0.0/8", others) is None and R.overlap(R.EXIT, others) is None  # any number of exit nodes


def test_parse_route_names_the_value():
    assert R.parse_route("192.168.1.0/24") == "192.168.1.0/24" and R.parse_route(" EXIT ") == R.EXIT
    assert R.parse_route("FD12::/64") == "fd12::/64"
    with pytest.raises(ValueError, match=r"bad CIDR '192\.168\.1\.1/24'.*192\.168\.1\.0/24"):
        R.parse_route("192.168.1.1/24")
    with pytest.raises(ValueError, match="bad CIDR 'home-lan'"):
        R.parse_route("home-lan")


# --- an advertisement and the stored decisions


def plan(prefixes, exit_node=False, current=None, auto=None, others=()):
    return R.plan_advertisement(prefixes, exit_node, current or {}, auto, list(others), POLICY.forbidden)


def test_new_routes_are_pending_unless_the_invite_approves_them():
    p = plan(["192.168.1.0/24", "10.9.0.0/16"], exit_node=True)
    assert p.rows == {"192.168.1.0/24": (True, None), "10.9.0.0/16": (True, None), R.EXIT: (True, None)}
    assert p.pending == ("192.168.1.0/24", "10.9.0.0/16", R.EXIT) and not p.refused and not p.auto_approved
    p = plan(["192.168.1.0/24", "10.9.0.0/16"], exit_node=True, auto=("192.168.0.0/16", R.EXIT))
    assert p.rows == {"192.168.1.0/24": (True, True), "10.9.0.0/16": (True, None), R.EXIT: (True, True)}
    assert p.auto_approved == ("192.168.1.0/24", R.EXIT) and p.pending == ("10.9.0.0/16",)


def test_the_invite_does_not_approve_forbidden_or_overlapping_routes():
    p = plan(["192.168.1.0/24", "0.0.0.0/0", "100.64.0.0/12"], auto=("0.0.0.0/1", "128.0.0.0/1", "100.64.0.0/10"),
             others=[("office", "192.168.0.0/16")])
    assert p.rows == {"192.168.1.0/24": (True, None), "0.0.0.0/0": (True, None), "100.64.0.0/12": (True, None)}
    assert dict(p.refused) == {"192.168.1.0/24": "overlaps office's approved route 192.168.0.0/16",
                               "0.0.0.0/0": "a default route (advertise an exit node instead)",
                               "100.64.0.0/12": "is inside the mesh prefix 100.64.0.0/10"}
    assert not p.auto_approved and not p.pending


def test_decisions_outlive_the_advertisement_and_pending_routes_do_not():
    current = {"192.168.1.0/24": True, "10.0.0.0/8": False, "172.16.0.0/12": None, R.EXIT: True}
    p = plan(["10.0.0.0/8"], auto=("10.0.0.0/8",), current=current)
    # still advertised: the rejection stands (the invite does not undo it); gone: decisions kept, pending dropped
    assert p.rows == {"10.0.0.0/8": (True, False), "192.168.1.0/24": (False, True), R.EXIT: (False, True)}
    back = plan(["192.168.1.0/24"], exit_node=True, current={p_: d for p_, (_, d) in p.rows.items()})
    assert back.rows["192.168.1.0/24"] == (True, True) and back.rows[R.EXIT] == (True, True) and not back.pending


def test_visible_keeps_what_the_policy_allows():
    assert R.visible(["fd12::/64", "192.168.1.0/24", "10.0.0.0/8", R.EXIT, "0.0.0.0/0"], POLICY.forbidden) == (
        ("10.0.0.0/8", "192.168.1.0/24", "fd12::/64"), True)
    assert R.state_text(False, True) == "approved (not advertised)" and R.state_text(True, None) == "pending"


# --- the control core


def row(node_id, key, routes=(), is_exit=False, name=None):
    return NodeRow(node_id, key, name or f"n{node_id}", f"100.64.0.{node_id}", f"fd00:1::{node_id}", 0.0, None, None,
                   None, "", routes=tuple(routes), is_exit=is_exit)


def core_with_two_nodes():
    d = Directory(mesh_nets=MESH)
    core = ControlCore(d, connected={A: 1, B: 1})
    core.apply_row(A, row(1, A, name="home"), 0.0)
    core.apply_row(B, row(2, B), 0.0)
    d.subscribe(B)
    return core, d


def entries(d, sub):
    ups, _ = d.take_pending(sub)
    return {e["key"]: e for e in map(P.unpack_entry_untrusted, ups)}


def test_a_routes_message_becomes_one_store_write_per_change_and_junk_is_counted():
    core, _ = core_with_two_nodes()
    m = {"type": P.T_ROUTES, "routes": ["192.168.1.0/24", "junk", 5], "exit_node": False}
    assert core.on_message(A, m, 0.0) == [AdvertiseRoutes(A, ("192.168.1.0/24",), False)]
    assert core.counters["control_routes_dropped"] == 2
    assert core.on_message(A, dict(m), 1.0) == []  # the same again (a reconnect repeats it): nothing to write
    assert core.on_message(A, {"type": P.T_ROUTES, "routes": [], "exit_node": True}, 2.0) == [
        AdvertiseRoutes(A, (), True)]
    assert core.on_message(A, {"type": P.T_ROUTES, "routes": "10.0.0.0/8"}, 3.0) == []
    assert core.counters["control_bad_routes"] == 1


def test_routes_recorded_updates_the_entry_and_logs_refusals_once_per_change():
    core, d = core_with_two_nodes()
    entries(d, B)
    p = plan(["192.168.1.0/24", "0.0.0.0/0", "10.9.0.0/16"], auto=("192.168.0.0/16",))
    effects = core.routes_recorded(A, row(1, A, ["192.168.1.0/24"], name="home"), p, 0.0)
    assert DIR_CHANGED in effects
    logs = [e for e in effects if isinstance(e, Log)]
    texts = "\n".join(e.text for e in logs)
    assert "route 192.168.1.0/24 approved by its invite" in texts
    assert "route 0.0.0.0/0 refused: a default route" in texts
    assert "advertises 10.9.0.0/16, pending approval (meshwg-signal routes approve home 10.9.0.0/16)" in texts
    assert any(e.level == logging.WARNING for e in logs)
    e = entries(d, B)[A]
    assert e["routes"] == ["192.168.1.0/24"] and "exit" not in e
    # the same advertisement again (the store now has the invite's approval): nothing new to say
    p2 = plan(["192.168.1.0/24", "0.0.0.0/0", "10.9.0.0/16"], auto=("192.168.0.0/16",),
              current={k: d_ for k, (_, d_) in p.rows.items()})
    assert not p2.auto_approved
    again = core.routes_recorded(A, row(1, A, ["192.168.1.0/24"], name="home"), p2, 1.0)
    assert not [x for x in again if isinstance(x, Log)] and not d.has_pending(B)
    # an exit node approved, the route withdrawn: the entry follows
    core.routes_recorded(A, row(1, A, [], is_exit=True, name="home"), R.Plan({}), 2.0)
    e = entries(d, B)[A]
    assert e["exit"] is True and "routes" not in e


def test_the_directory_never_carries_a_forbidden_route_even_if_stored_approved():
    core, d = core_with_two_nodes()
    entries(d, B)
    core.apply_row(A, row(1, A, ["192.168.1.0/24", "203.0.113.0/24", "100.64.0.0/16"]), 0.0)
    assert entries(d, B)[A]["routes"] == ["192.168.1.0/24", "203.0.113.0/24"]
    # the server learns it is reached at 203.0.113.7: that route leaves every entry
    assert core.set_server_ips(["203.0.113.7"]) == [DIR_CHANGED]
    assert entries(d, B)[A]["routes"] == ["192.168.1.0/24"]
    assert core.set_server_ips(["203.0.113.7"]) == []


def test_a_new_session_gets_routes_in_its_snapshot():
    core, d = core_with_two_nodes()
    core.apply_row(A, row(1, A, ["192.168.1.0/24"], is_exit=True), 0.0)
    snap = {e["key"]: e for e in map(P.unpack_entry_untrusted, d.subscribe(B))}
    assert snap[A]["routes"] == ["192.168.1.0/24"] and snap[A]["exit"] is True
    assert "routes" not in snap.get(B, {})

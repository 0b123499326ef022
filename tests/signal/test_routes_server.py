"""Subnet routes and exit nodes on a running server (issue 12 items 3 and 4): a node's T_ROUTES advertisement is
pending until approved (as `meshwg-signal routes approve` does it, on the database from another connection), then
in every other node's directory entry for it within 1 s; it leaves as fast when the node stops advertising it or
the approval is taken back; an exit node's entry says "exit": true; an invite created with auto-approve routes
approves at once. The CLI round trip: routes list/approve/reject, invite create --auto-approve-routes, plain
configs with the approved routes and --exit-node, and one-line errors naming the value (exit 2, nothing changed)."""

from __future__ import annotations

import ipaddress
import time

import pytest
from plain_helpers import recording_node
from sig_helpers import harness, start_server, wait_until  # noqa: F401 (fixture)
from test_plain_cli import run_cli

from meshwg.config import wgquick
from meshwg.signaling import protocol as P
from signal_server import admin

LAN = "192.168.50.0/24"


async def advertise(node, routes=(), exit_node=False) -> None:
    await node.conn.send({"type": P.T_ROUTES, "routes": list(routes), "exit_node": exit_node})


def routes_in(watcher, node) -> tuple:
    """(routes, exit) of `node`'s entry in `watcher`'s directory, as the server sent it."""
    e = watcher.entries.get(node.key, {})
    return tuple(e.get("routes", ())), e.get("exit", False)


async def within_1s(pred) -> float:
    t0 = time.monotonic()
    await wait_until(pred, timeout=1.0)
    return time.monotonic() - t0


async def barrier(h, node, *watchers) -> None:
    """Every change the server applied before now has reached the watchers: a rename of `node` they see (one
    ordered stream per session)."""
    tag = f"b{time.monotonic_ns() % 10**9}"
    h.admin.rename(h.admin.get_node(node.key).node_id, tag)
    await wait_until(lambda: all(w.entries.get(node.key, {}).get("name") == tag for w in watchers))


async def test_approve_withdraw_exit_and_auto_approval_reach_peers_within_1s(harness, nursery):
    h = harness
    inv = h.invite(reusable=True)
    home = await recording_node(nursery, inv, "home")
    office = await recording_node(nursery, inv, "office")
    await wait_until(lambda: home.key in office.entries)
    hid = str(h.admin.get_node(home.key).node_id)  # by id: the barrier renames it

    await advertise(home, [LAN, "fd12:50::/64"])
    await wait_until(lambda: len(h.admin.list_routes()) == 2)
    await barrier(h, home, office)
    assert routes_in(office, home) == ((), False)  # pending: nobody routes it yet
    assert {(r.prefix, r.advertised, r.decision) for r in h.admin.list_routes()} == {
        (LAN, True, None), ("fd12:50::/64", True, None)}

    admin.approve_route(h.admin, hid, LAN)  # what `meshwg-signal routes approve home LAN` does
    await within_1s(lambda: routes_in(office, home) == ((LAN,), False))
    admin.approve_route(h.admin, hid, "fd12:50::/64")
    await within_1s(lambda: routes_in(office, home) == ((LAN, "fd12:50::/64"), False))
    assert routes_in(home, office) == ((), False) and "routes" not in office.entries.get(office.key, {})

    await advertise(home, ["fd12:50::/64"])  # it stops advertising LAN: gone from every directory at once
    await within_1s(lambda: routes_in(office, home) == (("fd12:50::/64",), False))
    admin.reject_route(h.admin, hid, "fd12:50::/64")  # the approval taken back: gone too
    await within_1s(lambda: routes_in(office, home) == ((), False))

    await advertise(home, [LAN], exit_node=True)  # LAN comes back approved; the exit node waits for approval
    await within_1s(lambda: routes_in(office, home) == ((LAN,), False))
    admin.approve_route(h.admin, hid, "exit")
    await within_1s(lambda: routes_in(office, home) == ((LAN,), True))
    await advertise(home, [LAN], exit_node=False)
    await within_1s(lambda: routes_in(office, home) == ((LAN,), False))

    # an invite that auto-approves: the routes inside its prefixes and the exit node are approved at once
    auto = h.invite(reusable=True, auto_routes=["10.77.0.0/16", "exit"])
    lab = await recording_node(nursery, auto, "lab")
    await wait_until(lambda: lab.key in office.entries)
    await advertise(lab, ["10.77.1.0/24", "10.78.0.0/24"], exit_node=True)
    await within_1s(lambda: routes_in(office, lab) == (("10.77.1.0/24",), True))
    assert routes_in(home, lab) == (("10.77.1.0/24",), True)
    assert {r.prefix: r.decision for r in h.admin.list_routes() if r.node_id == h.admin.get_node(lab.key).node_id} == {
        "10.77.1.0/24": True, "10.78.0.0/24": None, "exit": True}
    # a new session of a peer gets the routes in its snapshot
    office2 = await recording_node(nursery, inv, "office", sk=office.conn.private_key)
    await wait_until(lambda: any(m["type"] == P.T_DIR_FULL and m.get("last") for m in office2.messages))
    assert routes_in(office2, lab) == (("10.77.1.0/24",), True) and routes_in(office2, home) == ((LAN,), False)


async def test_a_reconnect_repeating_the_advertisement_writes_nothing_and_junk_is_counted(harness, nursery):
    h = harness
    inv = h.invite(reusable=True)
    home = await recording_node(nursery, inv, "home")
    await advertise(home, [LAN])
    await wait_until(lambda: len(h.admin.list_routes()) == 1)
    head = h.admin.change_head()
    home2 = await recording_node(nursery, inv, "home", sk=home.conn.private_key)
    await advertise(home2, [LAN])
    await home2.conn.send({"type": P.T_ROUTES, "routes": "10.0.0.0/8"})
    await home2.conn.send({"type": P.T_ROUTES, "routes": [LAN, "10.0.0.1/8", 7], "exit_node": False})
    await wait_until(lambda: h.server.counters["control_bad_routes"] == 1)
    await wait_until(lambda: h.server.counters["control_routes_dropped"] == 2)
    assert [c for c in h.admin.changes_since(head)[0] if c.kind == "routes"] == []
    assert home2.key in h.server.sessions  # bad input closes nothing


async def test_forbidden_routes_are_never_in_a_directory(harness, nursery, caplog):
    h = harness
    inv = h.invite(reusable=True, auto_routes=["192.168.0.0/16"])
    home = await recording_node(nursery, inv, "home")
    office = await recording_node(nursery, inv, "office")
    mesh4 = str(h.server.prefix4)
    with caplog.at_level("INFO", logger="signal"):
        await advertise(home, ["0.0.0.0/0", mesh4, "127.0.0.0/8", "192.168.7.0/24"])
        await wait_until(lambda: len(h.admin.list_routes()) == 4)
        await within_1s(lambda: routes_in(office, home) == (("192.168.7.0/24",), False))
        await advertise(home, ["0.0.0.0/0", mesh4, "127.0.0.0/8", "192.168.7.0/24", "192.168.8.0/24"])
        await within_1s(lambda: routes_in(office, home)[0] == ("192.168.7.0/24", "192.168.8.0/24"))
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3, refused  # each once, though advertised twice
    assert any("0.0.0.0/0 refused: a default route" in m for m in refused)
    assert any(f"{mesh4} refused" in m and "mesh prefix" in m for m in refused)


# --- the CLI


async def cli_mesh(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, plain_udp=("127.0.0.1", 0))
    inv = h.invite(reusable=True)
    nodes = {name: await recording_node(nursery, inv, name) for name in ("home", "office")}
    await advertise(nodes["home"], [LAN], exit_node=True)
    await advertise(nodes["office"], ["192.168.0.0/16", "10.1.0.0/16"])
    await wait_until(lambda: len(h.admin.list_routes()) == 4)
    return h, nodes


async def test_routes_cli_round_trip_and_plain_configs(nursery, tmp_path, capsys):
    h, nodes = await cli_mesh(nursery, tmp_path)
    code, out, _ = await run_cli(capsys, h, "routes", "list")
    assert code == 0
    lines = [line.split() for line in out.splitlines()[1:]]
    assert ["home", LAN, "pending"] in lines and ["home", "exit", "pending"] in lines
    assert ["office", "192.168.0.0/16", "pending"] in lines

    code, out, err = await run_cli(capsys, h, "routes", "approve", "home", LAN)
    assert code == 0 and f"approved {LAN} for home" in out, err
    await within_1s(lambda: routes_in(nodes["office"], nodes["home"]) == ((LAN,), False))
    code, out, err = await run_cli(capsys, h, "routes", "approve", "home", "exit")
    assert code == 0, err
    await within_1s(lambda: routes_in(nodes["office"], nodes["home"]) == ((LAN,), True))
    code, out, _ = await run_cli(capsys, h, "routes", "approve", "office", "10.1.0.0/16")
    assert code == 0
    code, out, _ = await run_cli(capsys, h, "routes", "approve", "office", "172.20.0.0/16")
    assert code == 0 and "does not advertise it" in out
    code, out, _ = await run_cli(capsys, h, "routes", "list")
    lines = [line.split(maxsplit=2) for line in out.splitlines()[1:]]
    assert ["home", LAN, "approved"] in lines and ["office", "172.20.0.0/16", "approved (not advertised)"] in lines

    # a phone reaching home and office: each target's approved routes; --exit-node home: everything through home
    code, out, err = await run_cli(capsys, h, "plain", "add", "phone", "--to", "home", "--to", "office")
    assert code == 0, err
    rows = {r.name: r for r in h.admin.list_nodes()}
    peers = {p.public_key: p.allowed_ips for p in wgquick.parse(out).peers}
    net = ipaddress.ip_network
    assert peers[rows["home"].key][2:] == [net(LAN)]
    assert peers[rows["office"].key][2:] == [net("10.1.0.0/16")]
    code, out, err = await run_cli(capsys, h, "plain", "add", "tablet", "--to", "office", "--exit-node", "home")
    assert code == 0, err
    peers = {p.public_key: p.allowed_ips for p in wgquick.parse(out).peers}
    assert peers[rows["home"].key] == [net("0.0.0.0/0"), net("::/0")]

    code, out, _ = await run_cli(capsys, h, "routes", "reject", "home", "exit")
    assert code == 0 and "rejected exit for home" in out
    await within_1s(lambda: routes_in(nodes["office"], nodes["home"]) == ((LAN,), False))
    code, _, err = await run_cli(capsys, h, "plain", "config", "tablet")  # its exit node is no longer approved
    assert code == 2 and "'home' is not an approved exit node" in err and len(err.strip().splitlines()) == 1

    code, out, err = await run_cli(capsys, h, "invite", "create", "--auto-approve-routes", "10.9.0.0/16",
                                   "--auto-approve-routes", "EXIT")
    assert code == 0 and "auto-approves 10.9.0.0/16,exit" in err
    assert h.admin.list_invites()[-1].auto_routes == ("10.9.0.0/16", "exit")
    code, out, _ = await run_cli(capsys, h, "invite", "list")
    assert "(auto-approves 10.9.0.0/16,exit)" in out


@pytest.mark.parametrize("argv, named", [
    (["routes", "approve", "garage", LAN], "'garage'"),
    (["routes", "approve", "home", "192.168.50.1/24"], "'192.168.50.1/24'"),
    (["routes", "approve", "home", "lan"], "'lan'"),
    (["routes", "approve", "office", "192.168.0.0/16"], "overlaps home's approved route 192.168.50.0/24"),
    (["routes", "approve", "home", "0.0.0.0/0"], "0.0.0.0/0 for home: a default route"),
    (["routes", "approve", "home", "MESH4"], "the mesh prefix"),
    (["routes", "approve", "home", "127.0.0.0/8"], "cannot approve 127.0.0.0/8 for home: "),
    (["routes", "approve", "home", "SERVER"], "contains the server's address"),
    (["routes", "reject", "home", "10.5.0.0/16"], "home has no route 10.5.0.0/16"),
    (["routes", "reject", "garage", "exit"], "'garage'"),
    (["invite", "create", "--auto-approve-routes", "10.0.0.1/8"], "'10.0.0.1/8'"),
    (["invite", "create", "--auto-approve-routes", "::/0"], "::/0: a default route"),
    (["plain", "add", "phone", "--to", "office", "--exit-node", "office"], "'office' is not an approved exit node"),
    (["plain", "add", "phone", "--to", "office", "--exit-node", "home"], "'home' is not an approved exit node"),
])
async def test_routes_mistakes_are_one_line_naming_the_value_exit_2(nursery, tmp_path, capsys, argv, named):
    h, nodes = await cli_mesh(nursery, tmp_path)
    admin.approve_route(h.admin, "home", LAN)
    mesh4 = str(h.server.prefix4)
    h.admin.meta_set("server_addrs", '["198.51.100.20"]')  # as a server reached at that address publishes it
    argv = [{"MESH4": mesh4, "SERVER": "198.51.100.0/24"}.get(a, a) for a in argv]
    # The server's first publication of the nodes' public endpoints (a meta write) must not land in the CLI's run.
    await wait_until(lambda: h.admin.meta_get(admin.PUBLIC_META) is not None)
    head, invites = h.admin.change_head(), len(h.admin.list_invites())
    code, out, err = await run_cli(capsys, h, *argv)
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("meshwg-signal: ") and named in line and "Traceback" not in err
    assert h.admin.change_head() == head and len(h.admin.list_invites()) == invites
    assert h.admin.list_plain() == []


async def test_the_server_publishes_where_it_is_reached(harness, nursery):
    h = harness
    policy = admin.route_policy(h.admin)
    assert ipaddress.ip_address("127.0.0.1") in policy.server_ips  # its bound control/relay/STUN addresses
    assert policy.forbidden(str(h.server.prefix6)) is not None
    # as if it listened on a wildcard: a session's local address is where nodes reach it, noted and published
    h.server._server_ips.clear()
    h.admin.meta_set("server_addrs", "[]")
    await recording_node(nursery, h.invite(), "home")
    await wait_until(lambda: "127.0.0.1" in (h.admin.meta_get("server_addrs") or ""))
    assert h.server._server_ips == {"127.0.0.1"}
    assert ipaddress.ip_address("127.0.0.1") in h.server.core.policy.server_ips


async def test_the_node_sides_own_messages_and_parser_agree(harness, nursery):
    """The node's ControlConnection.report_routes and its entry parser (meshwg/control/client.py) with this server."""
    from meshwg.control.client import _peer_untrusted

    h = harness
    inv = h.invite(reusable=True, auto_routes=[LAN, "exit"])
    home = await recording_node(nursery, inv, "home")
    office = await recording_node(nursery, inv, "office")
    await home.conn.report_routes([LAN, "10.3.0.0/16"], True)
    await within_1s(lambda: routes_in(office, home) == ((LAN,), True))
    admin.approve_route(h.admin, "home", "10.3.0.0/16")
    await within_1s(lambda: routes_in(office, home) == (("10.3.0.0/16", LAN), True))
    info = _peer_untrusted(P.pack_entry(office.entries[home.key]))
    assert (set(info.routes), info.exit_node) == ({LAN, "10.3.0.0/16"}, True)

"""`meshwg-signal plain add/config --direct` (issue 12, item 2's end): a target node that reports a "public" candidate
(a port forward, or no NAT filtering) gets it as the phone's Endpoint instead of the server's plain port; a node
without one is a one-line error naming it, and nothing is written. The running server keeps the nodes' public
endpoints in the database (meta public_endpoints), which is all the CLI reads; an offline node keeps its last."""

from __future__ import annotations

import json

import trio
from plain_helpers import recording_node
from sig_helpers import start_server, wait_until
from test_plain_cli import run_cli

from meshwg.config import keys, wgquick
from signal_server import admin
from signal_server.directory import Node

PUBLIC = ("198.51.100.5", 41641)


def published(h) -> dict:
    return json.loads(h.admin.meta_get(admin.PUBLIC_META) or "{}")


async def mesh(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, plain_udp=("127.0.0.1", 0))
    inv = h.invite(reusable=True)
    home = await recording_node(nursery, inv, "home")
    office = await recording_node(nursery, inv, "office")
    # home: the port forward (kind "public") next to the same address's STUN kind, as a node reports it
    await home.conn.report_candidates([(*PUBLIC, "public"), (*PUBLIC, "stun-eim"), ("192.168.1.2", 41641, "local")])
    await office.conn.report_candidates([("203.0.113.20", 5000, "stun-edm")])
    home_b64 = keys.key_to_base64(home.key)
    await wait_until(lambda: home_b64 in published(h), timeout=2.0)
    return h, home, office


async def test_direct_puts_the_nodes_public_endpoint_in_the_config(nursery, tmp_path, capsys):
    h, home, office = await mesh(nursery, tmp_path)
    assert published(h) == {keys.key_to_base64(home.key): "198.51.100.5:41641"}
    code, out, err = await run_cli(capsys, h, "plain", "add", "phone", "--to", "home", "--direct")
    assert code == 0, err
    cfg = wgquick.parse(out)
    [peer] = cfg.peers
    assert peer.public_key == home.key and peer.endpoint == wgquick.Endpoint(*PUBLIC)
    assert peer.persistent_keepalive == 25
    # otherwise the same config as through the relay: the Endpoint differs, and the relayed one leaves room for
    # the relay's 37 B RECV header (MTU = 1420 - 37); the direct one keeps the apps' default
    assert "MTU" not in out
    code, relayed, _ = await run_cli(capsys, h, "plain", "config", "phone")
    assert code == 0
    assert relayed.replace(f"127.0.0.1:{h.plain[1]}", "198.51.100.5:41641").replace("MTU = 1383\n", "") == out
    assert "MTU = 1383\n" in relayed
    code, again, _ = await run_cli(capsys, h, "plain", "config", "phone", "--direct")
    assert code == 0 and again == out


async def test_a_node_without_a_public_endpoint_is_one_line_naming_it_and_nothing_is_written(nursery, tmp_path,
                                                                                             capsys):
    h, home, office = await mesh(nursery, tmp_path)
    head = h.admin.change_head()
    for argv in (["add", "phone", "--to", "office", "--direct"],
                 ["add", "phone", "--to", "home", "--to", "office", "--direct"]):
        code, out, err = await run_cli(capsys, h, "plain", *argv)
        assert code == 2 and out == ""
        [line] = err.strip().splitlines()
        assert "'office'" in line and "--direct" in line and "Traceback" not in err
        assert h.admin.list_plain() == [] and h.admin.change_head() == head
    code, _, _ = await run_cli(capsys, h, "plain", "add", "tablet", "--to", "office")
    assert code == 0
    code, out, err = await run_cli(capsys, h, "plain", "config", "tablet", "--direct")
    assert code == 2 and out == "" and "'office'" in err


async def test_a_node_that_stops_reporting_it_loses_it_and_an_offline_one_keeps_its_last(nursery, tmp_path, capsys):
    h, home, office = await mesh(nursery, tmp_path)
    home_b64 = keys.key_to_base64(home.key)
    await home.conn.report_candidates([(*PUBLIC, "stun-eim")])          # `meshwg set --public-endpoint none`
    await wait_until(lambda: home_b64 not in published(h), timeout=2.0)
    await home.conn.report_candidates([(*PUBLIC, "public")])
    await wait_until(lambda: home_b64 in published(h), timeout=2.0)
    await office.conn.report_candidates([("203.0.113.20", 5000, "public")])
    office_b64 = keys.key_to_base64(office.key)
    await wait_until(lambda: office_b64 in published(h), timeout=2.0)
    await home.conn.aclose()
    await wait_until(lambda: not h.server.directory.nodes[home.key].online, timeout=6.0)
    await trio.sleep(0.3)                                                # a few db_poll rounds
    assert published(h)[home_b64] == "198.51.100.5:41641"               # a port forward outlives a restart
    code, out, err = await run_cli(capsys, h, "plain", "add", "phone", "--to", "home", "--direct")
    assert code == 0, err
    assert wgquick.parse(out).peers[0].endpoint == wgquick.Endpoint(*PUBLIC)


def test_public_endpoints_json_follows_online_nodes_keeps_offline_ones_and_forgets_the_gone():
    k = [bytes([i]) * 32 for i in range(4)]
    b64 = [keys.key_to_base64(x) for x in k]
    prev = json.dumps({b64[0]: "198.51.100.1:1", b64[1]: "198.51.100.2:2", b64[3]: "198.51.100.4:4"})
    nodes = [Node(1, k[0], "a", "", "", candidates=[("198.51.100.9", 9, "public")], online=True),   # moved
             Node(2, k[1], "b", "", "", online=False),                                           # offline: kept
             Node(3, k[2], "c", "", "", candidates=[("198.51.100.3", 3, "stun-eim")], online=True),
             Node(5, bytes([5]) * 32, "p", "", "", kind="plain")]                                # k[3]: gone
    got = json.loads(admin.public_endpoints_json(nodes, prev))
    assert got == {b64[0]: "198.51.100.9:9", b64[1]: "198.51.100.2:2"}
    assert json.loads(admin.public_endpoints_json(nodes, "not json")) == {b64[0]: "198.51.100.9:9"}
    v6 = [Node(1, k[0], "a", "", "", candidates=[("2001:db8::9", 9, "public")], online=True)]
    assert json.loads(admin.public_endpoints_json(v6, None)) == {b64[0]: "[2001:db8::9]:9"}

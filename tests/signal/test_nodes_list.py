"""`meshwg-signal nodes` (issue 15): an ONLINE column from the running server's presence record, aligned columns,
`--json`; `serve` warns when its prefix overlaps a host route; the server logs connects, disconnects and a SIGTERM
shutdown."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio
from sig_helpers import new_key, start_server, wait_until

from meshwg.config.keys import key_to_base64
from meshwg.control import ControlConnection, parse_invite
from signal_server import admin, cli, local_routes
from signal_server import server as server_mod
from signal_server.store_api import NodeRow

KA, KB = bytes(range(32)), bytes(range(1, 33))
WALL = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def _utc(t):
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _rows():
    a = NodeRow(1, KA, "laptop", "100.64.0.1", "fd12:3456:789a::1", WALL - 9000, WALL - 3600, None, None, "",
                tags=("ops",), routes=("192.168.1.0/24",), is_exit=True)
    b = NodeRow(12, KB, "build-server-eu", "100.64.0.12", "fd12:3456:789a::c", WALL - 9000, WALL - 185, None, None, "")
    return [a, b]


def test_two_nodes_table_is_aligned():
    presence = admin.read_presence(admin.presence_json([KA], WALL - 5), WALL)
    out = admin.nodes_table(admin.node_records(_rows(), presence, WALL), _utc)
    assert out == (
        "ID  NAME             IPV4         IPV6               ONLINE  LAST SEEN            TAGS  ROUTES\n"
        " 1  laptop           100.64.0.1   fd12:3456:789a::1  yes     2027-01-15 07:59:55  ops   192.168.1.0/24,exit\n"
        "12  build-server-eu  100.64.0.12  fd12:3456:789a::c  3m ago  2027-01-15 07:56:55  -     -\n"
    )


def test_json_has_the_same_fields_in_iso_utc_and_seconds_ago():
    presence = admin.read_presence(admin.presence_json([KA], WALL - 5), WALL)
    recs = json.loads(json.dumps(admin.node_records(_rows(), presence, WALL)))
    assert [r["name"] for r in recs] == ["laptop", "build-server-eu"]
    a, b = recs
    assert a["online"] is True and b["online"] is False
    assert a["last_seen"] == "2027-01-15T07:59:55Z" and a["last_seen_seconds_ago"] == 5
    assert b["last_seen"] == "2027-01-15T07:56:55Z" and b["last_seen_seconds_ago"] == 185
    assert a["tags"] == ["ops"] and a["routes"] == ["192.168.1.0/24", "exit"] and b["routes"] == []
    assert a["key"] == key_to_base64(KA) and a["ipv6"] == "fd12:3456:789a::1" and b["id"] == 12


def test_a_stale_or_broken_presence_record_shows_nobody_online():
    """A killed server leaves its record behind: older than 30 s (three of its 10 s refreshes) it is not trusted."""
    old = admin.read_presence(admin.presence_json([KA], WALL - 31), WALL)
    assert not old.fresh and not admin.node_records(_rows(), old, WALL)[0]["online"]
    assert admin.read_presence(admin.presence_json([KA], WALL - 29), WALL).fresh
    # ...but its time is still when the node was last seen connected
    assert admin.node_records(_rows(), old, WALL)[0]["last_seen_seconds_ago"] == 31
    for junk in (None, "", "{", "[]", '{"at": "x", "online": []}', '{"at": 1, "online": ["!!"]}'):
        p = admin.read_presence(junk, WALL)
        assert p.at is None and not p.fresh and p.keys == frozenset()
    assert admin.ago(59) == "59s ago" and admin.ago(60) == "1m ago" and admin.ago(7200) == "2h ago"
    assert admin.ago(3 * 86400 + 5) == "3d ago"


def test_expired_and_never_seen():
    rows = _rows()
    rows[0].expires = WALL - 1
    rows[1].last_seen = None
    presence = admin.read_presence(admin.presence_json([KA], WALL), WALL)
    recs = admin.node_records(rows, presence, WALL)
    assert recs[0]["online"] is False and recs[0]["expired"] is True
    assert recs[1]["last_seen"] is None and recs[1]["last_seen_seconds_ago"] is None
    lines = admin.nodes_table(recs, _utc).splitlines()
    assert " expired " in lines[1] and " never " in lines[2]


# --- against a running server

async def _cli(capsys, db, *argv):
    capsys.readouterr()
    code = await trio.to_thread.run_sync(cli.main, [*argv, "--db", db])
    out, err = capsys.readouterr()
    return code, out, err


async def test_online_follows_connections(nursery, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="signal")
    h = await start_server(nursery, tmp_path)
    inv = h.invite(reusable=True)
    ka, kb = new_key(), new_key()
    with trio.fail_after(10):
        a = await ControlConnection.open(inv, ka, name="alpha")
        b = await ControlConnection.open(inv, kb, name="beta")

    async def listing():
        code, out, _ = await _cli(capsys, h.db, "nodes", "list", "--json")
        assert code == 0
        return {r["name"]: r for r in json.loads(out)}

    async def wait_for(pred):
        with trio.fail_after(3):
            while not pred(await listing()):
                await trio.sleep(0.05)

    await wait_for(lambda r: r["alpha"]["online"] and r["beta"]["online"])
    await b.aclose()
    await wait_for(lambda r: r["alpha"]["online"] and not r["beta"]["online"])
    code, out, err = await _cli(capsys, h.db, "nodes")
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == ["ID", "NAME", "IPV4", "IPV6", "ONLINE", "LAST", "SEEN", "TAGS", "ROUTES"]
    for col in ("NAME", "IPV4", "ONLINE", "TAGS"):  # every row's cell starts under its header
        at = header.index(col)
        assert all(ln[at - 2:at] == "  " and ln[at] != " " for ln in lines[1:]), (col, out)
    beta = next(ln for ln in lines if " beta " in ln)
    assert beta.split()[4].endswith("s") and " ago " in beta and " yes " in next(ln for ln in lines if " alpha " in ln)
    assert err == ""  # a running server: no note about a missing presence record

    # the log: a new node's join, a disconnect, a returning node's connect
    text = caplog.text
    assert "joined as beta" in text and "node beta (" in text and "disconnected" in text
    with trio.fail_after(10):
        b2 = await ControlConnection.open(inv, kb)
    await wait_until(lambda: "node beta (" in caplog.text and "connected from 127.0.0.1" in caplog.text)
    await b2.aclose()
    await a.aclose()


async def test_no_server_running_says_so(nursery, tmp_path, capsys):
    h = await start_server(nursery, tmp_path)
    h.admin.meta_set(admin.PRESENCE_META, admin.presence_json([], time.time() - 100))
    h.server.cfg.control_enabled = False  # stop it rewriting the record; the CLI now sees a stale one
    code, out, err = await _cli(capsys, h.db, "nodes")
    assert code == 0 and out.splitlines()[0].startswith("ID  NAME")
    assert "no running server has published who is online" in err and err.count("\n") == 1


# --- serve warns about a prefix that overlaps a host route

IP4_JSON = json.dumps([
    {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
    {"dst": "192.0.2.0/24", "dev": "eth0", "protocol": "kernel"},
    {"dst": "100.100.100.100", "dev": "tailscale0", "table": "52"},
    {"dst": "100.92.0.0/16", "dev": "wt0", "protocol": "kernel"},
    {"type": "local", "dst": "100.92.3.4", "dev": "wt0", "table": "local"},
    {"dst": "100.92.0.0/16", "dev": "wt0", "protocol": "kernel"},  # listed twice: warned once
    {"dst": "100.128.0.0/9", "dev": "eth1"},  # just past 100.64.0.0/10
    {"dst": "0.0.0.0/0", "dev": "eth9"},
])
IP6_JSON = json.dumps([{"dst": "fd7a:115c:a1e0::/48", "dev": "tailscale0", "table": "52"},
                       {"dst": "fe80::/64", "dev": "eth0"}, {"dst": "::/0", "dev": "eth0"}])
PROC_ROUTE = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "wt0\t00005C64\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
)


def test_overlaps_from_canned_ip_json():
    routes = local_routes.parse_ip_json(IP4_JSON) + local_routes.parse_ip_json(IP6_JSON)
    p4, p6 = ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/64")
    assert local_routes.overlaps(routes, p4) == [("100.100.100.100/32", "tailscale0"), ("100.92.0.0/16", "wt0"),
                                                 ("100.92.3.4/32", "wt0")]
    assert local_routes.overlaps(routes, p6) == [("fd7a:115c:a1e0::/48", "tailscale0")]
    assert local_routes.overlaps(routes, ipaddress.ip_network("10.99.0.0/16")) == []
    assert local_routes.parse_ip_json("not json") == [] and local_routes.parse_ip_json('{"dst": 1}') == []


def test_overlaps_from_canned_proc_net_route():
    routes = local_routes.parse_proc_route(PROC_ROUTE)
    assert routes == [("0.0.0.0/0", "eth0"), ("100.92.0.0/16", "wt0"), ("192.0.2.0/24", "eth0")]
    assert local_routes.overlaps(routes, ipaddress.ip_network("100.64.0.0/10")) == [("100.92.0.0/16", "wt0")]


async def test_serve_warns_about_overlapping_routes_and_starts(nursery, tmp_path, caplog, monkeypatch):
    routes = local_routes.parse_ip_json(IP4_JSON) + local_routes.parse_ip_json(IP6_JSON)
    monkeypatch.setattr(server_mod, "host_routes", lambda: routes)
    caplog.set_level(logging.WARNING, logger="signal")
    h = await start_server(nursery, tmp_path, prefix4="100.64.0.0/10", prefix6="fd7a:115c:a1e0::/48")
    lines = [r.getMessage() for r in caplog.records if "overlaps the local route" in r.getMessage()]
    assert len(lines) == 4
    assert any("100.64.0.0/10" in ln and "100.92.0.0/16 on wt0" in ln for ln in lines)
    assert any("fd7a:115c:a1e0::/48" in ln and "fd7a:115c:a1e0::/48 on tailscale0" in ln for ln in lines)
    with trio.fail_after(10):  # it serves all the same
        c = await ControlConnection.open(h.invite(), new_key())
    await c.aclose()


def test_a_node_of_ours_on_this_host_is_not_a_clash():
    # The server's own host runs a node of this mesh: its interface carries the address the server assigned.
    addrs = local_routes.parse_ip_addresses(json.dumps([
        {"ifname": "meshwg0", "addr_info": [{"local": "100.64.0.5", "prefixlen": 10}, {"local": "fd00:1::5"}]},
        {"ifname": "wt0", "addr_info": [{"local": "100.92.3.4", "prefixlen": 16}]},
        {"ifname": "junk", "addr_info": "x"}, "junk"]))
    assert addrs == [("100.64.0.5", "meshwg0"), ("fd00:1::5", "meshwg0"), ("100.92.3.4", "wt0")]
    ours = local_routes.own_interfaces(addrs, ["100.64.0.5", "not an ip"])
    assert ours == {"meshwg0"}
    routes = [("100.64.0.0/10", "meshwg0"), ("100.64.0.5", "meshwg0"), ("100.92.0.0/16", "wt0")]
    p4 = ipaddress.ip_network("100.64.0.0/10")
    assert local_routes.overlaps(routes, p4, ours) == [("100.92.0.0/16", "wt0")]
    # Only an exact address of ours: an interface with some other address inside the prefix is a clash.
    assert local_routes.own_interfaces(addrs, ["100.92.3.5"]) == set()
    assert local_routes.parse_ip_addresses("not json") == []


async def test_serve_does_not_warn_about_its_own_nodes_route(nursery, tmp_path, caplog, monkeypatch):
    h = await start_server(nursery, tmp_path, prefix4="100.64.0.0/10")
    with trio.fail_after(10):
        c = await ControlConnection.open(h.invite(), new_key())
    mine = c.welcome.ipv4
    await c.aclose()
    monkeypatch.setattr(server_mod, "host_routes", lambda: [("100.64.0.0/10", "meshwg0"), (mine, "meshwg0"),
                                                             ("100.92.0.0/16", "wt0")])
    monkeypatch.setattr(server_mod, "host_addresses", lambda: [(mine, "meshwg0"), ("100.92.3.4", "wt0")])
    caplog.set_level(logging.WARNING, logger="signal")
    caplog.clear()
    h.server.warn_route_overlaps()  # what serve does at start (a restart while the node runs)
    lines = [r.getMessage() for r in caplog.records if "overlaps the local route" in r.getMessage()]
    assert len(lines) == 1 and "100.92.0.0/16 on wt0" in lines[0], lines


# --- SIGTERM: the real process

def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sigterm_logs_and_stops_cleanly(tmp_path):
    db = str(tmp_path / "s.db")
    ctl, met = _free_port(), _free_port()
    py = sys.executable
    proc = subprocess.Popen(
        [py, "-m", "signal_server", "serve", "--init", "--db", db, "--listen", f"127.0.0.1:{ctl}",
         "--udp", f"127.0.0.1:{_free_port(socket.SOCK_DGRAM)}", "--relay-tcp", f"127.0.0.1:{_free_port()}",
         "--metrics", f"127.0.0.1:{met}", "--plain-udp", "none", "--heartbeat", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", met), timeout=0.2).close()
                    break
                except OSError:
                    await trio.sleep(0.05)
        text = subprocess.run([py, "-m", "signal_server", "invite", "create", "--db", db], capture_output=True,
                              text=True, timeout=20).stdout.strip()
        with trio.fail_after(10):
            node = await ControlConnection.open(parse_invite(text), new_key(), name="gamma")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            while proc.poll() is None:
                await trio.sleep(0.05)
        err = proc.stderr.read()
        assert proc.returncode == 0, err
        assert "SIGTERM: shutting down (1 nodes connected)" in err
        assert "node gamma (" in err and "disconnected" in err and err.rstrip().endswith("stopped")
        await node.aclose()
        r = subprocess.run([py, "-m", "signal_server", "nodes", "--json", "--db", db], capture_output=True,
                           text=True, timeout=20)
        (rec,) = json.loads(r.stdout)
        assert rec["online"] is False and rec["last_seen_seconds_ago"] <= time.time() - t0 + 1
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

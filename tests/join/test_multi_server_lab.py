"""Two `meshwg-signal serve` processes on one PostgreSQL (issue 14 item 2), real `meshwg join` agents in namespaces on
one bridge: alpha joins through server A (the default invite lists both servers, A first), beta through B; each sees
the other and they ping directly. Server A is killed (SIGKILL, by PID) while alpha pings beta every 0.1 s: alpha's
control client moves to B within a few seconds without a restart (`meshwg-signal nodes` shows it on B, its tunnels
untouched) and the ping loses at most what the move costs (here nothing: the pair is direct on the bridge)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from conftest import require_real_components
from meshwg.control import parse_invite
from pgnet import PgBridgeNet
from scenarios.netns import wait_for

pytestmark = pytest.mark.netns


def _online_peer(node, name) -> bool:
    p = node.peer(name)
    return bool(p) and p.get("online", True) and p.get("path") == "direct"


def _server_of(net, name) -> str | None:
    return next((r.get("server") for r in net.node_records() if r["name"] == name and r["online"]), None)


def test_a_node_whose_server_is_killed_moves_to_the_other_while_a_ping_keeps_flowing():
    require_real_components("ip")
    net = PgBridgeNet(94)
    try:
        ip_a, ip_b = "10.94.0.1", "10.94.0.254"
        addr_a = net.start_pg_server(ip_a, init=True)
        addr_b = net.start_pg_server(ip_b)
        # The default invite: every running server, in the order they started (B records itself just after it
        # listens).
        inv_both = wait_for(lambda: (lambda inv: inv if parse_invite(inv).addrs == (addr_a, addr_b) else None)(
            net.invite_for()), timeout=5, what="an invite listing A and B")
        inv_b_first = net.invite_for(addr_b, addr_a)
        a, b = net.node("alpha"), net.node("beta")
        a.start(inv_both)
        b.start(inv_b_first)
        ip_beta = wait_for(b.mesh_ip, timeout=20, what="beta's mesh address")
        wait_for(a.mesh_ip, timeout=20, what="alpha's mesh address")
        wait_for(lambda: _server_of(net, "alpha") == addr_a and _server_of(net, "beta") == addr_b, timeout=10,
                 what="alpha on A, beta on B")
        # Joined through different servers, each sees the other and they ping directly.
        wait_for(lambda: _online_peer(a, "beta") and _online_peer(b, "alpha"), timeout=20,
                 what="alpha and beta direct")
        assert a.ping(ip_beta, count=3, wait=1)
        iface_before = a.ns.run("ip", "-j", "link", "show", a.iface)
        port_before = a.status()["listen_port"]

        pinger = subprocess.Popen(a.ns.argv("ping", "-c", "80", "-i", "0.1", "-W", "1", ip_beta),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)
        t0 = time.monotonic()
        net.kill_server(ip_a)
        wait_for(lambda: (a.status() or {}).get("control", {}).get("server") == addr_b, timeout=5,
                 what="alpha's control client on B")
        moved = time.monotonic() - t0
        wait_for(lambda: _server_of(net, "alpha") == addr_b, timeout=5, what="nodes shows alpha on B")
        out, _ = pinger.communicate(timeout=30)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        sent, got = int(m.group(1)), int(m.group(2))
        print(f"alpha on B {moved:.2f} s after A was killed; ping {got}/{sent} through the move")
        assert moved < 5.0
        assert sent == 80 and got >= 76, out  # a direct pair: the control plane's move costs no packet
        st = a.status()
        assert st["control"]["reconnects"] == 1 and st["listen_port"] == port_before
        assert a.ns.run("ip", "-j", "link", "show", a.iface) == iface_before  # the same interface, never re-created
        assert _online_peer(b, "alpha") and a.ping(ip_beta, count=3, wait=1)
    except (AssertionError, subprocess.SubprocessError, TimeoutError):
        net.print_logs()
        raise
    finally:
        net.close()


def _cached_addrs(node) -> list:
    try:
        return json.loads((node.state / "netmap.json").read_text())["control"]["addrs"]
    except (OSError, ValueError, KeyError):
        return []


def test_a_node_whose_invite_names_one_killed_server_finds_the_other_also_after_a_restart():
    """alpha's invite names only A; its welcome lists B too (kept in its cache). A killed by PID under a 10/s ping:
    alpha is on B without a restart and the ping flows; then alpha restarts, A still dead, and comes up through B
    from its cache (the same invite, which names only A)."""
    require_real_components("ip")
    net = PgBridgeNet(95)
    try:
        ip_a, ip_b = "10.95.0.1", "10.95.0.254"
        addr_a = net.start_pg_server(ip_a, init=True)
        addr_b = net.start_pg_server(ip_b)
        inv_a = net.invite_for(addr_a)
        assert parse_invite(inv_a).addrs == (addr_a,)
        time.sleep(2.5)  # A reads the server records at its beats (every 2 s): its welcomes then name B
        a, b = net.node("alpha"), net.node("beta")
        a.start(inv_a)
        b.start(net.invite_for(addr_b))
        ip_beta = wait_for(b.mesh_ip, timeout=20, what="beta's mesh address")
        wait_for(a.mesh_ip, timeout=20, what="alpha's mesh address")
        wait_for(lambda: _online_peer(a, "beta") and _online_peer(b, "alpha"), timeout=20, what="alpha and beta direct")
        wait_for(lambda: addr_b in _cached_addrs(a), timeout=10, what="B in alpha's cache")
        assert (a.status() or {})["control"]["server"] == addr_a

        pinger = subprocess.Popen(a.ns.argv("ping", "-c", "60", "-i", "0.1", "-W", "1", ip_beta),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        t0 = time.monotonic()
        net.kill_server(ip_a)
        wait_for(lambda: (a.status() or {}).get("control", {}).get("server") == addr_b, timeout=5,
                 what="alpha's control client on B")
        moved = time.monotonic() - t0
        out, _ = pinger.communicate(timeout=30)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        sent, got = int(m.group(1)), int(m.group(2))
        assert sent == 60 and got >= 57, out

        # A restart with A still dead: up through B, from the cache.
        a.stop()
        t0 = time.monotonic()
        a.start(inv_a)
        wait_for(lambda: (a.status() or {}).get("control", {}).get("server") == addr_b, timeout=15,
                 what="restarted alpha on B")
        back = time.monotonic() - t0
        wait_for(lambda: _online_peer(a, "beta"), timeout=20, what="alpha and beta direct again")
        assert a.ping(ip_beta, count=3, wait=1)
        print(f"invite naming A only: alpha on B {moved:.2f} s after A was killed, ping {got}/{sent}; "
              f"restarted with A dead, on B after {back:.2f} s")
    except (AssertionError, subprocess.SubprocessError, TimeoutError):
        net.print_logs()
        raise
    finally:
        net.close()

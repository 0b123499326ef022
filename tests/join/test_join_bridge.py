"""Two `meshwg join` nodes and `meshwg-signal serve` in plain namespaces on one bridge (no NAT).

Shows: addresses from the server, ping over the mesh, a direct path in `meshwg status`, stock `wg show`
on the interface, tunnels surviving a server outage, a restart from the cached netmap while the server
is down, reconnection when it returns (a new node then reaches the others), graceful shutdown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require_real_components
from joinnet import ENV, REPO, BridgeNet
from scenarios.netns import wait_for

pytestmark = pytest.mark.netns


def _gone(node) -> bool:
    link = node.ns.run("ip", "link", "show", "dev", node.iface, check=False)
    return not link and not os.path.exists(f"/run/wireguard/{node.iface}.sock") \
        and not os.path.exists(f"/run/wireguard/{node.iface}.meshwg")


def test_two_nodes_direct_outage_cache_and_shutdown():
    require_real_components("ip", "wg", "ping")
    net = BridgeNet(77)
    a = b = None
    try:
        invite = net.start_server()
        a, b = net.node("alpha"), net.node("beta")
        a.start(invite)
        b.start(invite)
        ip_a = wait_for(a.mesh_ip, timeout=15, what="alpha's mesh address")
        ip_b = wait_for(b.mesh_ip, timeout=15, what="beta's mesh address")
        assert ip_a != ip_b and ip_a.startswith("100.")
        wait_for(lambda: a.ping(ip_b), timeout=10, what="alpha pings beta over the mesh")
        assert b.ping(ip_a)

        pb = wait_for(lambda: (p := a.peer("beta")) and p["path"] == "direct" and p, timeout=10, what="direct path")
        assert pb["endpoint"].startswith(f"{b.ip}:") and pb["latency_ms"] is not None
        assert pb["addresses"][0] == f"{ip_b}/32" and pb["last_handshake"] and pb["rx_bytes"] > 0
        st = a.status()
        assert st["control"]["connected"] and st["relay"]["mode"] == "udp"
        assert st["nat"]["reflexive"] == [f"{a.ip}:{st['listen_port']}"]

        # netcheck: STUN to the server's two addresses from the shared socket, relay latency.
        res = subprocess.run(a.ns.argv(sys.executable, "-m", "meshwg", "netcheck", "--json", "--interface", a.iface),
                             capture_output=True, env=ENV, cwd=REPO, timeout=20)
        nc = json.loads(res.stdout)
        assert nc["udp"] and nc["mapping"] == "endpoint-independent" and not nc["hard"]
        assert nc["reflexive"] == [f"{a.ip}:{st['listen_port']}"] and nc["relay_latency_ms"] is not None
        text = subprocess.run(a.ns.argv(sys.executable, "-m", "meshwg", "status", "--interface", a.iface),
                              capture_output=True, env=ENV, cwd=REPO, timeout=20).stdout.decode()
        assert any(ln.split()[:3] == ["beta", ip_b, "direct"] for ln in text.splitlines()), text   # one line a peer
        text = subprocess.run(a.ns.argv(sys.executable, "-m", "meshwg", "status", "-d", "--interface", a.iface),
                              capture_output=True, env=ENV, cwd=REPO, timeout=20).stdout.decode()
        assert "peer beta" in text and f"direct {b.ip}:" in text
        # -d: every counter by component (meshwg.counters' convention); "drops" are the drop_ ones among them.
        res = subprocess.run(a.ns.argv(sys.executable, "-m", "meshwg", "status", "-d", "--json", "-i", a.iface),
                             capture_output=True, env=ENV, cwd=REPO, timeout=20)
        detail = json.loads(res.stdout)
        c = detail["counters"]
        assert c["relay.send_hello_udp"] >= 1 and c["node.send_disco_ping"] >= 1 and c["node.recv_disco_pong"] >= 1
        assert detail["drops"] == {k: n for k, n in c.items() if k.rpartition(".")[2].startswith("drop_")}
        assert "counters" not in st

        # Stock wg(8) talks to the agent's UAPI socket.
        dump = a.ns.run("wg", "show", a.iface, "dump").splitlines()
        peer_line = dump[1].split("\t")
        assert peer_line[0] == pb["public_key"] and peer_line[2] == pb["endpoint"]
        assert f"{ip_b}/32" in peer_line[3]
        # `wg set` goes through the node, its core's one writer: a mesh peer's endpoint is the directory's
        # (refused, nothing changes); a peer added by hand works as in WireGuard.
        res = subprocess.run(a.ns.argv("wg", "set", a.iface, "peer", pb["public_key"], "endpoint", "192.0.2.1:9"),
                             capture_output=True, text=True, timeout=10)
        assert res.returncode != 0
        assert a.ns.run("wg", "show", a.iface, "dump").splitlines()[1].split("\t")[2] == pb["endpoint"]
        hand_key = a.ns.run("wg", "pubkey", input=a.ns.run("wg", "genkey").encode()).strip()
        a.ns.run("wg", "set", a.iface, "peer", hand_key, "allowed-ips", "10.99.0.0/24")
        assert hand_key in a.ns.run("wg", "show", a.iface, "peers")
        assert a.ping(ip_b)

        # Server down: the tunnel keeps working.
        net.stop_server()
        assert a.ping(ip_b, count=3) and b.ping(ip_a)
        wait_for(lambda: not a.status()["control"]["connected"], timeout=10, what="alpha notices the outage")

        # beta restarts while the server is down: it comes back from its cached netmap.
        b.stop()
        assert _gone(b)
        b.start(invite)
        wait_for(lambda: b.mesh_ip() == ip_b, timeout=15, what="beta up again from its cache")
        wait_for(lambda: b.ping(ip_a), timeout=20, what="beta reaches alpha with the server down")

        # Server back: both reconnect; a newcomer reaches everyone.
        net.start_server()
        wait_for(lambda: a.status()["control"]["connected"] and b.status()["control"]["connected"],
                 timeout=20, what="reconnect after the outage")
        c = net.node("gamma")
        c.start(invite)
        wait_for(lambda: c.mesh_ip() and c.peer("alpha") and c.peer("beta"), timeout=15, what="gamma's directory")
        wait_for(lambda: c.ping(ip_a) and c.ping(ip_b), timeout=10, what="gamma pings alpha and beta")

        # Graceful shutdown: interface, UAPI and status sockets removed.
        a.stop()
        assert _gone(a)
    except BaseException:
        net.print_logs()
        raise
    finally:
        net.close()

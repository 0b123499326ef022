"""Subnet routes and exit nodes end to end (issue 12): `meshwg-signal serve`, a node "home" with a LAN behind it
(a host with no meshwg: 10.77.0.2 in 10.77.0.0/24, on a veth to home) and an "internet" host reachable from home
only, and a node "laptop", each in its own namespace.

Shows: an advertised route is not routed before approval; approved, it is in laptop's routing table within 1 s
(plus margin for polling) and laptop reaches the LAN host, which sees home's LAN address (masquerade by
default); home forwards while it advertises and restores its forwarding settings and removes its nftables table
when it stops. Exit node: laptop, whose only way to the server is a default route (so its own traffic would loop
into the tunnel without its fwmark), uses home as exit node at runtime (`meshwg set --exit-node home`): it reaches
the internet host with home's address as source, keeps its control connection (across a server restart too) and
its tunnel to home; `--exit-node none` and stopping remove the policy rules.
"""

from __future__ import annotations

import pathlib
import subprocess
import time

import pytest

from conftest import require_real_components
from joinnet import PY, BridgeNet
from scenarios.netns import veth, wait_for

pytestmark = pytest.mark.netns

LAN_HOST, HOME_LAN = "10.77.0.2", "10.77.0.1"
INET_HOST, HOME_INET = "10.66.0.2", "10.66.0.1"
ROUTE_WITHIN = 1.0 + 0.5     # the 1 s, plus the 0.05 s polling and the `ip` calls of this test

# A one-connection TCP server: writes the peer's address to a file, so the test sees the source it got.
SOURCE_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 9000)); s.listen()
while True:
    c, addr = s.accept()
    open(sys.argv[2], "a").write(addr[0] + "\\n"); c.close()
"""
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 9000), timeout=2).close()"


def sysctl(ns, path: str) -> str:
    return ns.run("cat", f"/proc/sys/{path}").strip()


def rules(ns) -> str:
    return ns.run("ip", "-4", "rule", "show") + ns.run("ip", "-6", "rule", "show")


def connects(node, host: str) -> bool:
    """A TCP connection from the node's namespace to host:9000 succeeds."""
    return subprocess.run(node.ns.argv(PY, "-c", CONNECT, host), capture_output=True, timeout=10).returncode == 0


def sources(path: str) -> list[str]:
    try:
        return pathlib.Path(path).read_text().split()
    except OSError:
        return []


def has_route(node, prefix: str) -> bool:
    return f"dev {node.iface}" in node.ns.run("ip", "route", "show", prefix, check=False)


def test_subnet_route_with_masquerade_and_exit_node_with_policy_routing():
    require_real_components("ip", "ping", "nft")
    net = BridgeNet(61)
    try:
        invite = net.start_server()
        home, laptop = net.node("home"), net.node("laptop")
        lan = net._ns("mjl")
        veth(home.ns, "lan0", [f"{HOME_LAN}/24"], lan, "eth0", [f"{LAN_HOST}/24"])
        inet = net._ns("mji")
        veth(home.ns, "wan0", [f"{HOME_INET}/24"], inet, "eth0", [f"{INET_HOST}/24"])
        # home forwards nothing from the mesh to the server's network: laptop's traffic to the server that loops
        # into the tunnel dies there, as it would on a real exit node whose uplink is not the server's LAN.
        home.ns.run("nft", "-f", "-", input=b"add table inet labfilter\nadd chain inet labfilter tofwd "
                    b"{ type filter hook forward priority 0; }\nadd rule inet labfilter tofwd oifname eth0 drop\n")
        # laptop reaches the server only through a default route: the exit node's rules would catch its own
        # control, relay and WireGuard traffic unless it is marked.
        laptop.ns.run("ip", "addr", "flush", "dev", "eth0")
        laptop.ns.run("ip", "addr", "add", f"{laptop.ip}/32", "dev", "eth0")
        laptop.ns.run("ip", "route", "add", "default", "dev", "eth0")
        lan_log, inet_log = net.dir + "/lan-sources", net.dir + "/inet-sources"
        lan.popen(PY, "-c", SOURCE_SERVER, LAN_HOST, lan_log)
        inet.popen(PY, "-c", SOURCE_SERVER, INET_HOST, inet_log)
        forwarding_before = (sysctl(home.ns, "net/ipv4/ip_forward"), sysctl(home.ns, "net/ipv6/conf/all/forwarding"))
        assert forwarding_before == ("0", "0")

        home.start(invite, "--advertise-routes", f"{LAN_HOST.rsplit('.', 1)[0]}.0/24", "--advertise-exit-node")
        laptop.start(invite)
        ip_home = wait_for(home.mesh_ip, timeout=15, what="home's mesh address")
        wait_for(laptop.mesh_ip, timeout=15, what="laptop's mesh address")
        wait_for(lambda: laptop.ping(ip_home), timeout=15, what="laptop pings home over the mesh")
        # home advertises: forwarding on, our own nftables table in place
        assert (sysctl(home.ns, "net/ipv4/ip_forward"), sysctl(home.ns, "net/ipv6/conf/all/forwarding")) == ("1", "1")
        assert f"meshwg-{home.iface}" in home.ns.run("nft", "list", "tables")
        st = home.status()
        assert st["routing"]["advertise_routes"] == ["10.77.0.0/24"] and st["routing"]["advertise_exit_node"]

        # pending: not routed, not reachable
        time.sleep(0.5)
        assert not has_route(laptop, "10.77.0.0/24") and not laptop.ping(LAN_HOST, wait=0.5)
        res = net.signal("routes", "approve", "home", "10.77.0.0/24")
        t0 = time.monotonic()
        assert res.returncode == 0, res.stderr
        wait_for(lambda: has_route(laptop, "10.77.0.0/24"), timeout=10, what="the approved route on laptop")
        took = time.monotonic() - t0
        assert took <= ROUTE_WITHIN, f"route took {took:.2f} s"
        wait_for(lambda: laptop.ping(LAN_HOST), timeout=ROUTE_WITHIN, what="laptop pings the LAN host")
        p = laptop.peer("home")
        assert p["routes"] == ["10.77.0.0/24"] and "10.77.0.0/24" in p["routed"]
        assert connects(laptop, LAN_HOST)
        wait_for(lambda: sources(lan_log), timeout=5, what="the LAN host's log")
        assert sources(lan_log) == [HOME_LAN]     # masquerade: home's address

        # exit node: not reachable before; approved, then chosen at runtime
        assert not connects(laptop, INET_HOST)
        res = laptop.meshwg("set", "--exit-node", "home")   # a known peer, not approved yet: chosen, not in use
        assert res.returncode == 0 and "not in use" in res.stdout, res.stderr
        assert "fwmark" not in rules(laptop.ns)
        assert net.signal("routes", "approve", "home", "exit").returncode == 0
        wait_for(lambda: (laptop.status() or {}).get("routing", {}).get("exit_node_in_use") == "home",
                 timeout=5, what="laptop uses home as exit node")
        assert "not from all fwmark" in rules(laptop.ns) and "suppress_prefixlength 0" in rules(laptop.ns)
        for fam in ("-4", "-6"):   # the default routes live in the policy table only, never in main
            assert laptop.iface not in laptop.ns.run("ip", fam, "route", "show", "table", "main", "default")
        wait_for(lambda: connects(laptop, INET_HOST), timeout=5, what="laptop reaches the internet host")
        wait_for(lambda: sources(inet_log), timeout=5, what="the internet host's log")
        assert set(sources(inet_log)) == {HOME_INET}     # home's address, masqueraded
        assert laptop.ping(ip_home) and laptop.status()["control"]["connected"]
        assert "[exit node, in use]" in laptop.meshwg("status", "-d").stdout
        row = [ln for ln in laptop.meshwg("status").stdout.splitlines() if ln.split()[:1] == ["home"]]
        assert row and row[0].split()[1] == ip_home and row[0].endswith("exit node, in use"), row
        # the control connection comes back through the policy rules: a server restart
        net.stop_server()
        wait_for(lambda: not laptop.status()["control"]["connected"], timeout=40, what="laptop sees the outage")
        net.start_server()
        wait_for(lambda: laptop.status()["control"]["connected"], timeout=30, what="laptop reconnects to the server")
        assert laptop.ping(ip_home)

        # bad values: one-line errors naming them
        res = laptop.meshwg("set", "--exit-node", "nas")
        assert res.returncode == 1 and res.stderr.strip() == "meshwg: set: no peer named 'nas'"
        res = laptop.meshwg("set", "--advertise-routes", "10.9.0.1/16")
        assert res.returncode == 1 and "'10.9.0.1/16'" in res.stderr and res.stderr.count("\n") == 1

        # no exit node: the rules leave, the internet host is out of reach again
        assert laptop.meshwg("set", "--exit-node", "none").returncode == 0
        assert "not from all fwmark" not in rules(laptop.ns) and "suppress_prefixlength" not in rules(laptop.ns)
        assert not connects(laptop, INET_HOST)
        assert laptop.status()["control"]["connected"] and laptop.ping(ip_home)

        # home no longer an exit node: it forwards from the mesh only into its advertised route (forward chain),
        # and laptop still reaches the LAN host through it
        assert home.meshwg("set", "--advertise-exit-node", "off").returncode == 0
        table = f"meshwg-{home.iface}"
        wait_for(lambda: "ip daddr 10.77.0.0/24 accept" in home.ns.run("nft", "list", "table", "inet", table),
                 timeout=5, what="home's forward filter")
        assert "drop" in home.ns.run("nft", "list", "table", "inet", table)
        assert connects(laptop, LAN_HOST)
        assert home.meshwg("set", "--advertise-exit-node", "on").returncode == 0
        wait_for(lambda: "hook forward" not in home.ns.run("nft", "list", "table", "inet", table),
                 timeout=5, what="an exit node forwards everything again")

        # withdrawn at runtime on home: the route leaves laptop within the second
        assert home.meshwg("set", "--advertise-routes", "none").returncode == 0
        t0 = time.monotonic()
        wait_for(lambda: not has_route(laptop, "10.77.0.0/24"), timeout=10, what="the route leaves laptop")
        assert time.monotonic() - t0 <= ROUTE_WITHIN

        # stop: home restores forwarding and removes its table; laptop removes its rules
        assert laptop.meshwg("set", "--exit-node", "home").returncode == 0
        wait_for(lambda: "not from all fwmark" in rules(laptop.ns), timeout=5, what="laptop's rules back")
        home.stop()
        laptop.stop()
        assert (sysctl(home.ns, "net/ipv4/ip_forward"), sysctl(home.ns, "net/ipv6/conf/all/forwarding")) == \
            forwarding_before
        assert f"meshwg-{home.iface}" not in home.ns.run("nft", "list", "tables")
        assert f"meshwg-{laptop.iface}" not in laptop.ns.run("nft", "list", "tables")
        assert sysctl(laptop.ns, "net/ipv4/conf/all/src_valid_mark") == "0"
        assert "not from all fwmark" not in rules(laptop.ns) and "suppress_prefixlength" not in rules(laptop.ns)
    except BaseException:
        net.print_logs()
        raise
    finally:
        net.close()

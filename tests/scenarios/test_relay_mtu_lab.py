"""Issue 16 in the real NAT lab: the routes to a relayed peer carry mtu 1375, direct peers keep 1420; so do the
default routes of an exit node in use (policy table), relayed or direct.

A relayed WireGuard datagram carries the relay's 45 B SEND header: at the interface MTU 1420 a full-size packet
would leave as 1525-1545 B and be fragmented. c, d behind symmetric NATs cannot punch (relay); a, b behind
port-restricted cones go direct. On c, `ip route get` d's mesh addresses says mtu 1375 and a 1400-byte ping with DF
fails locally ("message too long", as does a 1360-byte one, which the interface's MTU would let through), a
1300-byte one passes through the relay; on a, b's routes keep the
interface's MTU and a full-size DF ping (1392 + 28 = 1420) passes. c using the relayed d as exit node: its policy
table's default routes carry mtu 1375 (a 1360-byte DF ping to the internet fails locally); a using the direct b: none.
"""

from __future__ import annotations

import re

import pytest

from conftest import require_real_components
from mesh_lab import MeshLab, logs_on_failure, paths, tunnel_report, wait_until  # noqa: F401 (autouse fixture)
from scenarios import node_commands as nc
from scenarios.nat import NatType
from scenarios.topology import Lab

pytestmark = pytest.mark.netns

RELAYED_MTU = 1375   # 1420 - the SEND header (45 B)


@pytest.fixture(scope="module")
def mesh():
    require_real_components("ip", "nft", "conntrack", "ping", "curl", "unshare")
    with Lab() as lab:
        m = MeshLab(lab)
        m.start_server()
        yield m


def on_path(mesh: MeshLab, x, y, want: str) -> None:
    ok, _ = wait_until(lambda: x.mesh_ip() and y.mesh_ip() and x.ping(y.mesh_ip(), 1, 1.0)
                       and paths(x, y) == (want, want), 60, 0.5)
    assert ok, f"{x.name} <-> {y.name} not {want}: {paths(x, y)}; {tunnel_report(x, y)}"


def route_mtu(node, ip: str) -> int | None:
    """The MTU `ip route get` gives for ip in node's namespace (None: the route has none, the interface's)."""
    m = re.search(r"\bmtu (\d+)", node.host.run("ip", "route", "get", ip))
    return int(m.group(1)) if m else None


def mesh_addresses(node, peer) -> list[str]:
    return [a.split("/")[0] for a in node.peer(peer.name)["addresses"] if a.endswith(("/32", "/128"))]


def df_ping(node, ip: str, size: int):
    return node.host.run_proc("ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", str(size), ip,
                              timeout=30)


def test_relayed_peer_routes_carry_1375_and_a_1400_byte_df_ping_is_refused_locally(mesh):
    c, d = mesh.add_node("c", NatType.SYMMETRIC), mesh.add_node("d", NatType.SYMMETRIC)
    on_path(mesh, c, d, "relay")
    addrs = mesh_addresses(c, d)
    assert len(addrs) == 2, addrs                                  # IPv4 /32 and IPv6 /128
    for ip in addrs:
        got, _ = wait_until(lambda ip=ip: route_mtu(c, ip) == RELAYED_MTU, 5, 0.1)
        assert got, f"c: ip route get {ip}: {c.host.run('ip', 'route', 'get', ip)!r}"
    # 1400 (1428 B) is over the interface's 1420 too; 1360 (1388 B) only over the route's 1375.
    for size in (1400, 1360):
        big = df_ping(c, d.mesh_ip(), size)
        err = big.stderr.decode(errors="replace") + big.stdout.decode(errors="replace")
        assert big.returncode != 0 and "message too long" in err and f"mtu={RELAYED_MTU}" in err, (size, err)
    small = df_ping(c, d.mesh_ip(), 1300)
    assert small.returncode == 0, small.stdout.decode(errors="replace")   # through the relay, unfragmented


def test_direct_peer_routes_keep_the_interface_mtu_after_leaving_the_relay(mesh):
    a, b = mesh.add_node("a", NatType.PORT_RESTRICTED), mesh.add_node("b", NatType.PORT_RESTRICTED)
    on_path(mesh, a, b, "direct")                                  # every pair starts on the relay
    for ip in mesh_addresses(a, b):
        cleared, _ = wait_until(lambda ip=ip: route_mtu(a, ip) is None, 5, 0.1)
        assert cleared, f"a: ip route get {ip}: {a.host.run('ip', 'route', 'get', ip)!r}"
    full = df_ping(a, b.mesh_ip(), 1392)                          # 1392 + 28 = 1420
    assert full.returncode == 0, full.stderr.decode(errors="replace")


def test_a_node_on_the_tcp_relay_reduces_its_routes_too(mesh):
    c = mesh.nodes["c"]
    e = mesh.add_node("e", NatType.UDP_BLOCKED)                    # reaches the relay over TCP only
    on_path(mesh, e, c, "relay")
    assert e.status()["relay"]["mode"] == "tcp", e.status()["relay"]
    for ip in mesh_addresses(e, c):
        got, _ = wait_until(lambda ip=ip: route_mtu(e, ip) == RELAYED_MTU, 5, 0.1)
        assert got, f"e: ip route get {ip}: {e.host.run('ip', 'route', 'get', ip)!r}"
    assert df_ping(e, c.mesh_ip(), 1300).returncode == 0


def exit_table(node) -> str | None:
    """The exit policy routing's table number on node (None: no exit node in use)."""
    m = re.search(r"not from all fwmark \S+ lookup (\d+)", node.host.run("ip", "-4", "rule", "show"))
    return m.group(1) if m else None


def default_mtus(node, table: str) -> list[int | None]:
    """The mtu of the IPv4 and IPv6 default routes in `table` (None: none, the interface's)."""
    out = []
    for fam in ("-4", "-6"):
        m = re.search(r"\bmtu (\d+)", node.host.run("ip", fam, "route", "show", "table", table, "default"))
        out.append(int(m.group(1)) if m else None)
    return out


def meshwg_set(node, *args: str) -> None:
    values = nc.node_values(node.host)
    node.host.run(nc.PY, "-m", "meshwg", "set", *args, "--state-dir", str(values["state_dir"]),
                  "--interface", values["interface"])


def use_exit_node(mesh: MeshLab, node, exit_node) -> str:
    """exit_node advertises itself as an exit node, approved; node uses it. The table number."""
    meshwg_set(exit_node, "--advertise-exit-node", "on")
    ok, _ = wait_until(lambda: "pending" in mesh.admin("routes", "list"), 10, 0.2)
    assert ok, mesh.admin("routes", "list")
    mesh.admin("routes", "approve", exit_node.name, "exit")
    meshwg_set(node, "--exit-node", exit_node.name)
    ok, _ = wait_until(lambda: ((node.status() or {}).get("routing") or {}).get("exit_node_in_use") == exit_node.name,
                       10, 0.1)
    assert ok, f"{node.name} does not use {exit_node.name} as exit node: {(node.status() or {}).get('routing')}"
    table = exit_table(node)
    assert table, node.host.run("ip", "-4", "rule", "show")
    return table


def test_a_relayed_exit_nodes_default_routes_carry_1375_a_direct_ones_none(mesh):
    """All internet traffic through a relayed exit node is relayed: 1420 + 32 + 45 + 28 would be over 1500."""
    a, b, c, d = (mesh.nodes[n] for n in "abcd")
    on_path(mesh, c, d, "relay")
    table = use_exit_node(mesh, c, d)
    got, _ = wait_until(lambda: default_mtus(c, table) == [RELAYED_MTU, RELAYED_MTU], 5, 0.1)
    assert got, f"c: table {table}: {c.host.run('ip', 'route', 'show', 'table', table)!r}"
    # What goes to the internet through d is sized for the relay: a DF ping over 1375 is refused locally.
    big = df_ping(c, mesh.signal.addr, 1360)
    err = big.stderr.decode(errors="replace") + big.stdout.decode(errors="replace")
    assert big.returncode != 0 and "message too long" in err and f"mtu={RELAYED_MTU}" in err, err
    meshwg_set(c, "--exit-node", "none")
    ok, _ = wait_until(lambda: exit_table(c) is None, 5, 0.1)
    assert ok, c.host.run("ip", "-4", "rule", "show")

    on_path(mesh, a, b, "direct")
    table = use_exit_node(mesh, a, b)
    assert default_mtus(a, table) == [None, None], a.host.run("ip", "route", "show", "table", table)
    meshwg_set(a, "--exit-node", "none")

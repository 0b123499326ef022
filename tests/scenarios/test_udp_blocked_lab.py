"""Issue 15 in the NAT lab: a node on a network that blocks UDP reaches its peer through the TCP relay quickly.

Start point: the node's "joined as" log line (its agent connected to the server and got its welcome; the relay is
configured from it). The first ping (`ping -D` every 50 ms from the start of the node) must be answered within
1.0 s of it: the UDP relay hello goes unanswered, TCP opens 0.3 s later (before: 3 s), and of the initiations
queued meanwhile only the latest goes out (two flushed together lost the handshake for WireGuard's 5 s retry
in 2 runs of 4). Then a network whose
firewall (nftables in the node's own namespace) lets out only TCP 443 and the control port: the server's TCP relay
listens on 7301 and 443, the node tries 7301, gets nothing, and reaches its peer through 443.
Wall clocks are shared with the nodes' logs (mesh_lab)."""

from __future__ import annotations

import pytest

from conftest import require_real_components
from mesh_lab import MeshLab, Pinger, logs_on_failure, wait_until  # noqa: F401 (autouse fixture)
from scenarios import node_commands as nc
from scenarios.nat import NatType
from scenarios.runner import create_invite, start_signal_server
from scenarios.topology import Lab

pytestmark = pytest.mark.netns

ONLY_443 = """table inet only443 {
  chain out {
    type filter hook output priority 0; policy drop;
    oifname "lo" accept
    meta l4proto icmp accept
    tcp dport { 443, %d } accept
  }
}
""" % nc.SIGNAL_PORT


@pytest.fixture(scope="module")
def mesh():
    require_real_components("ip", "nft", "conntrack", "ping")
    with Lab() as lab:
        m = MeshLab(lab)
        m.server = start_signal_server(m.signal, "--relay-tcp", f"{m.signal.addr}:443")
        m.invite = create_invite(m.signal)
        m.pingers = []
        yield m
        for p in m.pingers:
            p.stop()


def first_ping_after_join(mesh, name: str, nat: NatType, target_ip: str, firewall: str | None = None):
    node = mesh.add_node(name, nat, start=False)
    if firewall:
        node.host.run("nft", "-f", "-", input=firewall.encode())
    pinger = Pinger(node.host, target_ip, interval=0.05).start()
    mesh.pingers.append(pinger)
    node.start()
    joined, _ = wait_until(node.joined_at, 20)
    assert joined, f"{name} did not join within 20 s"
    first, _ = wait_until(pinger.first_reply, 15)
    assert first is not None, f"{name} never pinged {target_ip}"
    return node, first - joined


def test_udp_blocked_first_ping_within_1s_of_joining(mesh):
    a = mesh.add_node("a", NatType.PORT_RESTRICTED)
    ip_a, _ = wait_until(a.mesh_ip, 20)
    assert ip_a
    e, t = first_ping_after_join(mesh, "e", NatType.UDP_BLOCKED, ip_a)
    print(f"[udp-blocked] first ping {t:.3f} s after joining")
    st = e.status()
    assert st["relay"]["mode"] == "tcp" and st["relay"]["tcp_connected"].endswith(":7301"), st["relay"]
    assert t <= 1.0, f"first ping {t:.3f} s after the join (must be under 1 s)"


def test_only_tcp_443_out_reaches_the_peer_through_the_relay_on_443(mesh):
    ip_a = mesh.nodes["a"].mesh_ip()
    f, t = first_ping_after_join(mesh, "f", NatType.PORT_RESTRICTED, ip_a, firewall=ONLY_443)
    print(f"[only 443] first ping {t:.3f} s after joining")
    st = f.status()
    assert st["relay"]["mode"] == "tcp" and st["relay"]["tcp_connected"] == f"{mesh.signal.addr}:443", st["relay"]
    assert f.peer("a")["path"] == "relay"
    assert t <= 1.0, f"first ping {t:.3f} s after the join (must be under 1 s: 7301 silent, 443 0.25 s later)"

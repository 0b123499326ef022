"""Relays in regions (issue 14.3) in the NAT lab: the control server's relay (region "main") and a regional relay
(`meshwg-signal relay --region eu`, no database, on its own host) serve two nodes that cannot reach each other
directly (each one's firewall lets UDP out only to the servers' network). This kernel has no netem, so the regions
differ by address: b's firewall drops its UDP to the control server's host until b has chosen eu (main silent, eu
answering), then lets it through; a, with both answering alike, keeps main, the first listed. Each then reaches the
other through the other's home relay. Then the eu relay is killed by its PID under a ping every 50 ms from a to b: b moves to main, a hears
of it through the directory, and the pings keep flowing after at most 5 s without an answer."""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import require_real_components
from mesh_lab import MeshLab, Pinger, logs_on_failure, wait_until  # noqa: F401 (autouse fixture)
from scenarios import node_commands as nc
from scenarios.nat import NatType
from scenarios.runner import create_invite, start_signal_server
from scenarios.topology import INTERNET_SERVERS_NET

pytestmark = pytest.mark.netns

ONLY_SERVERS = """table inet onlyservers {
  chain out {
    type filter hook output priority 0; policy accept;
    udp dport != 53 ip daddr != %s.0/24 drop
  }
}
""" % INTERNET_SERVERS_NET


NO_UDP_TO = """table inet nomain {
  chain out {
    type filter hook output priority 0; policy accept;
    ip daddr { %s } meta l4proto udp drop
  }
}
"""


@pytest.fixture(scope="module")
def mesh():
    require_real_components("ip", "nft", "ping", "curl")
    from scenarios.topology import Lab

    with Lab() as lab:
        m = MeshLab(lab)
        eu = lab.public_host("relay-eu")
        m.relay_host = eu
        eu_udp, eu_tcp = f"{eu.addr}:{nc.STUN_PORT}", f"{eu.addr}:{nc.RELAY_TCP_PORT}"
        m.server = start_signal_server(m.signal, "--relay", f"eu={eu_udp},{eu_tcp}")
        m.invite = create_invite(m.signal)
        secret = m.admin("relay-secret", "eu").strip()
        (eu.dir / "relay.secret").write_text(secret + "\n")
        with open(eu.dir / "relay.log", "ab") as log:
            m.relay = eu.popen(nc.PY, "-m", "signal_server", "relay", "--region", "eu", "--secret-file",
                               str(eu.dir / "relay.secret"), "--udp", eu_udp, "--relay-tcp", eu_tcp,
                               "--metrics", f"{eu.addr}:9300",
                               stdout=log, stderr=subprocess.STDOUT)
        assert wait_until(lambda: "relay region eu" in (eu.dir / "relay.log").read_text(), 15)[0], \
            (eu.dir / "relay.log").read_text()
        assert not list(eu.dir.glob("*.db")), "a regional relay keeps no database"
        m.pingers = []
        yield m
        for p in m.pingers:
            p.stop()
        if m.relay.poll() is None:
            eu.stop(m.relay)


def home(node) -> str | None:
    st = node.status()
    return ((st or {}).get("relay") or {}).get("region")


def test_each_node_uses_its_nearest_relay_and_reaches_the_other_through_its_home(mesh):
    a = mesh.add_node("a", NatType.PORT_RESTRICTED, start=False)
    b = mesh.add_node("b", NatType.PORT_RESTRICTED, start=False)
    main_ips = ", ".join([mesh.signal.addr, *mesh.signal.extra_addrs])
    b.host.run("nft", "-f", "-", input=(NO_UDP_TO % main_ips).encode())
    for node in (a, b):
        node.host.run("nft", "-f", "-", input=ONLY_SERVERS.encode())
        node.start()
    assert wait_until(lambda: home(a) == "main" and home(b) == "eu", 30)[0], (home(a), home(b))
    b.host.run("nft", "delete", "table", "inet", "nomain")
    assert wait_until(lambda: all(g["latency_ms"] is not None and not g["down"]
                                  for g in b.status()["relay"]["regions"]), 15)[0], b.status()["relay"]
    ip_b, _ = wait_until(b.mesh_ip, 20)
    assert ip_b and a.ping(ip_b, count=3)
    assert a.peer("b")["path"] == "relay"
    regions = {g["region"]: g for g in a.status()["relay"]["regions"]}
    assert regions["main"]["home"] and regions["eu"]["latency_ms"] is not None, regions
    assert home(b) == "eu"
    # a's packets to b go through eu (b's home), b's to a through main (a's): each relay forwards.
    before = eu_forwarded(mesh)
    assert a.ping(ip_b, count=5, interval=0.1)
    assert wait_until(lambda: eu_forwarded(mesh) >= before + 5, 5)[0], (before, eu_forwarded(mesh))


def eu_forwarded(mesh) -> float:
    from signal_server.metrics import parse_text

    out = mesh.relay_host.run("curl", "-sf", "--max-time", "5", f"http://{mesh.relay_host.addr}:9300/metrics")
    return parse_text(out).get("meshwg_signal_forwarded_packets_total", 0.0)


def test_killing_a_relay_moves_its_nodes_and_pings_flow_again_within_5s(mesh):
    a, b = mesh.nodes["a"], mesh.nodes["b"]
    ip_b = b.mesh_ip()
    pinger = Pinger(a.host, ip_b, interval=0.05).start()
    mesh.pingers.append(pinger)
    assert wait_until(lambda: pinger.count(time.time() - 1.0, time.time()) >= 10, 15)[0], "no pings before the kill"
    t_kill = time.time()
    mesh.relay.kill()   # by its PID (Popen.kill), as a crashed host would
    mesh.relay.wait(timeout=10)
    assert wait_until(lambda: home(b) == "main", 10)[0], home(b)
    assert wait_until(lambda: pinger.count(t_kill + 5.0, time.time()) >= 20, 15)[0], "pings did not come back"
    gap_from, gap_to = pinger.longest_gap(t_kill - 1.0, t_kill + 6.0)
    gap = gap_to - gap_from
    print(f"[regions] longest gap around the kill {gap:.2f} s (from {gap_from - t_kill:+.2f} s)")
    assert gap <= 5.0, f"{gap:.2f} s without an answer (at most 5 s)"
    # 60 pings go out between 5 and 8 s after the kill: most are answered (the move is over).
    assert wait_until(lambda: pinger.count(t_kill + 5.0, t_kill + 8.0) >= 40, 15)[0], \
        f"pings not flowing 5 s after the kill: {pinger.count(t_kill + 5.0, t_kill + 8.0)} of 60 answered"

"""Phone-to-home with no relay (issue 12, item 2's end): `meshwg-signal plain add phone --to NODE --direct` gives a
stock wg-quick + wireguard-go phone (behind a symmetric carrier-grade NAT) the node's own public endpoint, and the
phone's pings are answered directly: the server's plain-WireGuard port sees none of its traffic (its /metrics plain
counters stay 0). Two ways a node gets a public endpoint:
- home sits behind a full-cone NAT: the agent's RFC 5780 probe sees endpoint-independent mapping and filtering and
  reports its reflexive address as "public";
- cabin sits behind a port-restricted NAT (Linux masquerade, which filters) with a port forward on its router (nft
  dnat) and `meshwg join --listen-port P --public-endpoint ROUTER:P`.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from conftest import require_real_components
from mesh_lab import METRICS_PORT, MeshLab, logs_on_failure, read_pcap, wait_until  # noqa: F401 (autouse fixture)
from test_plain_phone_lab import phone_host, ping, wg_quick_up

from scenarios import node_commands as nc
from scenarios.nat import NatType
from scenarios.runner import create_invite, start_signal_server
from scenarios.topology import Lab
from scenarios.wgdevice import kill_namespace_pids

pytestmark = pytest.mark.netns

CABIN_PORT = 51900     # cabin's WireGuard port, forwarded by its router
PLAIN_PORT = 51820     # the server's plain-WireGuard port


@pytest.fixture(scope="module")
def mesh():
    require_real_components("ip", "nft", "conntrack", "ping", "unshare", "wg", "wg-quick", "wireguard-go", "curl")
    with Lab() as lab:
        m = MeshLab(lab)
        m.server = start_signal_server(m.signal, "--advertise", m.signal.addr,
                                       "--metrics", f"{m.signal.addr}:{METRICS_PORT}")
        m.invite = create_invite(m.signal)
        m.phones = []
        try:
            yield m
        finally:
            for phone in m.phones:
                phone.run("wg-quick", "down", str(phone.dir / "wgp0.conf"), check=False)
                kill_namespace_pids(phone.ns)   # wireguard-go is wg-quick's daemon, not our child
            for n in m.nodes.values():
                n.stop()
            m.stop_server()


def plain_traffic(mesh) -> dict:
    """The server's plain-port counters that are not 0 (the ingress's plain_*_total and the relay's *_plain_*: any
    datagram the phone sent there, or a node sent it through the relay, moves one; /metrics omits zeros)."""
    m = mesh.metrics()
    assert "meshwg_signal_uptime_seconds" in m, m   # the server answered
    return {k: v for k, v in m.items() if k.endswith("_total") and "plain" in k and v}


def add_direct(mesh, name: str, target: str, timeout: float = 30.0) -> str:
    """`plain add NAME --to TARGET --direct`, retried until the node's public endpoint reached the server (a refusal
    writes nothing); the config printed."""
    argv = (nc.PY, "-m", "signal_server", "plain", "add", name, "--to", target, "--direct", "--db", str(mesh.db))
    last = None

    def attempt():
        nonlocal last
        last = mesh.signal.run_proc(*argv)
        return last.returncode == 0

    ok, _ = wait_until(attempt, timeout, interval=0.5)
    assert ok, f"plain add --direct refused for {timeout} s: {last.stderr.decode(errors='replace')}\n{mesh.logs()}"
    return last.stdout.decode()


def status_text(node) -> str:
    values = nc.node_values(node.host)
    res = node.host.run_proc(nc.PY, "-m", "meshwg", "status", "-d", "--state-dir", str(values["state_dir"]),
                             "--interface", values["interface"], timeout=20)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res.stdout.decode()


def check_direct(mesh, node, phone_name: str, public: str) -> None:
    home_ip, _ = wait_until(node.mesh_ip, 20)
    assert home_ip, f"{node.name} got no mesh address in 20 s\n{mesh.logs()}"
    config = add_direct(mesh, phone_name, node.name)
    endpoints = re.findall(r"^Endpoint = (\S+)$", config, re.M)
    assert endpoints == [public], config
    assert plain_traffic(mesh) == {}
    phone = phone_host(mesh, phone_name)
    pcap = mesh.signal.dir / f"{phone_name}.pcap"
    cap = mesh.signal.popen("tcpdump", "-i", "eth0", "-U", "-n", "-s", "128", "-w", str(pcap), "udp",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert "listening" in cap.stderr.readline().decode(errors="replace")
    try:
        wg_quick_up(mesh, phone, config)
        ok, _ = wait_until(lambda: ping(phone, home_ip), 15)
        assert ok, f"the phone got no answer from {node.name} ({home_ip}) at {public} in 15 s\n{mesh.logs()}"
        assert ping(phone, home_ip, count=10, interval=0.05), "pings lost phone -> home"
    finally:
        time.sleep(0.3)
        mesh.signal.stop(cap)
    on_plain_port = [p for p in read_pcap(pcap) if PLAIN_PORT in (p[2], p[4])]
    assert on_plain_port == [], f"{len(on_plain_port)} datagrams on the server's plain port"
    st = node.peer(phone_name)
    assert st is not None and st["plain"] and st["path"] == "direct", st
    assert st["endpoint"] and st["endpoint"].split(":")[0] == phone.router.public_ip, st
    assert re.search(rf"peer {phone_name} .*\n(?:.*\n)*?    path: plain \(direct\) {re.escape(st['endpoint'])}",
                     status_text(node)), status_text(node)
    assert plain_traffic(mesh) == {}, "the server's plain port saw the phone"


def test_a_phone_reaches_home_behind_a_full_cone_nat_directly(mesh):
    home = mesh.add_node("home", NatType.FULL_CONE)
    ok, _ = wait_until(lambda: ((home.status() or {}).get("routing") or {}).get("public_candidates"), 30)
    assert ok, f"home never reported a public endpoint behind its full-cone NAT\n{mesh.logs()}"
    public = home.status()["routing"]["public_candidates"][0]
    assert public.split(":")[0] == home.router.public_ip
    check_direct(mesh, home, "phone", public)


def test_a_phone_reaches_cabin_through_its_port_forward(mesh):
    cabin = mesh.add_node("cabin", NatType.PORT_RESTRICTED, start=False)
    router = cabin.router
    router.ns.run("nft", "add", "rule", "ip", "labnat", "pre", "iifname", "wan0", "udp", "dport", str(CABIN_PORT),
                  "dnat", "ip", "to", f"{cabin.host.addr}:{CABIN_PORT}")
    public = f"{router.public_ip}:{CABIN_PORT}"
    cabin.start("--listen-port", str(CABIN_PORT), "--public-endpoint", public)
    ok, _ = wait_until(lambda: ((cabin.status() or {}).get("routing") or {}).get("public_endpoint") == public, 20)
    assert ok, f"cabin does not hold its --public-endpoint\n{mesh.logs()}"
    check_direct(mesh, cabin, "phone2", public)
    # `meshwg set --public-endpoint none`: cabin stops reporting it, and the server no longer offers it
    values = nc.node_values(cabin.host)
    cabin.host.run(nc.PY, "-m", "meshwg", "set", "--public-endpoint", "none", "--state-dir", str(values["state_dir"]),
                   "--interface", values["interface"])
    argv = (nc.PY, "-m", "signal_server", "plain", "config", "phone2", "--direct", "--db", str(mesh.db))
    ok, _ = wait_until(lambda: mesh.signal.run_proc(*argv).returncode == 2, 10, interval=0.2)
    assert ok, f"the server still offers cabin's public endpoint after `set --public-endpoint none`\n{mesh.logs()}"
    assert "'cabin'" in mesh.signal.run_proc(*argv).stderr.decode()

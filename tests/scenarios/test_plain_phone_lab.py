"""Phone-to-home with what a real phone runs: stock `wg-quick` + `wireguard-go` (the official apps' stack) behind a
symmetric carrier-grade NAT, configured with nothing but the config decoded back from the QR code the server
printed, reaches the home node (behind its own NAT, running `meshwg join`) through the server's plain-WireGuard
port (issue 12). Nobody decrypts on the way: the capture on the server shows only WireGuard messages.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from conftest import require_real_components
from mesh_lab import MeshLab, logs_on_failure, read_pcap, wait_until  # noqa: F401 (autouse fixture)

from scenarios.nat import NatType
from scenarios.runner import create_invite, start_signal_server
from scenarios.topology import Host, Lab
from scenarios.wgdevice import kill_namespace_pids

PR, SYM = NatType.PORT_RESTRICTED, NatType.SYMMETRIC
PLAIN_PORT = 51820
PATTERN = "6d6573687767212a"     # "meshwg!*": the ping payload that must never show in a capture
USERSPACE = ("env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
             "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1")


@pytest.fixture(scope="module")
def mesh():
    require_real_components("ip", "nft", "conntrack", "ping", "unshare", "wg", "wg-quick", "wireguard-go",
                            "zbarimg", "tcpdump", "iperf3")
    with Lab() as lab:
        m = MeshLab(lab)
        m.server = start_signal_server(m.signal, "--advertise", m.signal.addr)
        m.invite = create_invite(m.signal)
        phones: list[Host] = []
        m.phones = phones
        try:
            yield m
        finally:
            for phone in phones:
                phone.run("wg-quick", "down", str(phone.dir / "wgp0.conf"), check=False)
                kill_namespace_pids(phone.ns)   # wireguard-go is wg-quick's daemon, not our child
            for n in m.nodes.values():
                n.stop()
            m.stop_server()


def phone_host(mesh, name: str) -> Host:
    """A phone on Wi-Fi behind a home router behind the carrier's symmetric CGNAT."""
    cgnat = mesh.lab.router(f"cg-{name}", SYM, cgn=True)
    wifi = mesh.lab.router(f"wf-{name}", PR, upstream=cgnat)
    return mesh.lab.host(name, wifi)


def wg_quick_up(mesh, phone: Host, config: str) -> None:
    conf = phone.dir / "wgp0.conf"        # wg-quick names the interface after the file
    conf.write_text(config)
    conf.chmod(0o600)
    mesh.phones.append(phone)
    phone.run(*USERSPACE, "wg-quick", "up", str(conf))


def ping(host: Host, ip: str, count: int = 1, wait: float = 1.0, interval: float = 0.2) -> bool:
    out = host.run("ping", "-c", str(count), "-W", str(wait), "-i", str(interval), "-p", PATTERN, ip, check=False)
    return f"{count} received" in out


def qr_config(mesh, *args: str) -> tuple[str, str]:
    """(printed config, the config zbarimg decodes from the PNG `plain add --qr-png` wrote)."""
    png = mesh.signal.dir / f"qr-{time.monotonic_ns()}.png"
    printed = mesh.admin("plain", *args, "--qr-png", str(png))
    decoded = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True, timeout=20)
    assert decoded.returncode == 0, decoded.stderr
    return printed, decoded.stdout


@pytest.fixture(scope="module")
def home(mesh):
    """home (meshwg join) behind its router, advertising the router's LAN, where a NAS runs no meshwg; the route
    and home as an exit node approved by the administrator."""
    node = mesh.add_node("home", PR, start=False)
    lan = f"{node.router.lan_prefix}.0/24"
    node.start("--advertise-routes", lan, "--advertise-exit-node")
    ip, _ = wait_until(node.mesh_ip, 20)
    assert ip, f"home got no mesh address in 20 s\n{mesh.logs()}"
    mesh.nas = mesh.lab.host("nas", node.router)
    ok, _ = wait_until(lambda: "pending" in mesh.admin("routes", "list"), 10)
    assert ok, mesh.admin("routes", "list")
    mesh.admin("routes", "approve", "home", lan)
    mesh.admin("routes", "approve", "home", "exit")
    return node, ip


def test_a_stock_wireguard_phone_reaches_home_from_its_qr_code(mesh, home):
    node, home_ip = home
    printed, decoded = qr_config(mesh, "add", "phone", "--to", "home")
    assert decoded.strip() == printed.strip()
    assert re.search(rf"Endpoint = {re.escape(mesh.signal.addr)}:{PLAIN_PORT}", decoded)
    assert f"{node.router.lan_prefix}.0/24" in decoded       # the approved route is in home's AllowedIPs
    phone = phone_host(mesh, "phone")
    wg_quick_up(mesh, phone, decoded)

    t_up = time.monotonic()
    ok, t_first = wait_until(lambda: ping(phone, home_ip), 15)
    assert ok, f"the phone got no answer from home ({home_ip}) in 15 s\n{mesh.logs()}"
    first_answer = time.monotonic() - t_up
    handshake = phone.run("wg", "show", "wgp0", "latest-handshakes").split()
    assert len(handshake) == 2 and int(handshake[1]) > 0
    st = node.peer("phone")
    assert st is not None and st.get("plain") and st["path"] == "relay", st
    print(f"phone (stock wg-quick + wireguard-go behind {phone.nat_label}): first answered ping "
          f"{first_answer:.2f} s after wg-quick up")

    # Only WireGuard on the wire: the ping pattern never shows in what the server sees or sends.
    pcap = mesh.signal.dir / "plain.pcap"
    cap = mesh.signal.popen("tcpdump", "-i", "eth0", "-U", "-n", "-s", "2048", "-w", str(pcap), "udp",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert "listening" in cap.stderr.readline().decode(errors="replace")
    try:
        assert ping(phone, home_ip, count=20, interval=0.05), "pings lost phone -> home"
    finally:
        time.sleep(0.3)
        mesh.signal.stop(cap)
    payloads = [(sport, dport, p) for _, _, sport, _, dport, p in read_pcap(pcap)]
    plain = [p for sport, dport, p in payloads if PLAIN_PORT in (sport, dport)]
    # 20 requests and 20 replies cross the plain port; the capture may miss a few at its edges
    assert len(plain) >= 20, f"expected the pings on the plain port, saw {len(plain)} datagrams"
    assert all(len(p) >= 4 and 1 <= p[0] <= 4 and p[1:4] == b"\0\0\0" for p in plain)
    needle = bytes.fromhex(PATTERN)
    assert not any(needle in p for _, _, p in payloads), "plaintext ping payload seen on the server"

    # The home LAN through the approved subnet route: the NAS runs no meshwg and sees home's address.
    ok, _ = wait_until(lambda: ping(phone, mesh.nas.addr), 10)
    assert ok, f"the phone cannot reach the NAS {mesh.nas.addr} on home's LAN\n{mesh.logs()}"

    # A TCP transfer completes.
    server = node.host.popen("iperf3", "-s", "-1", "-B", home_ip, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = phone.run("iperf3", "-c", home_ip, "-t", "2", "-f", "m", timeout=30)
        rate = float(re.findall(r"([\d.]+) Mbits/sec\s+\d*\s*receiver", out)[-1])
        print(f"phone -> home TCP through the relay: {rate:.0f} Mbit/s")
        assert rate > 0
    finally:
        node.host.stop(server)


def test_the_phone_recovers_after_its_nat_forgets_the_mapping(mesh, home):
    node, home_ip = home
    phone = next(p for p in mesh.phones if p.name == "phone")
    assert ping(phone, home_ip, count=3, interval=0.1)
    for router in (phone.router, phone.router.upstream):
        router.flush_conntrack()
    t0 = time.monotonic()
    ok, _ = wait_until(lambda: ping(phone, home_ip), 10)
    assert ok, f"no answer 10 s after the phone's NATs forgot their mappings\n{mesh.logs()}"
    print(f"phone after a conntrack flush of both NATs: answered again after {time.monotonic() - t0:.2f} s")


def test_a_plain_peer_that_may_not_reach_home_gets_nothing_through(mesh, home):
    """A second phone may reach only the laptop. It writes home's public key into its config by hand: the server
    forwards the initiation (mac1 names home, a target of another phone), and home's WireGuard, which holds only
    the plain peers allowed to reach it, answers nothing."""
    node, home_ip = home
    laptop = mesh.add_node("laptop", PR)
    laptop_ip, _ = wait_until(laptop.mesh_ip, 20)
    assert laptop_ip
    printed, decoded = qr_config(mesh, "add", "stranger", "--to", "laptop")
    home_key = node.status()["public_key"]
    decoded += f"\n[Peer]\nPublicKey = {home_key}\nAllowedIPs = {home_ip}/32\n" \
               f"Endpoint = {mesh.signal.addr}:{PLAIN_PORT}\nPersistentKeepalive = 25\n"
    stranger = phone_host(mesh, "stranger")
    wg_quick_up(mesh, stranger, decoded)
    ok, _ = wait_until(lambda: ping(stranger, laptop_ip), 15)
    assert ok, f"the stranger's own tunnel to the laptop does not work\n{mesh.logs()}"
    assert not ping(stranger, home_ip, count=3, wait=2), "a plain peer reached a node it may not reach"
    assert node.peer("stranger") is None and laptop.peer("stranger") is not None



def test_a_full_tunnel_phone_goes_out_through_home(mesh, home):
    """`plain add --exit-node home`: AllowedIPs 0.0.0.0/0, ::/0 on home's peer (wg-quick's fwmark policy routing on
    the phone); a host on the internet sees the phone's traffic come from home's public address."""
    node, home_ip = home
    printed, decoded = qr_config(mesh, "add", "traveller", "--to", "home", "--exit-node", "home")
    assert re.search(r"AllowedIPs = 0\.0\.0\.0/0, ::/0", decoded), decoded
    web = mesh.lab.public_host("web")
    log = web.dir / "http.log"
    with open(log, "wb") as out:   # the HTTP server logs each client's address
        server = web.popen(sys.executable, "-m", "http.server", "8080", "--bind", web.addr, stdout=out,
                           stderr=subprocess.STDOUT)
    traveller = phone_host(mesh, "traveller")
    wg_quick_up(mesh, traveller, decoded)
    try:
        ok, _ = wait_until(lambda: ping(traveller, web.addr), 15)
        assert ok, f"the full-tunnel phone cannot reach {web.addr}\n{mesh.logs()}"
        assert ping(traveller, home_ip)
        got = traveller.run("curl", "-sf", "--max-time", "10", f"http://{web.addr}:8080/", timeout=20)
        assert "Directory listing" in got
    finally:
        web.stop(server)
    clients = set(re.findall(r"^(\d+\.\d+\.\d+\.\d+) - - ", log.read_text(), re.M))
    assert clients == {node.router.public_ip}, f"the web host saw {clients}, home is {node.router.public_ip}, " \
                                               f"the phone's own NAT {traveller.router.public_ip}"

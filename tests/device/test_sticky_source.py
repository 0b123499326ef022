"""Sticky source addresses (issue 17): a device answers each peer from the local address that peer wrote
to, in the compiled drain and the pure-Python one, and forgets an address that is gone.

On loopback, 127.0.0.1 and 127.0.0.2 are both ours (127.0.0.0/8 on lo); the kernel's own choice for an
answer to 127.0.0.1 is 127.0.0.1. In namespaces: the stock `wg` and wireguard-go against meshwg-tun whose
namespace holds two IPv4 and two IPv6 addresses on one interface.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

from conftest import require_real_components  # tests/conftest.py
from meshwg.io.dataplane import _fastio, socket_filter, udp
from meshwg.io.dataplane import driver as driver_module
from meshwg.io.dataplane.driver import Driver
from meshwg.io.dataplane.udp import UdpBind

SO_RXQ_OVFL = 40
TRANSPORT = b"\x04\0\0\0" + bytes(60)  # transport-data shaped: may go out as a GSO run


@pytest.fixture
def device():
    """A device's sockets (wildcard, both families, GRO and pktinfo on) and a driver sending from them."""
    bind = UdpBind()
    bind.open(0)
    driver = Driver(core=None, tun=None, udp=bind)
    driver._gso_ok = {s.fileno(): True for s in bind.sockets}
    yield bind, driver
    bind.close()


@pytest.fixture
def peer4():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def _drain(bind: UdpBind, sock: socket.socket) -> list:
    """The first non-empty batch (loopback delivery is synchronous, but be patient anyway)."""
    for _ in range(1000):
        got = udp.recv_batch(sock, 64, sock.family == socket.AF_INET6, bind.sources)
        if got:
            return got
    return []


def _hear(sock: socket.socket, count: int) -> list:
    return [sock.recvfrom(4096) for _ in range(count)]


def test_an_answer_leaves_from_the_address_the_peer_wrote_to(impl, device, peer4):
    """Old code: every answer from 127.0.0.1, the kernel's choice, whichever address the peer wrote to."""
    bind, driver = device
    for local in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
        peer4.sendto(b"\x01\0\0\0" + bytes(144), (local, bind.port))
        [(_, addr)] = _drain(bind, bind.v4)
        assert addr == peer4.getsockname()
        assert driver._send_datagrams([(TRANSPORT, addr)], 0) == 1
        assert _hear(peer4, 1) == [(TRANSPORT, (local, bind.port))]
        # a GSO run (one sendmsg, the kernel cuts it apart) carries the source too
        assert driver._send_datagrams([(TRANSPORT, addr)] * 5, 0) == 5
        assert _hear(peer4, 5) == [(TRANSPORT, (local, bind.port))] * 5
        # and so do STUN, discovery and relay frames (the mesh agent's send_raw)
        assert driver.send_raw(b"MWDsco" + bytes(40), addr)
        assert _hear(peer4, 1) == [(b"MWDsco" + bytes(40), (local, bind.port))]
        assert bind.sources[addr][:2] == (local, 1)  # lo is interface 1
    assert driver.counters["disable_gso"] == 0 and driver.counters["drop_send_error"] == 0


def test_the_steady_state_reuses_the_entry(impl, device, peer4):
    """A bulk stream from one peer to one address rebuilds nothing per datagram."""
    bind, _ = device
    peer4.sendto(b"a", ("127.0.0.2", bind.port))
    [(_, addr)] = _drain(bind, bind.v4)
    entry = bind.sources[addr]
    for _ in range(3):
        peer4.sendto(b"b", ("127.0.0.2", bind.port))
        assert _drain(bind, bind.v4) == [(b"b", addr)]
        assert bind.sources[addr] is entry


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_a_coalesced_read_keeps_its_gro_size_and_its_source_beside_a_drop_count(impl, device, family):
    """Three cmsgs on one read (the GRO size, the pktinfo, SO_RXQ_OVFL's drop count once the socket
    filter dropped junk): none is cut off, the read is split and its source remembered."""
    bind, _ = device
    local = "127.0.0.2" if family == socket.AF_INET else "::1"
    sock = bind.v4 if family == socket.AF_INET else bind.v6
    socket_filter.attach(sock, socket_filter.program(None))
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    with socket.socket(family, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        peer.sendto(b"junk that fits no protocol", (local, bind.port))
        assert udp.socket_drops(sock) == 1
        segments = [b"\x04\0\0\0" + bytes([i]) * 96 for i in range(4)] + [b"\x04\0\0\0tail"]
        peer.sendmsg([b"".join(segments)], [(udp.SOL_UDP, udp.UDP_SEGMENT, (100).to_bytes(2, sys.byteorder))], 0,
                     (local, bind.port))
        got = _drain(bind, sock)
        got += _drain(bind, sock) if len(got) < len(segments) else []
        assert [data for data, _ in got] == segments
        assert bind.sources[peer.getsockname()[:2]][0] == local


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_an_address_that_is_gone_is_forgotten_and_the_kernel_chooses(impl, device, family):
    """A remembered address that is no longer ours (removed: the send fails with ENETUNREACH for IPv4,
    EINVAL for IPv6): the entry goes, every datagram still arrives (single and GSO runs), from the
    kernel's choice, and no send is counted lost nor GSO turned off."""
    bind, driver = device
    host, gone = ("127.0.0.1", "192.0.2.1") if family == socket.AF_INET else ("::1", "fd00:dead::1")
    sock = bind.v4 if family == socket.AF_INET else bind.v6
    peer = socket.socket(family, socket.SOCK_DGRAM)
    peer.bind((host, 0))
    peer.settimeout(2)
    try:
        peer.sendto(b"hello", (host, bind.port))
        [(_, addr)] = _drain(bind, sock)
        assert bind.sources[addr][0] == host
        for run in (1, 5):
            bind.sources[addr] = _planted(family, gone)
            assert driver._send_datagrams([(TRANSPORT, addr)] * run, 0) == run
            assert [(d, a[:2]) for d, a in _hear(peer, run)] == [(TRANSPORT, (host, bind.port))] * run
            assert addr not in bind.sources
        bind.sources[addr] = _planted(family, gone)
        assert driver.send_raw(b"stun", addr)
        assert peer.recvfrom(64)[0] == b"stun" and addr not in bind.sources
        assert driver.counters["drop_send_error"] == 0 and driver.counters["disable_gso"] == 0
    finally:
        peer.close()


def _planted(family: int, host: str) -> tuple:
    """An entry naming `host` as the local address (as if it had been ours)."""
    packed = socket.inet_pton(family, host)
    if family == socket.AF_INET:
        return host, 1, (socket.IPPROTO_IP, udp.IP_PKTINFO, bytes(4) + packed + bytes(4))
    return host, 1, (socket.IPPROTO_IPV6, udp.IPV6_PKTINFO, packed + bytes(4))


def test_the_map_is_bounded(impl, device):
    """Datagrams from 4,097 sources (spoofed ones cost the same): the map never holds more than 4,096."""
    bind, _ = device
    largest = 0
    for i in range(4097):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((f"127.1.{i // 256}.{i % 256}", 0))  # one address each: distinct sources
            s.sendto(b"x", ("127.0.0.2", bind.port))
        if i % 128 == 127 or i == 4096:
            while udp.recv_batch(bind.v4, 256, False, bind.sources):
                largest = max(largest, len(bind.sources))
    assert 0 < largest <= 4096
    assert len(bind.sources) <= 4096


def test_sockets_without_pktinfo_and_no_map_work_as_before(impl, peer4):
    """The birthday sockets (no pktinfo) and callers passing no map: plain datagrams, nothing remembered."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    try:
        peer4.sendto(b"x", rx.getsockname())
        sources: dict = {}
        for _ in range(1000):
            if got := udp.recv_batch(rx, 8, False, sources):
                break
        assert got == [(b"x", peer4.getsockname())] and sources == {}
        peer4.sendto(b"y", rx.getsockname())
        for _ in range(1000):
            if got := udp.recv_batch(rx, 8, False):
                break
        assert got == [(b"y", peer4.getsockname())]
    finally:
        rx.close()


# ---- the case: the stock `wg` and wireguard-go against meshwg-tun, in namespaces -------------

# meshwg's namespace holds two addresses of each family on one interface (eth0): .1 and .3. Per family,
# the one the kernel chooses to answer 192.168.94.2 / fd00:94::2 from (the primary IPv4 address; for IPv6
# the longest common prefix) first, then the other: the removal test removes the other one.
MESHWG_ADDRS = {4: ("192.168.94.1", "192.168.94.3"), 6: ("fd00:94::3", "fd00:94::1")}
MESHWG_PORT = 51820


def _endpoint(host: str) -> str:
    return f"[{host}]:{MESHWG_PORT}" if ":" in host else f"{host}:{MESHWG_PORT}"


@pytest.fixture(scope="module", params=["compiled", "python"])
def multihomed(request):
    """meshwg-tun (compiled hot path, or MESHWG_PURE_PYTHON=1) in namespace a with 192.168.94.1 and .3,
    fd00:94::1 and ::3 on eth0; wireguard-go in b, configured with the stock `wg`, which sets meshwg's
    endpoint. meshwg has no endpoint for it: it answers whatever address b writes to."""
    from wgnet import ENV, Pair

    require_real_components("wireguard-go", "wg", "ip", "ping")
    pair = Pair(94)
    try:
        pair.a.run("ip", "-4", "addr", "add", "192.168.94.3/24", "dev", "eth0")
        pair.a.run("ip", "-6", "addr", "add", "fd00:94::3/64", "dev", "eth0", "nodad")
        env = {**ENV, "MESHWG_PURE_PYTHON": "1"} if request.param == "python" else None
        m = pair.device(pair.a, "meshwg", MESHWG_PORT, 1, env=env)
        g = pair.device(pair.b, "wggo", 51821, 2)
        m.add_peer(g, ["10.94.0.2/32", "fd94::2/128"])
        g.add_peer(m, ["10.94.0.1/32", "fd94::1/128"], _endpoint(MESHWG_ADDRS[4][0]))
        yield pair, m, g
    finally:
        pair.close()


def _endpoint_seen_by(g, m) -> str:
    """What `wg show <iface> endpoints` says of meshwg on the other side."""
    for line in g.wg("show", g.iface, "endpoints").splitlines():
        key, _, endpoint = line.partition("\t")
        if key == m.pk:
            return endpoint.strip()
    return ""


def _write_to(pair, m, g, host: str) -> None:
    """The other side sets meshwg's endpoint to `host` and pings through the tunnel."""
    from wgnet import ping

    g.wg("set", g.iface, "peer", m.pk, "endpoint", _endpoint(host))
    assert ping(pair.b, "10.94.0.1")
    assert ping(pair.b, "fd94::1")


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_wg_sees_meshwg_answer_from_each_address_it_writes_to(multihomed, family):
    """Old code: meshwg answered from the kernel's choice (192.168.94.1, fd00:94::3) whichever address
    the other side wrote to, and wireguard-go roamed to it."""
    pair, m, g = multihomed
    chosen, other = MESHWG_ADDRS[family]
    for host in (other, chosen, other):
        _write_to(pair, m, g, host)
        assert _endpoint_seen_by(g, m) == _endpoint(host)


@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_removing_the_address_in_use_moves_traffic_to_another(multihomed, family):
    """The address the other side writes to is removed: meshwg's next datagrams (its own pings) leave
    from another address, the other side roams to it, and traffic flows both ways again."""
    from wgnet import ping

    pair, m, g = multihomed
    keep, gone = MESHWG_ADDRS[family]
    prefix = "/24" if family == 4 else "/64"
    _write_to(pair, m, g, gone)
    assert _endpoint_seen_by(g, m) == _endpoint(gone)
    pair.a.run("ip", f"-{family}", "addr", "del", gone + prefix, "dev", "eth0")
    try:
        assert ping(pair.a, "10.94.0.2")
        assert ping(pair.a, "fd94::2")
        assert _endpoint_seen_by(g, m) == _endpoint(keep)
        assert ping(pair.b, "10.94.0.1")
    finally:
        pair.a.run("ip", f"-{family}", "addr", "add", gone + prefix, "dev", "eth0",
                   *(["nodad"] if family == 6 else []))


LINK_LOCAL_PROBE = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from meshwg.io.dataplane import _fastio, udp
from meshwg.io.dataplane import driver as driver_module
from meshwg.io.dataplane.driver import Driver
heard = []
for impl in (_fastio, None):
    udp.fastio = driver_module.fastio = impl
    bind = udp.UdpBind()
    bind.open(0)
    driver = Driver(core=None, tun=None, udp=bind)
    peer = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    peer.bind(("fe80::1%la", 0, 0, socket.if_nametoindex("la")))
    peer.settimeout(2)
    for local in ("fe80::2", "fe80::3", "fe80::2"):
        peer.sendto(b"hello", (local + "%la", bind.port))
        for _ in range(1000):
            if got := udp.recv_batch(bind.v6, 8, True, bind.sources):
                break
        driver._send_datagrams([(b"\\x04\\0\\0\\0" + bytes(28), got[0][1])], 0)
        heard.append(peer.recvfrom(64)[1][0].partition("%")[0])
    bind.close()
    peer.close()
print(" ".join(heard))
"""


@pytest.mark.netns
def test_a_link_local_address_is_answered_from_on_its_interface():
    """Two link-local addresses on one interface (fe80::2, fe80::3 on lb; the kernel's choice towards
    fe80::1 is fe80::3): an answer leaves from the one written to, in both implementations. Its entry
    keeps the interface index, the scope a link-local source needs."""
    from scenarios.netns import Netns

    require_real_components("ip")
    with Netns("sticky") as ns:
        ns.run("ip", "link", "add", "la", "type", "veth", "peer", "name", "lb")
        for name, addrs in (("la", ["fe80::1/64"]), ("lb", ["fe80::2/64", "fe80::3/64"])):
            for addr in addrs:
                ns.run("ip", "-6", "addr", "add", addr, "dev", name, "nodad")
            ns.run("ip", "link", "set", name, "up")
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        heard = ns.run(sys.executable, "-c", LINK_LOCAL_PROBE, repo).split()
    assert heard == ["fe80::2", "fe80::3", "fe80::2"] * 2

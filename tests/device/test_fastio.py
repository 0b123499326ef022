"""The TUN/UDP drain: the compiled module (meshwg/io/dataplane/_fastio.c) and the pure-Python paths it
replaces behave the same, on real fds (a SOCK_SEQPACKET pair keeps packet boundaries as a TUN
does; UDP on loopback, with GRO)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_real_components  # tests/conftest.py
from meshwg.io.dataplane import _fastio, tun, udp
from meshwg.io.dataplane.fastio import fastio
from meshwg.io.dataplane.tun import Tun, TunClosed


def test_the_compiled_module_is_the_one_in_use():
    if os.environ.get("MESHWG_PURE_PYTHON") == "1":
        assert fastio is None
    else:
        assert fastio is _fastio, "meshwg/io/dataplane/_fastio.c was not built (gcc; scripts/setup)"


@pytest.fixture
def packet_pair():
    """(device side, kernel side): what the kernel side sends, the device side reads as packets."""
    device_side, kernel_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device_side.setblocking(False)
    kernel_side.setblocking(False)
    yield device_side, kernel_side
    for sock in (device_side, kernel_side):
        sock.close()


def test_read_batch_keeps_packets_and_honours_the_limit(impl, packet_pair):
    device_side, kernel_side = packet_pair
    dev = Tun(device_side.fileno(), "test0")
    assert dev.read_batch(64) == []
    packets = [bytes([i]) * (20 + i) for i in range(5)]
    for pkt in packets:
        kernel_side.send(pkt)
    assert dev.read_batch(2) == packets[:2]
    assert dev.read_batch(64) == packets[2:]
    assert dev.read_batch(64) == []


def test_read_batch_reports_a_closed_device(impl, packet_pair):
    device_side, kernel_side = packet_pair
    dev = Tun(device_side.fileno(), "test0")
    kernel_side.send(b"last")
    kernel_side.close()
    assert dev.read_batch(64) == [b"last"]
    with pytest.raises(TunClosed):
        dev.read_batch(64)


def test_write_batch_counts_what_the_kernel_refuses(impl, packet_pair):
    device_side, kernel_side = packet_pair
    dev = Tun(device_side.fileno(), "test0")
    dev.write_batch([b"one", b"two"])
    assert [kernel_side.recv(100), kernel_side.recv(100)] == [b"one", b"two"]
    assert dev.write_drops == 0
    device_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    dev.write_batch([bytes(1000)] * 200)  # more than the queue holds: the rest would block
    assert 0 < dev.write_drops < 200


def test_write_batch_reports_a_closed_device(impl):
    dev = Tun(*_closed_fd(), "test0")
    with pytest.raises(TunClosed):
        dev.write_batch([b"x"])


def _closed_fd() -> tuple[int]:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return (w,)


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def udp_pair(request):
    family = request.param
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    rx.bind((host, 0))
    tx.bind((host, 0))
    rx.setblocking(False)
    yield rx, tx
    rx.close()
    tx.close()


def test_recv_batch_returns_datagrams_with_their_source(impl, udp_pair):
    rx, tx = udp_pair
    assert udp.recv_batch(rx, 64) == []
    sent = [b"a", b"", b"ccc" * 300]
    for data in sent:
        tx.sendto(data, rx.getsockname())
    got = _drain(rx, 2)
    got += _drain(rx, 64)
    source = tx.getsockname()[:2]
    assert got == [(data, source) for data in sent]
    assert all(type(addr) is tuple and len(addr) == 2 for _, addr in got)
    if impl == "compiled":  # one tuple object per source: GSO runs compare it by identity first
        assert got[0][1] is got[2][1]


def test_recv_batch_splits_coalesced_reads(impl, udp_pair):
    rx, tx = udp_pair
    rx.setsockopt(udp.SOL_UDP, udp.UDP_GRO, 1)
    segments = [bytes([i]) * 100 for i in range(4)] + [b"tail"]
    tx.sendmsg([b"".join(segments)], [(udp.SOL_UDP, udp.UDP_SEGMENT, (100).to_bytes(2, sys.byteorder))], 0,
               rx.getsockname())
    assert [data for data, _ in _drain(rx, 64)] == segments


def test_recv_batch_on_a_closed_socket_raises(impl, udp_pair):
    rx, _ = udp_pair
    rx.close()
    with pytest.raises(OSError):
        udp.recv_batch(rx, 64)


def _drain(sock: socket.socket, limit: int) -> list:
    """The first non-empty batch (loopback delivery is synchronous, but be patient anyway)."""
    for _ in range(1000):
        got = udp.recv_batch(sock, limit)
        if got:
            return got
    return []


@pytest.fixture
def receivers():
    """One receiving socket per family on loopback (no GRO: GSO runs arrive cut apart)."""
    socks = {}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        socks[family] = sock
    yield socks
    for sock in socks.values():
        sock.close()


@pytest.fixture
def senders():
    socks = {family: socket.socket(family, socket.SOCK_DGRAM) for family in (socket.AF_INET, socket.AF_INET6)}
    yield socks
    for sock in socks.values():
        sock.close()


def _received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "plain"])
def test_send_datagrams_delivers_runs_and_mixed_endpoints(receivers, senders, gso):
    dest4 = receivers[socket.AF_INET].getsockname()[:2]
    dest6 = receivers[socket.AF_INET6].getsockname()[:2]
    run = [(b"\x04" + bytes([i]) * 99, dest4) for i in range(10)] + [(b"\x04short", dest4)]
    other_size = [(b"\x04" + bytes(59), dest4)]
    equal_not_identical = [(b"\x04" + bytes([7]) * 99, (dest6[0], dest6[1])) for _ in range(3)]
    datagrams = run + other_size + equal_not_identical + [(b"", dest4)]
    index, status, errors = _fastio.send_datagrams(datagrams, 0, senders[socket.AF_INET].fileno(),
                                                   senders[socket.AF_INET6].fileno(), gso, gso)
    assert (index, status, errors) == (len(datagrams), _fastio.SENT_ALL, 0)
    assert _received(receivers[socket.AF_INET]) == [d for d, a in datagrams if a is dest4 or a == dest4]
    assert _received(receivers[socket.AF_INET6]) == [d for d, _ in equal_not_identical]


def test_send_datagrams_hands_back_what_it_cannot_send(receivers, senders):
    dest4 = receivers[socket.AF_INET].getsockname()[:2]
    relay_endpoint = object()
    datagrams = [(b"a", dest4), (b"b", relay_endpoint), (b"c", ("fe80::1%lo", 9)), (b"d", ("not-an-ip", 9)),
                 (b"e", ("::1", 9)), (b"f", dest4)]
    fd4 = senders[socket.AF_INET].fileno()
    assert _fastio.send_datagrams(datagrams, 0, fd4, -1, True, True) == (1, _fastio.NEEDS_PYTHON, 0)
    for start in (1, 2, 3, 4):  # relay object, scoped IPv6 host, a name, a family without a socket
        assert _fastio.send_datagrams(datagrams, start, fd4, -1, True, True) == (start, _fastio.NEEDS_PYTHON, 0)
    assert _fastio.send_datagrams(datagrams, 5, fd4, -1, True, True) == (6, _fastio.SENT_ALL, 0)
    assert _received(receivers[socket.AF_INET]) == [b"a", b"f"]


def test_send_datagrams_counts_what_the_kernel_refuses(senders):
    # Broadcast without SO_BROADCAST: EACCES, lost as on a wire, and the rest still goes out.
    fd4 = senders[socket.AF_INET].fileno()
    datagrams = [(b"x" * 10, ("255.255.255.255", 9))] * 3
    assert _fastio.send_datagrams(datagrams, 0, fd4, -1, False, False) == (3, _fastio.SENT_ALL, 3)
    assert _fastio.send_datagrams(datagrams, 0, -1, -1, False, False) == (0, _fastio.NEEDS_PYTHON, 0)
    assert _fastio.send_datagrams([], 0, fd4, -1, True, True) == (0, _fastio.SENT_ALL, 0)


_odd_values = st.one_of(st.none(), st.integers(-2**70, 2**70), st.text(max_size=50), st.binary(max_size=50),
                        st.tuples(st.text(max_size=40), st.integers(-5, 70000)), st.tuples(st.integers()),
                        st.lists(st.integers(), max_size=3))


@given(st.lists(st.one_of(_odd_values, st.tuples(_odd_values, _odd_values)), max_size=8))
def test_send_datagrams_survives_any_list(datagrams):
    """Whatever the list holds, the C side answers (sends, hands back or raises), never crashes.
    No socket is given (fd -1), so nothing leaves this machine."""
    index, status, errors = _fastio.send_datagrams(datagrams, 0, -1, -1, True, True)
    assert 0 <= index <= len(datagrams) and errors == 0
    assert status == (_fastio.SENT_ALL if index == len(datagrams) else _fastio.NEEDS_PYTHON)


SO_NO_CHECK = 11  # a UDP socket without checksums cannot use GSO: the kernel answers EINVAL


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_socket_that_cannot_segment_falls_back_to_plain_datagrams(receivers, monkeypatch, compiled):
    """The driver turns GSO off for a socket the kernel refuses to segment on, counts it once, and
    still delivers every datagram (the refused run included)."""
    from meshwg.io.dataplane import driver as driver_module
    from meshwg.io.dataplane.driver import Driver
    from meshwg.io.dataplane.udp import UdpBind

    monkeypatch.setattr(driver_module, "fastio", _fastio if compiled else None)
    bind = UdpBind()
    bind.v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        bind.v4.setblocking(False)
        bind.v4.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        driver = Driver(core=None, tun=None, udp=bind)
        driver._gso_ok = {bind.v4.fileno(): True}
        dest = receivers[socket.AF_INET].getsockname()[:2]
        datagrams = [(b"\x04\0\0\0" + bytes([i]) * 200, dest) for i in range(5)]  # transport data: a GSO run
        assert driver._send_datagrams(datagrams, 0) == 5
        assert driver.counters["disable_gso"] == 1 and not driver._gso_ok[bind.v4.fileno()]
        assert _received(receivers[socket.AF_INET]) == [d for d, _ in datagrams]
        assert driver._send_datagrams(datagrams, 0) == 5  # plain from now on, not refused again
        assert driver.counters["disable_gso"] == 1
    finally:
        bind.v4.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_handshake_and_a_shorter_datagram_to_one_peer_both_arrive(monkeypatch, compiled):
    """GSO runs carry transport data only. A run [initiation, shorter discovery ping] reached the peer
    as one coalesced read, which its socket filter judged by the initiation's size and dropped whole
    (a handshake then waited for the 5 s retry)."""
    from meshwg.io.dataplane import driver as driver_module
    from meshwg.io.dataplane import socket_filter
    from meshwg.io.dataplane.driver import Driver
    from meshwg.io.dataplane.udp import UdpBind

    monkeypatch.setattr(driver_module, "fastio", _fastio if compiled else None)
    monkeypatch.setattr(udp, "fastio", _fastio if compiled else None)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bind = UdpBind()
    bind.v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        rx.setsockopt(udp.SOL_UDP, udp.UDP_GRO, 1)
        socket_filter.attach(rx, socket_filter.program(None))
        bind.v4.setblocking(False)
        driver = Driver(core=None, tun=None, udp=bind)
        driver._gso_ok = {bind.v4.fileno(): True}
        dest = rx.getsockname()
        initiation = b"\x01\0\0\0" + bytes(144)
        ping = b"MWDsco" + bytes(126)
        data = [b"\x04\0\0\0" + bytes(60)] * 2
        datagrams = [(initiation, dest), (ping, dest), (data[0], dest), (data[1], dest)]
        assert driver._send_datagrams(datagrams, 0) == 4
        assert [d for d, _ in _drain(rx, 64) + _drain(rx, 64)] == [initiation, ping] + data
        assert udp.socket_drops(rx) == 0
    finally:
        rx.close()
        bind.v4.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_bad_destination_is_not_taken_for_a_path_that_cannot_segment(receivers, monkeypatch, compiled):
    """A run to port 0 fails with EINVAL, as a run the kernel cannot segment does; sending its first
    datagram alone tells them apart: each datagram is counted lost, GSO stays on."""
    from meshwg.io.dataplane import driver as driver_module
    from meshwg.io.dataplane.driver import Driver
    from meshwg.io.dataplane.udp import UdpBind

    monkeypatch.setattr(driver_module, "fastio", _fastio if compiled else None)
    bind = UdpBind()
    bind.v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        bind.v4.setblocking(False)
        driver = Driver(core=None, tun=None, udp=bind)
        driver._gso_ok = {bind.v4.fileno(): True}
        dest = receivers[socket.AF_INET].getsockname()[:2]
        datagrams = [(b"\x04\0\0\0" + bytes(100), ("127.0.0.1", 0))] * 3 + [(b"\x04\0\0\0" + bytes(100), dest)] * 2
        assert driver._send_datagrams(datagrams, 0) == 5
        assert driver.counters["drop_send_error"] == 3 and driver.counters["disable_gso"] == 0
        assert driver._gso_ok[bind.v4.fileno()] is True
        assert len(_received(receivers[socket.AF_INET])) == 2
    finally:
        bind.v4.close()


LINK_LOCAL_PROBE = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from meshwg.io.dataplane import _fastio, udp
out = []
for impl in (_fastio, None):
    udp.fastio = impl
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx.bind(("fe80::2%lb", 0, 0, socket.if_nametoindex("lb")))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tx.bind(("fe80::1%la", 0, 0, socket.if_nametoindex("la")))
    tx.sendto(b"hello", ("fe80::2%la", rx.getsockname()[1]))
    for _ in range(1000):
        got = udp.recv_batch(rx, 8, True)
        if got:
            break
    out.append(got[0][1][0])
    rx.close(); tx.close()
print(" ".join(out))
"""


@pytest.mark.netns
def test_a_link_local_source_keeps_its_scope_in_both_implementations():
    """The endpoint of a link-local peer must name its interface, or the reply cannot leave (the
    pure-Python path used to drop the scope)."""
    from scenarios.netns import Netns

    require_real_components("ip")
    with Netns("fio") as ns:
        ns.run("ip", "link", "add", "la", "type", "veth", "peer", "name", "lb")
        for name, addr in (("la", "fe80::1/64"), ("lb", "fe80::2/64")):
            ns.run("ip", "-6", "addr", "add", addr, "dev", name, "nodad")
            ns.run("ip", "link", "set", name, "up")
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        hosts = ns.run(sys.executable, "-c", LINK_LOCAL_PROBE, repo).split()
    assert hosts == ["fe80::1%lb", "fe80::1%lb"]  # the interface it arrived on, which the reply must use

"""The relay's forwarding thread (meshwg/io/dataplane/_fastio.c relay_worker_*) on loopback sockets, without a
server: it forwards the table's SENDs on its own (no Python call), leaves everything else, with its source, for
Python behind an eventfd, bounds that queue (drops counted), and stops."""

from __future__ import annotations

import select
import socket
import time

import pytest

from meshwg.io.dataplane.fastio import fastio
from meshwg.signaling import relay_wire as W

pytestmark = pytest.mark.skipif(fastio is None or not hasattr(fastio, "relay_worker_start"), reason="needs _fastio")

KA, KB = b"\xaa" * 32, b"\xbb" * 32
TA, TB = b"A" * 8, b"B" * 8


def udp(rcvbuf: int = 0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    return s


@pytest.fixture
def net():
    server, a, b = udp(), udp(), udp()
    server.setblocking(False)
    table = fastio.relay_new(16)
    fastio.relay_limits(table, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    far = time.monotonic() + 60.0
    assert fastio.relay_set(table, TA, KA, server.fileno(), a.getsockname(), far, None)
    assert fastio.relay_set(table, TB, KB, server.fileno(), b.getsockname(), far, None)
    worker = fastio.relay_worker_start(table, server.fileno())
    yield server, a, b, table, worker
    fastio.relay_worker_stop(worker)
    for s in (server, a, b):
        s.close()


def readable(fd: int, timeout: float = 2.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def take_all(worker, want: int, deadline: float = 5.0) -> list:
    out, end = [], time.monotonic() + deadline
    while len(out) < want and time.monotonic() < end:
        if readable(fastio.relay_worker_fd(worker), 0.2):
            out += fastio.relay_worker_take(worker, 512)
    return out


def test_the_thread_forwards_sends_itself_and_leaves_the_rest_for_python(net):
    server, a, b, table, worker = net
    a.sendto(W.encode_send(TA, KB, b"\x04" + b"x" * 99), server.getsockname())
    assert b.recv(65535) == W.encode_recv(KA, b"\x04" + b"x" * 99)  # no Python call in between
    hello = W.MAGIC + bytes([W.T_HELLO]) + b"h" * 40
    a.sendto(hello, server.getsockname())
    a.sendto(W.encode_send(b"Z" * 8, KB, b"unknown token"), server.getsockname())
    rest = take_all(worker, 2)
    assert [d for d, _ in rest] == [hello, W.encode_send(b"Z" * 8, KB, b"unknown token")]
    assert all(addr == a.getsockname() for _, addr in rest)
    assert fastio.relay_take_counters(table)[:2] == (1, 100)


def test_a_session_removed_from_python_is_not_forwarded_by_the_thread(net):
    server, a, b, table, worker = net
    assert fastio.relay_remove(table, KB)
    frame = W.encode_send(TA, KB, b"\x04" + b"y" * 50)
    a.sendto(frame, server.getsockname())
    assert [d for d, _ in take_all(worker, 1)] == [frame]
    b.settimeout(0.2)
    with pytest.raises(socket.timeout):
        b.recv(65535)


def test_the_queue_for_python_is_bounded_and_its_drops_counted():
    """4096 datagrams wait at most; 4500 junk datagrams untaken: 404 dropped and counted, 4096 still taken."""
    server, a = udp(8 << 20), udp()
    server.setblocking(False)
    table = fastio.relay_new(4)
    worker = fastio.relay_worker_start(table, server.fileno())
    try:
        for i in range(4500):
            a.sendto(b"junk %d" % i, server.getsockname())
            if i % 500 == 499:
                time.sleep(0.02)  # the thread keeps up: the kernel buffer is not what drops them
        end = time.monotonic() + 5.0
        dropped = 0
        while dropped < 404 and time.monotonic() < end:
            dropped += fastio.relay_worker_drops(worker)
            time.sleep(0.01)
        assert dropped == 404
        got = take_all(worker, 4096)
        assert len(got) == 4096 and got[0][0] == b"junk 0"
    finally:
        fastio.relay_worker_stop(worker)
        server.close()
        a.close()


def test_stop_joins_and_can_be_repeated_and_bad_arguments_raise(net):
    server, a, b, table, worker = net
    fastio.relay_worker_stop(worker)
    fastio.relay_worker_stop(worker)
    a.sendto(W.encode_send(TA, KB, b"after stop"), server.getsockname())
    b.settimeout(0.2)
    with pytest.raises(socket.timeout):
        b.recv(65535)  # no thread forwards any more
    assert fastio.relay_forward(table, server.fileno(), 8) == []  # the caller's thread can still
    assert b.recv(65535) == W.encode_recv(KA, b"after stop")
    for bad in ((object(), server.fileno()), (table, -1), (table,)):
        with pytest.raises((TypeError, ValueError, OSError)):
            fastio.relay_worker_start(*bad)  # a closed socket's fileno() (-1): OSError
    for bad in ((table, 8), (worker, 8, []), (worker, "8")):
        with pytest.raises((TypeError, ValueError)):
            fastio.relay_worker_take(*bad)


def test_a_batch_of_core_frames_goes_out_in_order_per_destination_and_scoped_ones_come_back(net):
    """relay_send_batch (the TCP relay's SENDs of one read): every frame arrives whole, in order per destination
    (runs to one destination leave as one GSO message where the path allows); a scoped IPv6 address comes back."""
    server, a, b, table, worker = net
    to_a = [W.encode_recv(KB, b"\x04" + bytes([i]) * 200) for i in range(5)]
    to_b = [W.encode_recv(KA, b"\x04" + bytes([i]) * 300) for i in range(3)] + [W.encode_recv(KA, b"short")]
    scoped = (b"scoped", ("fe80::1%lo", 9))
    items = [(f, a.getsockname()) for f in to_a[:3]] + [(f, b.getsockname()) for f in to_b] + [scoped] \
        + [(f, a.getsockname()) for f in to_a[3:]]
    assert fastio.relay_send_batch(table, server.fileno(), items) == [scoped]
    assert [a.recv(65535) for _ in to_a] == to_a
    assert [b.recv(65535) for _ in to_b] == to_b
    with pytest.raises(TypeError):
        fastio.relay_send_batch(table, server.fileno(), [(b"x", "not an address", 1)])

"""The relay's compiled forwarder (meshwg/io/dataplane/_fastio.c relay_*) on loopback sockets, without a server:
what it forwards itself (a SEND of a session it holds, from that session's own address, to a key it holds,
within the limits) and what it hands back for RelayCore (everything else), and its bad-input paths."""

from __future__ import annotations

import os
import socket
import time

import pytest

from meshwg.io.dataplane.fastio import fastio
from meshwg.signaling import relay_wire as W

pytestmark = pytest.mark.skipif(fastio is None or not hasattr(fastio, "relay_forward"), reason="needs _fastio")

KA, KB, KC = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
TA, TB = b"A" * 8, b"B" * 8


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.5)
    return s


@pytest.fixture
def net():
    server, a, b, c = udp(), udp(), udp(), udp()
    table = fastio.relay_new(16)
    fastio.relay_limits(table, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    far = time.monotonic() + 60.0
    assert fastio.relay_set(table, TA, KA, server.fileno(), a.getsockname(), far, None)
    assert fastio.relay_set(table, TB, KB, server.fileno(), b.getsockname(), far, None)
    yield server, a, b, c, table
    for s in (server, a, b, c):
        s.close()


def drain(sock) -> list[bytes]:
    out = []
    sock.settimeout(0.2)
    try:
        while True:
            out.append(sock.recv(65535))
    except socket.timeout:
        return out


def forward(server, table):
    time.sleep(0.05)  # loopback delivery is immediate; this is slack for a loaded machine
    return fastio.relay_forward(table, server.fileno(), 512)


def test_a_mixed_batch_forwards_only_the_valid_sends_and_hands_back_the_rest(net):
    server, a, b, c, table = net
    to = server.getsockname()
    packets = [b"\x04\0\0\0" + os.urandom(n) for n in (100, 100, 60)]
    for p in packets[:2]:
        a.sendto(W.encode_send(TA, KB, p), to)
    c.sendto(W.encode_send(TA, KB, b"stolen"), to)             # A's token from another source
    a.sendto(W.encode_send(b"Z" * 8, KB, b"unknown token"), to)
    a.sendto(W.encode_send(TA, KC, b"no such key"), to)         # destination not in the table
    a.sendto(W.encode_send(TA, bytes(32), b""), to)             # CONFIRM_DST
    a.sendto(W.MAGIC + bytes([W.T_SEND]) + b"short", to)        # shorter than a SEND header
    a.sendto(b"\xff", to)
    a.sendto(b"", to)
    a.sendto(W.encode_send(TA, KB, packets[2]), to)
    rest = forward(server, table)
    assert [p for p in drain(b)] == [W.encode_recv(KA, p) for p in packets]
    assert [d for d, _ in rest] == [
        W.encode_send(TA, KB, b"stolen"), W.encode_send(b"Z" * 8, KB, b"unknown token"),
        W.encode_send(TA, KC, b"no such key"), W.encode_send(TA, bytes(32), b""),
        W.MAGIC + bytes([W.T_SEND]) + b"short", b"\xff", b""]
    assert rest[0][1] == c.getsockname() and all(addr == a.getsockname() for _, addr in rest[1:])
    assert drain(a) == [] and drain(c) == []
    fwd, fwd_bytes, node, total, errors, blocked = fastio.relay_take_counters(table)
    assert (fwd, fwd_bytes, node, total) == (3, sum(map(len, packets)), 0, 0)
    assert fastio.relay_take_counters(table)[:2] == (0, 0)  # taken


def test_a_session_on_another_socket_is_not_the_same_source(net):
    server, a, b, c, table = net
    other = udp()
    try:
        other.connect(a.getsockname())  # unused: only its fd differs
        assert fastio.relay_set(table, TA, KA, other.fileno(), a.getsockname(), time.monotonic() + 60, None)
        a.sendto(W.encode_send(TA, KB, b"x"), server.getsockname())
        assert len(forward(server, table)) == 1 and drain(b) == []
    finally:
        other.close()


def test_expired_and_removed_sessions_go_back_to_python(net):
    server, a, b, c, table = net
    to = server.getsockname()
    assert fastio.relay_set(table, TA, KA, server.fileno(), a.getsockname(), time.monotonic() - 1.0, None)
    a.sendto(W.encode_send(TA, KB, b"stale sender"), to)
    assert len(forward(server, table)) == 1
    assert fastio.relay_set(table, TA, KA, server.fileno(), a.getsockname(), time.monotonic() + 60, None)
    assert fastio.relay_remove(table, KB) and not fastio.relay_remove(table, KB)
    a.sendto(W.encode_send(TA, KB, b"to a removed key"), to)
    assert len(forward(server, table)) == 1 and drain(b) == []
    # A new session for A replaces its old token: the old one is unknown from then on.
    assert fastio.relay_set(table, b"N" * 8, KA, server.fileno(), a.getsockname(), time.monotonic() + 60, None)
    assert fastio.relay_set(table, TB, KB, server.fileno(), b.getsockname(), time.monotonic() + 60, None)
    a.sendto(W.encode_send(TA, KB, b"old token"), to)
    a.sendto(W.encode_send(b"N" * 8, KB, b"new token"), to)
    assert [d for d, _ in forward(server, table)] == [W.encode_send(TA, KB, b"old token")]
    assert drain(b) == [W.encode_recv(KA, b"new token")]


def test_the_per_node_and_total_limits_drop_and_count(net):
    server, a, b, c, table = net
    to = server.getsockname()
    fastio.relay_limits(table, 1.0, 5.0, 0.0, 0.0, 0.0, 0.0)  # 5 packets at once per node
    for i in range(8):
        a.sendto(W.encode_send(TA, KB, b"p%d" % i), to)
    assert forward(server, table) == []
    assert len(drain(b)) == 5
    assert fastio.relay_take_counters(table)[2:4] == (3, 0)
    fastio.relay_limits(table, 0.0, 0.0, 0.0, 0.0, 1.0, 1000.0)  # 1000 bytes at once in all
    for _ in range(3):
        b.sendto(W.encode_send(TB, KA, b"z" * 400), to)
    assert forward(server, table) == []
    assert len(drain(a)) == 2
    assert fastio.relay_take_counters(table)[2:4] == (0, 1)


def test_a_full_table_refuses_new_sessions_and_bad_arguments_raise():
    server = udp()
    try:
        table = fastio.relay_new(2)
        far = time.monotonic() + 60
        assert fastio.relay_set(table, TA, KA, server.fileno(), ("127.0.0.1", 1), far, None)
        assert fastio.relay_set(table, TB, KB, server.fileno(), ("127.0.0.1", 2), far, None)
        assert not fastio.relay_set(table, b"C" * 8, KC, server.fileno(), ("127.0.0.1", 3), far, None)
        assert not fastio.relay_set(table, b"C" * 8, KC, server.fileno(), ("fe80::1%lo", 3), far, None)
        with pytest.raises(TypeError):
            fastio.relay_set(table, b"short", KC, server.fileno(), ("127.0.0.1", 3), far, None)
        with pytest.raises(TypeError):
            fastio.relay_set(table, TA, KA[:31], server.fileno(), ("127.0.0.1", 3), far, None)
        with pytest.raises(TypeError):
            fastio.relay_set(table, TA, KA, server.fileno(), ("127.0.0.1", 3), far, (1, 2))
        with pytest.raises(ValueError):  # not a table
            fastio.relay_forward(object(), server.fileno(), 8)
        with pytest.raises(ValueError):
            fastio.relay_limits(table, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        with pytest.raises(ValueError):
            fastio.relay_new(0)
        assert fastio.relay_forward(table, server.fileno(), 8) == []  # nothing queued: no exception
    finally:
        server.close()


def test_many_sessions_come_and_go_and_each_stays_findable():
    """The index's deletions (backward shift) keep every remaining session reachable."""
    server = udp()
    try:
        table = fastio.relay_new(300)
        far = time.monotonic() + 60
        keys = [os.urandom(32) for _ in range(300)]
        for i, k in enumerate(keys):
            assert fastio.relay_set(table, i.to_bytes(8, "big"), k, server.fileno(), ("127.0.0.1", 1000 + i), far, None)
        for k in keys[::3]:
            assert fastio.relay_remove(table, k)
        for i, k in enumerate(keys):
            assert fastio.relay_remove(table, k) == (i % 3 != 0)
    finally:
        server.close()


def test_a_node_that_hellos_again_keeps_its_per_node_budget(net):
    """A new session for the same key (relay_remove + relay_set, as the shell pushes a re-HELLO, or relay_set
    alone) spends the key's buckets where the last one left them: 5 sessions in a second under a 10 packets/s,
    burst 20 limit forward about 20 packets, not 5 fresh bursts (100)."""
    server, a, b, c, table = net
    to = server.getsockname()
    fastio.relay_limits(table, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0)
    far = time.monotonic() + 60.0
    forwarded = 0
    start = time.monotonic()
    for i in range(5):
        token = b"%07d" % i + b"x"
        if i % 2:
            fastio.relay_remove(table, KA)
        assert fastio.relay_set(table, token, KA, server.fileno(), a.getsockname(), far, None)
        for _ in range(40):
            a.sendto(W.encode_send(token, KB, b"p"), to)
        assert forward(server, table) == []
        forwarded += len(drain(b))
    elapsed = time.monotonic() - start
    assert forwarded <= 20 + 10 * elapsed + 2, (forwarded, elapsed)
    assert forwarded >= 20


def test_the_python_path_charges_the_same_per_node_budget(net):
    """relay_charge (RelayCore's own forwarding) and the compiled SENDs spend one budget per key."""
    server, a, b, c, table = net
    to = server.getsockname()
    fastio.relay_limits(table, 0.001, 5.0, 0.0, 0.0, 0.0, 0.0)
    assert [fastio.relay_charge(table, KA, 100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    for _ in range(3):
        a.sendto(W.encode_send(TA, KB, b"p"), to)
    assert forward(server, table) == []
    assert drain(b) == []  # the Python path spent it all
    assert fastio.relay_take_counters(table)[2] == 3
    for _ in range(3):
        b.sendto(W.encode_send(TB, KA, b"q"), to)
    assert forward(server, table) == []
    assert len(drain(a)) == 3
    assert [fastio.relay_charge(table, KB, 1.0) for _ in range(3)] == [True, True, False]  # 3 of 5 spent in C


def test_a_live_sessions_budget_survives_a_table_full_of_other_keys():
    """The side table is bounded (2 budgets a session slot): keys without a session make room, never one a
    session holds, so an exhausted node cannot get a fresh budget by churning other keys."""
    server = udp()
    try:
        table = fastio.relay_new(2)
        fastio.relay_limits(table, 0.001, 3.0, 0.0, 0.0, 0.0, 0.0)
        assert fastio.relay_set(table, TA, KA, server.fileno(), ("127.0.0.1", 1), time.monotonic() + 60, None)
        assert [fastio.relay_charge(table, KA, 1.0) for _ in range(4)] == [True] * 3 + [False]
        for i in range(50):
            assert fastio.relay_charge(table, os.urandom(32), 1.0)
        assert not fastio.relay_charge(table, KA, 1.0)
        with pytest.raises(TypeError):
            fastio.relay_charge(table, KA[:31], 1.0)
    finally:
        server.close()

"""The node's compiled relay path (meshwg/io/dataplane/_fastio.c, "The node's relay path"; issue 16): only RECV
frames of transport data from the relay's own address and a known peer key are split in the batch receive,
everything else comes back whole for the relay shell to check and count; sends to relay endpoints with a cached
SEND header leave framed, and nothing else does. Loopback UDP sockets."""

from __future__ import annotations

import math
import socket
import sys
from collections import Counter

import pytest

from meshwg.io.dataplane import udp
from meshwg.io.dataplane.fastio import fastio
from meshwg.mesh.node import RelayEndpoint
from meshwg.signaling import relay_wire as W

pytestmark = pytest.mark.skipif(fastio is None, reason="the compiled drain is not built")

PEER = bytes(range(1, 33))
STRANGER = bytes(range(101, 133))
TOKEN = b"T" * 8
TRANSPORT = b"\x04\0\0\0" + bytes(range(12)) + bytes(40)   # 56 bytes: a transport message's shape


@pytest.fixture
def rig():
    """(node socket with GRO, relay socket, stranger socket, route, its dicts), all on 127.0.0.1."""
    node = udp.UdpBind()
    node.v4 = udp._open_socket(socket.AF_INET, 0, 0)   # as the device opens it: GRO and pktinfo on
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (relay, stranger):
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
    headers, endpoints, tx = {}, {PEER: RelayEndpoint(PEER)}, Counter()
    route = udp.RelayRoute(RelayEndpoint, headers, endpoints, tx)
    route.set(relay.getsockname(), math.inf)
    yield node.v4, relay, stranger, route, headers, endpoints, tx
    for sock in (node.v4, relay, stranger):
        sock.close()


def _to(node: socket.socket) -> tuple:
    return ("127.0.0.1", node.getsockname()[1])


def _drain(sock: socket.socket, route) -> list:
    for _ in range(1000):
        got = udp.recv_batch(sock, 64, False, {}, route)
        if got:
            return got
    return []


def test_a_relayed_transport_datagram_comes_out_split_with_the_peers_endpoint(rig):
    node, relay, _, route, _, endpoints, _ = rig
    relay.sendto(W.encode_recv(PEER, TRANSPORT), _to(node))
    assert _drain(node, route) == [(TRANSPORT, RelayEndpoint(PEER))]
    got = _drain_again(node, relay, route)
    assert got[0][1] is endpoints[PEER]       # the shell's object, as receive_relay would give the core
    assert route.counters()["recv_udp_fast"] == 2


def _drain_again(node, relay, route):
    relay.sendto(W.encode_recv(PEER, TRANSPORT), _to(node))
    return _drain(node, route)


BAD_FRAMES = {
    "short": W.encode_recv(PEER, TRANSPORT[:31]),                        # inner shorter than a transport message
    "header only": W.MAGIC + bytes([W.T_RECV]) + PEER[:20],
    "wrong magic": b"\xffMWX" + bytes([W.T_RECV]) + PEER + TRANSPORT,
    "a SEND": W.encode_send(TOKEN, PEER, TRANSPORT),
    "wrong type": W.MAGIC + bytes([W.T_SEND]) + PEER + TRANSPORT,      # a RECV's layout under another type
    "a notice": W.encode_notice(W.N_REHELLO, PEER),
    "a handshake inside": W.encode_recv(PEER, b"\x01\0\0\0" + bytes(144)),
    "unknown source key": W.encode_recv(STRANGER, TRANSPORT),
    "plain source key": W.encode_recv(W.PLAIN_SOURCE, TRANSPORT),
}


@pytest.mark.parametrize("frame", list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_any_other_frame_from_the_relay_comes_back_whole_for_the_shell(rig, frame):
    node, relay, _, route, *_ = rig
    relay.sendto(frame, _to(node))
    assert _drain(node, route) == [(frame, relay.getsockname())]
    assert route.counters()["recv_udp_fast"] == 0


def test_a_recv_from_another_address_comes_back_whole_with_that_address(rig):
    node, relay, stranger, route, *_ = rig
    frame = W.encode_recv(PEER, TRANSPORT)
    stranger.sendto(frame, _to(node))
    assert _drain(node, route) == [(frame, stranger.getsockname())]   # the shell drops it: drop_not_from_relay
    route.set(None, math.inf)                                          # off: nothing is split
    relay.sendto(frame, _to(node))
    assert _drain(node, route) == [(frame, relay.getsockname())]
    assert route.counters()["recv_udp_fast"] == 0


def test_a_coalesced_read_is_split_frame_by_frame(rig):
    node, relay, _, route, *_ = rig
    good = W.encode_recv(PEER, TRANSPORT)
    stranger = W.encode_recv(STRANGER, TRANSPORT)          # same size: one GSO segment each
    relay.sendmsg([good, stranger, good], [(udp.SOL_UDP, udp.UDP_SEGMENT, len(good).to_bytes(2, sys.byteorder))],
                  0, _to(node))
    got = []
    for _ in range(100):
        got += udp.recv_batch(node, 64, False, {}, route)
        if len(got) >= 3:
            break
    assert got == [(TRANSPORT, RelayEndpoint(PEER)), (stranger, relay.getsockname()), (TRANSPORT, RelayEndpoint(PEER))]


def _received(sock: socket.socket) -> list[bytes]:
    out = []
    for _ in range(100000):
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            if out:
                return out
    return out


def _send(node, route, datagrams, now=0.0):
    return fastio.send_datagrams(datagrams, 0, node.fileno(), -1, True, False, {}, route.capsule, now)


def test_sends_to_a_relay_endpoint_with_a_header_leave_framed_and_counted(rig):
    node, relay, _, route, headers, _, tx = rig
    headers[PEER] = W.encode_send(TOKEN, PEER, b"")
    ep = RelayEndpoint(PEER)
    packets = [TRANSPORT, TRANSPORT, TRANSPORT[:40], b"\x01\0\0\0" + bytes(144)]
    assert _send(node, route, [(p, ep) for p in packets]) == (4, fastio.SENT_ALL, 0)
    assert _received(relay) == [W.encode_send(TOKEN, PEER, p) for p in packets]
    assert tx[PEER] == 4 and route.counters()["send_udp_fast"] == 4


def test_sends_without_a_header_or_after_the_session_go_to_python(rig):
    node, relay, _, route, headers, _, tx = rig
    stranger = [(TRANSPORT, RelayEndpoint(STRANGER))]
    assert _send(node, route, stranger) == (0, fastio.NEEDS_PYTHON, 0)          # no header: the shell's path
    headers[PEER] = W.encode_send(TOKEN, PEER, b"")
    mine = [(TRANSPORT, RelayEndpoint(PEER))]
    route.set(relay.getsockname(), 10.0)
    assert _send(node, route, mine, now=10.0) == (0, fastio.NEEDS_PYTHON, 0)     # the session lapsed
    route.set(None, math.inf)
    assert _send(node, route, mine) == (0, fastio.NEEDS_PYTHON, 0)               # off
    headers[PEER] = b"short"
    route.set(relay.getsockname(), math.inf)
    assert _send(node, route, mine) == (0, fastio.NEEDS_PYTHON, 0)               # not a SEND header
    assert tx == Counter() and route.counters()["send_udp_fast"] == 0


def test_the_relay_run_stops_at_the_first_datagram_it_cannot_frame(rig):
    node, relay, _, route, headers, _, _ = rig
    headers[PEER] = W.encode_send(TOKEN, PEER, b"")
    ep = RelayEndpoint(PEER)
    datagrams = [(TRANSPORT, ep), (TRANSPORT, ep), (TRANSPORT, RelayEndpoint(STRANGER)), (TRANSPORT, ep)]
    assert _send(node, route, datagrams) == (2, fastio.NEEDS_PYTHON, 0)
    assert len(_received(relay)) == 2

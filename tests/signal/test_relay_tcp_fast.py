"""The TCP relay's established connections on the compiled path (issue 16: the TCP relay's round trip), on
loopback: once RelayCore grants a TCP connection a session, the C TCP worker reads it and forwards its SENDs to
UDP and TCP sessions itself (counters prove it), with the token bound to the connection and the same per-key
budget as the Python path; unknown destinations are dropped and counted by RelayCore; a receiver that does not
read gets a bounded outbound buffer (drops counted); a re-HELLO and a close hand the connection back correctly;
no descriptor outlives the server."""

from __future__ import annotations

import os
import time

import pytest
import trio
from relay_node import UdpRelayNode
from sig_helpers import new_key, start_server, wait_until

from meshwg.control import ControlConnection
from meshwg.control.relay_client import RelaySession
from meshwg.io.dataplane.fastio import fastio
from meshwg.signaling import relay_wire as W
from meshwg.wg.crypto import clamp, dh_pub

pytestmark = pytest.mark.skipif(fastio is None, reason="needs _fastio")


class TcpNode:
    """A node's relay session over a TCP connection: RelaySession's frames, 2-byte length framing."""

    def __init__(self, sk: bytes, server_pk: bytes, addr) -> None:
        self.sk, self.pub = sk, dh_pub(clamp(sk))
        self.rs = RelaySession(sk, server_pk, os.urandom)
        self.addr = addr
        self.dec = W.TcpFrameDecoder()
        self.frames: list = []

    async def start(self, rcvbuf: int = 0) -> "TcpNode":
        self.stream = await trio.open_tcp_stream(*self.addr)
        if rcvbuf:
            self.stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
        await self.hello()
        await self.stream.send_all(W.tcp_frame(self.rs.confirm()))
        return self

    async def hello(self) -> None:
        await self.stream.send_all(W.tcp_frame(self.rs.hello(time.monotonic(), time.time())))
        while (await self.event())[0] != "ready":
            pass

    async def event(self, timeout: float = 3.0):
        with trio.fail_after(timeout):
            while True:
                while not self.frames:
                    data = await self.stream.receive_some(65536)
                    assert data, "closed"
                    self.frames += self.dec.feed(data)
                e = self.rs.handle_untrusted(self.frames.pop(0), time.monotonic())
                if e is not None:
                    return e

    async def received(self, quiet: float = 0.3) -> list:
        out = []
        while True:
            try:
                e = await self.event(quiet)
            except trio.TooSlowError:
                return out
            if e[0] == "recv":
                out.append(e[2])

    async def send(self, dst: bytes, packet: bytes) -> None:
        await self.stream.send_all(W.tcp_frame(self.rs.encode_send(dst, packet)))


async def nodes(h, kinds: str):
    """Registered nodes with relay sessions, one per letter: 't' over TCP, 'u' over UDP."""
    out, conns = [], []
    for kind in kinds:
        sk = new_key()
        conns.append(await ControlConnection.open(h.invite(), sk))
        if kind == "t":
            out.append(await TcpNode(sk, h.server.server_pk, h.relay_tcp).start())
        else:
            out.append(await UdpRelayNode(sk, h.server.server_pk, h.udp).start())
    return out, conns


async def warm_up(senders, receiver) -> None:
    """One SEND from each sender to `receiver`, relayed (a session's first SEND is confirmed in RelayCore, then
    pushed to the table: the next ones take the C path)."""
    for n in senders:
        await n.send(receiver.pub, b"warm-up")
    assert await receiver.received() == [b"warm-up"] * len(senders)


def count(h, name: str) -> int:
    h.server.relay_udp.fast.fold_counters()
    return h.server.relay.counters[name]


async def close_all(h, conns, tcp_nodes=()):
    for n in tcp_nodes:
        await n.stream.aclose()
    for c in conns:
        await c.aclose()
    h.admin.close()


async def test_sends_from_a_tcp_connection_to_udp_and_tcp_sessions_go_through_the_c_worker(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    (a, b, c), conns = await nodes(h, "tut")
    await warm_up([a], b)
    await warm_up([a], c)
    fast_in, fast_out = count(h, "relay_tcp_fast_in"), count(h, "relay_tcp_fast_out")
    to_udp = [b"\x04" + bytes([i]) * 200 for i in range(20)]
    to_tcp = [b"\x04" + bytes([i]) * 300 for i in range(20)]
    for p, q in zip(to_udp, to_tcp):
        await a.send(b.pub, p)
        await a.send(c.pub, q)
    assert await b.received() == to_udp and await c.received() == to_tcp
    assert count(h, "relay_tcp_fast_in") - fast_in == 40  # all of them on the C path, none through RelayCore
    assert count(h, "relay_tcp_fast_out") - fast_out == 20  # the RECVs for C, written by C
    # And back: a UDP node's SENDs to a TCP node are written to its connection by the UDP worker.
    back = [b"\x04" + bytes([i]) * 100 for i in range(10)]
    for p in back:
        await b.send(a.pub, p)
    assert await a.received() == back
    assert count(h, "relay_tcp_fast_out") - fast_out == 30
    await close_all(h, conns, (a, c))


async def test_unknown_destinations_and_another_connections_token_are_dropped_and_counted(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    (a, b, c), conns = await nodes(h, "tut")
    await warm_up([a, c], b)
    relay = h.server.relay
    absent, refused = relay.counters["drop_peer_absent"], relay.counters["refused_no_session"]
    await a.send(new_key(), b"nobody")  # a key without a session
    await c.stream.send_all(W.tcp_frame(a.rs.encode_send(b.pub, b"a's token on c's connection")))
    await a.send(b.pub, b"after")
    assert await b.received() == [b"after"]
    await wait_until(lambda: relay.counters["drop_peer_absent"] == absent + 1
                     and relay.counters["refused_no_session"] == refused + 1)
    await close_all(h, conns, (a, c))


async def test_the_c_path_spends_the_same_per_key_budget_as_the_python_path(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    relay, fast = h.server.relay, h.server.relay_udp.fast
    (a, b), conns = await nodes(h, "tu")
    await warm_up([a], b)
    relay.pkt_limit.rate, relay.pkt_limit.burst = 0.01, 10.0
    dropped = count(h, "drop_relay_node_limit")
    for i in range(6):
        await a.send(b.pub, b"c%d" % i)
    assert len(await b.received()) == 6
    assert count(h, "relay_tcp_fast_in") >= 6
    # The core's own check (relay_charge, what RelayCore forwards itself) sees the 4 packets left, not 10.
    assert sum(fastio.relay_charge(fast.table, a.pub, 10.0) for _ in range(10)) == 4
    await a.send(b.pub, b"over")
    assert await b.received() == []
    assert count(h, "drop_relay_node_limit") == dropped + 1
    await close_all(h, conns, (a,))


async def test_a_tcp_receiver_that_does_not_read_gets_a_bounded_buffer_and_drops_are_counted(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    relay_tcp = h.server.relay_tcp_listener
    (a, b), conns = await nodes(h, "tu")
    await warm_up([b], a)
    packet = b"\x04" + os.urandom(1300)
    for _ in range(2000):  # 2.6 MB at a node that reads nothing more
        await b.send(a.pub, packet)
        await trio.sleep(0)
    await wait_until(lambda: count(h, "relay_tcp_queue_full") > 0, timeout=5.0)
    (handle,) = relay_tcp.fast_conns
    _, _, waiting = h.server.relay_udp.fast.tcp_state(handle)
    assert 0 < waiting <= 600_000  # 512 KiB and the tail of one frame at most
    await close_all(h, conns, (a,))


async def test_a_re_hello_and_a_close_hand_the_connection_back(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    relay, relay_tcp = h.server.relay, h.server.relay_tcp_listener
    (a, b), conns = await nodes(h, "tu")
    await a.send(b.pub, b"one")
    assert await b.received() == [b"one"]
    old = a.rs.encode_send(b.pub, b"old token")
    await a.hello()  # on the connection the C worker reads: RelayCore answers it
    await a.stream.send_all(W.tcp_frame(a.rs.confirm()))
    refused = relay.counters["refused_no_session"]
    await a.stream.send_all(W.tcp_frame(old))
    await a.send(b.pub, b"new token")
    assert await b.received() == [b"new token"]
    await wait_until(lambda: relay.counters["refused_no_session"] == refused + 1)
    fast_in = count(h, "relay_tcp_fast_in")
    await a.send(b.pub, b"two")
    assert await b.received() == [b"two"]
    assert count(h, "relay_tcp_fast_in") == fast_in + 1  # the new session is on the C path too
    await a.stream.aclose()
    await wait_until(lambda: not relay_tcp.fast_conns and a.pub not in relay.by_key)
    await b.send(a.pub, b"to a closed node")
    await wait_until(lambda: relay.counters["drop_peer_absent"] >= 1)
    await close_all(h, conns)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_descriptor_outlives_the_server(tmp_path):
    before = open_fds()
    async with trio.open_nursery() as nursery:
        h = await start_server(nursery, tmp_path)
        (a, b), conns = await nodes(h, "tu")
        await a.send(b.pub, b"x")
        assert await b.received() == [b"x"]
        for c in conns:
            await c.aclose()
        h.admin.close()
        await b.sock.aclose() if hasattr(b.sock, "aclose") else b.sock.close()
        nursery.cancel_scope.cancel()
    await a.stream.aclose()
    h.server.relay_udp.close()
    del h
    import gc
    gc.collect()
    assert open_fds() <= before

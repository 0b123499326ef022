"""The node's TCP-relayed sends on the compiled path (issue 16, TCP RTT): the driver's batched send writes SEND frames
for the TCP relay straight to its socket (fastio.node_relay_send_tcp, one writev a batch) while nothing else writes
it, and hands them to the relay shell's Python path otherwise. Frames from the compiled send, from the shell's
direct and queued sends and the client's re-hellos, through a full socket buffer (small SO_SNDBUF) and a token
change, all arrive whole and in order, never under a token older than the one current when they were sent. A socketpair stands in for the
relay's TCP connection."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from test_relay_tcp_direct import packet, small_pair

from meshwg.control.relay_client import RelaySession, TcpRelayClient
from meshwg.io.agent.relay_shell import RelayShell
from meshwg.io.dataplane.driver import Driver
from meshwg.io.dataplane.fastio import fastio
from meshwg.io.dataplane.udp import RelayRoute
from meshwg.mesh.node import RelayEndpoint
from meshwg.signaling import relay_wire as W

pytestmark = pytest.mark.skipif(fastio is None, reason="the compiled drain is not built")

DST = bytes(range(1, 33))
OTHER = bytes(range(41, 73))


class FakeUdp:
    """No UDP sockets: every relayed datagram is for the TCP relay."""
    v4 = v6 = None
    sources: dict = {}

    def socket_for(self, host):
        return None


class FakeCore:
    """Hands the driver's flush what the test queued, as the node's core would after encrypting."""

    def __init__(self) -> None:
        self.out: list = []

    def datagrams_to_send(self) -> list:
        out, self.out = self.out, []
        return out

    def tun_packets_to_write(self) -> list:
        return []

    def pop_events(self) -> list:
        return []


class Relay:
    """The relay's end: decodes what arrives (a cut or garbled frame fails the test); reads only while `open`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.dec = sock, W.TcpFrameDecoder()
        self.log: list = []  # (token, dst, packet) of each SEND, "HELLO" for a HELLO, in arrival order
        self.open = trio.Event()
        self.closed = False

    async def run(self) -> None:
        while not self.closed:
            await self.open.wait()
            await trio.lowlevel.wait_readable(self.sock)
            self.drain_now()

    def drain_now(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            if not data:  # the node's end closed (the test is over): what came is what the test checks
                self.closed = True
                return
            for frame in self.dec.feed(data):
                if W.frame_type_untrusted(frame) == W.T_HELLO:
                    self.log.append("HELLO")
                    continue
                parsed = W.parse_send_untrusted(frame)
                assert parsed is not None, "a cut or garbled frame"
                self.log.append(parsed)

    def sends(self) -> list:
        return [entry for entry in self.log if entry != "HELLO"]

    def pause(self) -> None:
        if self.open.is_set():
            self.open = trio.Event()


async def test_compiled_and_python_sends_arrive_whole_and_in_order(nursery):
    ours, theirs = small_pair()
    session = RelaySession(os.urandom(32), os.urandom(32), os.urandom)
    session.token = b"t" * 8
    client = TcpRelayClient(ours, session)
    core = FakeCore()
    driver = Driver(core, tun=None, udp=FakeUdp())
    shell = RelayShell(os.urandom(32), udp_send=lambda data, addr: True, deliver=lambda src, pkt: None,
                       after_rx=trio.lowlevel.checkpoint, endpoint_type=RelayEndpoint,
                       endpoint_for=lambda key: RelayEndpoint(key))
    driver.relay_route = shell.route
    driver.relay_tcp_writer = shell
    driver.endpoint_sender = lambda data, ep: shell.send(ep.peer_key, data)
    shell.tcp = client
    relay = Relay(theirs)
    nursery.start_soon(shell._tcp_writer, client, nursery.cancel_scope)
    nursery.start_soon(relay.run)
    expected: list = []  # (token, dst, packet) in the order the node sent them
    rests = 0
    took = shell.tcp_fast_sent

    def counting_sent(count: int, rest: bytes) -> None:
        nonlocal rests
        rests += bool(rest)
        took(count, rest)
    shell.tcp_fast_sent = counting_sent

    async def flush(n: int, dst: bytes = DST) -> None:
        """A batch as the driver's flush sends it (no yield inside)."""
        for _ in range(n):
            p = packet(len(expected))
            expected.append((session.token, dst, p))
            core.out.append((p, RelayEndpoint(dst)))
        await driver.flush_io()

    def python_send(dst: bytes = DST) -> None:
        p = packet(len(expected))
        expected.append((session.token, dst, p))
        shell.send(dst, p)

    tokens = [session.token]  # every token, oldest first

    def check() -> None:
        """In order, whole, and never under a token older than the one current when sent (a queued packet is
        framed when written: under that token or a later one)."""
        got = relay.sends()
        assert [(d, p) for _, d, p in got] == [(d, p) for _, d, p in expected[:len(got)]], "out of order"
        for (token, _, _), (sent_under, _, _) in zip(got, expected):
            assert tokens.index(token) >= tokens.index(sent_under), "a stale token"

    async def caught_up() -> None:
        while len(relay.sends()) < len(expected):
            check()
            await trio.sleep(0.001)
        check()
        await trio.testing.wait_all_tasks_blocked()

    with trio.fail_after(30):
        await trio.testing.wait_all_tasks_blocked()
        relay.open.set()
        await flush(1)  # no header yet: the Python path builds it
        await caught_up()
        for i in range(30):  # an idle writer: batches on the compiled path, now and then a Python send between
            await flush(1 + i % 5, DST if i % 3 else OTHER)
            if i % 4 == 0:
                python_send()  # straight out (the writer woken for nothing)...
                python_send()  # ... so this one queues: the next batch must not overtake it
                await flush(2)
            await caught_up()
        fast_before_full = shell.counters["send_tcp_fast"]
        relay.pause()
        await trio.testing.wait_all_tasks_blocked()
        for i in range(40):  # nobody reads: straight out while the kernel takes them, then cut, then queued
            await flush(1 + i % 3)
            await trio.testing.wait_all_tasks_blocked()
        for i in range(10):
            # A cut frame's rest waits as the backlog, or the writer is blocked inside a send, with a re-hello
            # behind it: what comes now must queue; and a new token now and then (stale headers never used).
            relay.pause()
            await flush(20)
            nursery.start_soon(client.rehello)
            await trio.testing.wait_all_tasks_blocked()
            relay.drain_now()
            await flush(3)
            python_send()
            if i % 3 == 1:
                session.token = bytes([i]) * 8
                tokens.append(session.token)
                await flush(2)  # stale headers: the Python path (the new token's headers from then on)
                await flush(2)
            relay.open.set()
            await caught_up()
        await caught_up()
    check()
    assert len(relay.sends()) == len(expected)
    assert relay.log.count("HELLO") == 10
    counters = shell.counters
    assert counters["send_tcp"] == len(expected) and counters["drop_tcp_queue_full"] == 0
    assert shell.tx_by_peer[DST] + shell.tx_by_peer[OTHER] == len(expected)
    # Every way out was taken (else this test proves nothing about them): compiled writes whole and cut, the
    # shell's direct writes and its queue.
    assert fast_before_full > 0 and rests > 0
    assert 0 < counters["send_tcp_direct"] and counters["send_tcp_fast"] + counters["send_tcp_direct"] < len(expected)


def test_send_tcp_takes_only_what_it_has_headers_for_and_returns_the_rest():
    """node_relay_send_tcp alone: frames up to the first datagram without a header; the kernel's leftovers as rest."""
    route = RelayRoute(RelayEndpoint, {}, {}, {})
    header = W.encode_send(b"k" * 8, DST, b"")
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    b.setblocking(False)
    try:
        datagrams = [(packet(i), RelayEndpoint(DST)) for i in range(3)] + [(packet(3), RelayEndpoint(OTHER))]
        i, rest = fastio.node_relay_send_tcp(route.capsule, datagrams, 0, len(datagrams), a.fileno(), {DST: header})
        assert i == 3 and rest == b""
        dec = W.TcpFrameDecoder()
        frames = dec.feed(b.recv(65536))
        assert [W.parse_send_untrusted(f) for f in frames] == [(b"k" * 8, DST, packet(n)) for n in range(3)]
        # Nobody reads: the writes end cut, and the rest completes the stream exactly.
        stream = b""
        many = [(packet(n), RelayEndpoint(DST)) for n in range(200)]
        i, rest = fastio.node_relay_send_tcp(route.capsule, many, 0, len(many), a.fileno(), {DST: header})
        assert 0 < i < 200 and rest
        while True:
            try:
                stream += b.recv(65536)
            except BlockingIOError:
                break
        frames = W.TcpFrameDecoder().feed(stream + rest)
        assert [W.parse_send_untrusted(f)[2] for f in frames] == [packet(n) for n in range(i)]
    finally:
        a.close()
        b.close()


async def test_the_client_offers_its_headers_only_while_nothing_else_writes(nursery):
    """TcpRelayClient.direct_headers alone (whatever the shell checks): none while a cut frame's rest waits, none
    while a send (here a re-hello) is under way, none under a stale token until a send rebuilds them."""
    ours, theirs = small_pair()
    session = RelaySession(os.urandom(32), os.urandom(32), os.urandom)
    session.token = b"t" * 8
    client = TcpRelayClient(ours, session)
    relay = Relay(theirs)
    nursery.start_soon(relay.run)
    n = 0
    with trio.fail_after(10):
        assert client.send_nowait([(DST, packet(n))])
        assert DST in client.direct_headers()
        while not client.backlog:  # nobody reads: straight out until the kernel cuts one
            n += 1
            assert client.send_nowait([(DST, packet(n))])
        assert client.direct_headers() is None  # it would overtake the backlog
        async with trio.open_nursery() as inner:
            inner.start_soon(client.rehello)  # the backlog, then the HELLO: blocked on the full buffer
            await trio.testing.wait_all_tasks_blocked()
            assert not client.backlog
            assert client.direct_headers() is None  # it would land inside that send
            relay.open.set()
        assert DST in client.direct_headers()
        session.token = b"u" * 8
        assert client.direct_headers() is None  # framed under the old token
        assert client.send_nowait([(DST, packet(n + 1))])
        assert client.direct_headers()[DST] == W.encode_send(b"u" * 8, DST, b"")

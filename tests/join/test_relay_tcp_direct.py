"""The node's TCP relay writes a relayed packet straight to the socket when its writer waits with nothing queued
(issue 16: no writer-task hop on the way out), and queues otherwise: SEND frames written directly, cut by a full
kernel buffer (the rest kept as the client's backlog) and queued behind it all arrive whole and in order, and a
HELLO (the reader's re-hello) never lands inside one."""

from __future__ import annotations

import os
import socket

import trio
import trio.testing

from meshwg.control.relay_client import RelaySession, TcpRelayClient
from meshwg.io.agent.relay_shell import RelayShell
from meshwg.signaling import relay_wire as W

DST = bytes(range(1, 33))
TOKEN = b"t" * 8


def small_pair() -> tuple[trio.SocketStream, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    b.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), b


def new_client(stream) -> TcpRelayClient:
    session = RelaySession(os.urandom(32), os.urandom(32), os.urandom)
    session.token = TOKEN
    return TcpRelayClient(stream, session)


def packet(i: int) -> bytes:
    return b"\x04" + i.to_bytes(4, "big") + bytes([i % 251]) * (300 + (i * 397) % 1400)


class Relay:
    """The relay's end: decodes what arrives; reads only while `open` (else the buffers fill)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.dec = sock, W.TcpFrameDecoder()
        self.sends: list[bytes] = []  # the packets of SEND frames, in arrival order
        self.hellos = 0
        self.log: list = []  # both, in arrival order ("HELLO" for a HELLO)
        self.open = trio.Event()

    async def run(self) -> None:
        while True:
            await self.open.wait()
            await trio.lowlevel.wait_readable(self.sock)
            self.drain_now()

    def drain_now(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            assert data, "closed early"
            for frame in self.dec.feed(data):
                t = W.frame_type_untrusted(frame)
                if t == W.T_HELLO:
                    self.hellos += 1
                    self.log.append("HELLO")
                    continue
                parsed = W.parse_send_untrusted(frame)
                assert parsed is not None and parsed[:2] == (TOKEN, DST), "a cut or garbled frame"
                self.sends.append(parsed[2])
                self.log.append(parsed[2])

    def pause(self) -> None:
        if self.open.is_set():
            self.open = trio.Event()


async def test_direct_cut_and_queued_sends_arrive_whole_and_in_order(nursery):
    ours, theirs = small_pair()
    client = new_client(ours)
    shell = RelayShell(os.urandom(32), udp_send=lambda data, addr: True, deliver=lambda src, pkt: None,
                       after_rx=trio.lowlevel.checkpoint)
    shell.tcp = client
    relay = Relay(theirs)
    nursery.start_soon(shell._tcp_writer, client, nursery.cancel_scope)
    nursery.start_soon(relay.run)
    sent, backlog_seen = 0, 0

    def burst(n: int) -> None:
        nonlocal sent, backlog_seen
        for _ in range(n):  # as the driver's flush calls it: no yield between packets
            shell.send(DST, packet(sent))
            sent += 1
            backlog_seen += client.backlog

    async def caught_up() -> None:
        while len(relay.sends) < sent:
            assert relay.sends == [packet(i) for i in range(len(relay.sends))], "packets out of order"
            await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()

    with trio.fail_after(20):
        await trio.testing.wait_all_tasks_blocked()
        relay.open.set()
        for i in range(30):  # bursts on an idle writer: the first packet straight out, the rest queued
            burst(1 + i % 5)
            await caught_up()
        relay.pause()
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(40):  # nobody reads: straight out while the kernel takes them, then cut, then queued
            burst(1)
            await trio.testing.wait_all_tasks_blocked()
        for i in range(10):
            # The writer is blocked inside a send with packets in hand and the buffer empties under it, or a
            # cut frame's rest waits as the backlog, with a re-hello (the reader's) behind it: what comes now
            # must queue (written straight out it would land inside those).
            relay.pause()
            burst(20)
            nursery.start_soon(client.rehello)
            await trio.testing.wait_all_tasks_blocked()
            relay.drain_now()
            burst(3)
            relay.open.set()
            await caught_up()
        await caught_up()
    assert relay.sends == [packet(i) for i in range(sent)]
    assert relay.hellos == 10
    counters = shell.counters
    assert counters["send_tcp"] == sent and counters["drop_tcp_queue_full"] == 0
    # Every way out was taken (else this test proves nothing about them).
    assert 0 < counters["send_tcp_direct"] < sent and backlog_seen > 0


async def test_the_client_never_writes_past_its_backlog_nor_inside_a_write_under_way(nursery):
    """TcpRelayClient.send_nowait alone (its own guards, whatever its caller checks): a cut frame's rest goes
    out before anything else, and nothing is written straight out while a send (here a re-hello) is under way."""
    ours, theirs = small_pair()
    client = new_client(ours)
    relay = Relay(theirs)
    nursery.start_soon(relay.run)
    n = 0
    with trio.fail_after(10):
        while not client.backlog:  # nobody reads: straight out until the kernel cuts one
            assert client.send_nowait([(DST, packet(n))])
            n += 1
        assert not client.send_nowait([(DST, packet(n))])  # it would overtake the backlog
        async with trio.open_nursery() as inner:
            inner.start_soon(client.rehello)  # the backlog, then the HELLO: blocked on the full buffer
            await trio.testing.wait_all_tasks_blocked()
            assert not client.backlog
            assert not client.send_nowait([(DST, packet(n))])  # it would land inside that send
            relay.open.set()
        assert client.send_nowait([(DST, packet(n))])  # the send is done: straight out again
        while len(relay.log) < n + 2:
            await trio.sleep(0.001)
    assert relay.log == [packet(i) for i in range(n)] + ["HELLO", packet(n)]


class BusyOnceClient:
    """A TCP relay client busy at the first direct write (a send under way: the packet goes to the shell's queue),
    free right after, before the shell's writer has run: the moment a direct write would overtake the queue."""

    def __init__(self) -> None:
        self.busy, self.backlog, self.out = True, False, []

    def send_nowait(self, items) -> bool:
        if self.busy:
            self.busy = False
            return False
        self.out += [p for _, p in items]
        return True

    async def send_many(self, items) -> None:
        self.out += [p for _, p in items]


async def test_the_shell_writes_nothing_straight_out_while_its_queue_holds_packets(nursery):
    client = BusyOnceClient()
    shell = RelayShell(os.urandom(32), udp_send=lambda data, addr: True, deliver=lambda src, pkt: None,
                       after_rx=trio.lowlevel.checkpoint)
    shell.tcp = client
    nursery.start_soon(shell._tcp_writer, client, nursery.cancel_scope)
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()  # the writer waits with nothing queued
        for i in range(3):  # no yield: the writer has not taken packet 0 when 1 and 2 come
            shell.send(DST, packet(i))
        await trio.testing.wait_all_tasks_blocked()
    assert client.out == [packet(0), packet(1), packet(2)]

"""The relay's TCP destinations write straight to the socket when nothing waits (issue 16: no writer-task hop on
a relayed packet's way to a TCP node), and queue for the writer otherwise: frames written directly, frames whose
tail the kernel did not take, and frames queued behind a full buffer all arrive whole and in order."""

from __future__ import annotations

import socket

import trio
import trio.testing
from sig_helpers import start_server

from meshwg.signaling import relay_wire as W
from signal_server.relay_tcp import TcpDest


def small_pair() -> tuple[trio.SocketStream, socket.socket]:
    """A connected pair whose buffers hold a few frames only (the kernel rounds 4096 up a little): our end as
    the relay's stream, the far end a plain non-blocking socket (read from the test's own task, no yield)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    b.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), b


def frame(i: int) -> bytes:
    """Frames of uneven sizes (a partial write cuts them anywhere), numbered."""
    return i.to_bytes(4, "big") + bytes([i % 251]) * (300 + (i * 397) % 1500)


class Reader:
    """The far end: reads and decodes while `open`, else leaves the bytes in the kernel (the buffers fill)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.dec, self.frames = sock, W.TcpFrameDecoder(), []
        self.open = trio.Event()

    async def run(self) -> None:
        while True:
            await self.open.wait()
            await trio.lowlevel.wait_readable(self.sock)
            self.drain_now()

    def drain_now(self) -> None:
        """Everything the kernel holds for us, without yielding: room in the buffer the writer has not seen yet."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            assert data, "closed early"
            self.frames += self.dec.feed(data)

    def pause(self) -> None:
        if self.open.is_set():  # (an unset one may be what run() waits on)
            self.open = trio.Event()


async def test_direct_short_and_queued_frames_arrive_whole_and_in_order(nursery):
    ours, theirs = small_pair()
    dest = TcpDest(ours, limit=100_000)
    reader = Reader(theirs)
    nursery.start_soon(dest.writer, 10.0)
    nursery.start_soon(reader.run)
    sent, queued_seen = 0, 0

    def burst(n: int) -> None:
        nonlocal sent, queued_seen
        for _ in range(n):  # no yield inside: the writer cannot run between these
            dest.send_nowait(frame(sent))
            sent += 1
        queued_seen += dest.queued > 0

    async def caught_up() -> None:
        while len(reader.frames) < sent:
            # Out of order or cut frames fail here at once (the count would never be reached).
            assert reader.frames == [frame(i) for i in range(len(reader.frames))], "frames out of order or cut"
            await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits with nothing queued

    with trio.fail_after(20):
        reader.open.set()
        for i in range(40):  # a burst on an idle writer: its first frame straight out, the rest queued
            burst(1 + i % 5)
            await caught_up()
        reader.pause()
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(40):  # nobody reads: straight out while the kernel takes them, then a short write,
            burst(1)         # then queued behind the full buffer
            await trio.testing.wait_all_tasks_blocked()
        for _ in range(10):
            # The writer is blocked in the middle of a send, with frames in hand; the buffer empties under it:
            # a frame now must queue behind those (written straight out, it would land inside them).
            reader.pause()
            burst(20)
            await trio.testing.wait_all_tasks_blocked()
            reader.drain_now()
            burst(3)
            reader.open.set()
            await caught_up()
        reader.open.set()
        for i in range(40):
            burst(1 + i % 5)
            if i % 2:
                await caught_up()
        await caught_up()
    assert reader.frames == [frame(i) for i in range(sent)]
    # All three ways out were taken (else this test proves nothing about them).
    assert dest.direct > 0 and dest.direct_short > 0 and queued_seen > 0


async def test_a_full_queue_refuses_and_a_closed_destination_raises():
    ours, _theirs = small_pair()
    dest = TcpDest(ours, limit=3)  # no writer: nothing goes straight out, all queues
    for i in range(3):
        dest.send_nowait(frame(i))
    try:
        dest.send_nowait(frame(3))
        raise AssertionError("a full queue took a frame")
    except trio.WouldBlock:
        pass
    dest.close()
    try:
        dest.send_nowait(frame(4))
        raise AssertionError("a closed destination took a frame")
    except trio.ClosedResourceError:
        pass


async def test_the_server_hands_the_tcp_relay_the_udp_shells_batch_sender(nursery, tmp_path):
    # Frames one TCP read carries for UDP nodes leave in one sendmmsg (relay_send_many), not one send each.
    h = await start_server(nursery, tmp_path)
    assert h.server.relay_tcp_listener.send_many == h.server.relay_udp.relay_send_many

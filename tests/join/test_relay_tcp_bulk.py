"""The TCP relay client in bulk (issue 16): many SEND frames in one write, byte for byte what one frame per send
wrote (each destination's header under the current token only), and every RECV of a read at once, a frame cut
across reads kept for the next one; other frames (a short RECV, junk) go through the session, which counts them."""

from __future__ import annotations

import os

import trio

from meshwg.control.relay_client import RelaySession, TcpRelayClient
from meshwg.signaling import relay_wire as W

A, B = bytes(range(1, 33)), bytes(range(33, 65))


class Stream:
    def __init__(self, reads=()):
        self.writes: list[bytes] = []
        self.reads = list(reads)

    async def send_all(self, data):
        self.writes.append(bytes(data))

    async def receive_some(self, n):
        if not self.reads:
            await trio.sleep_forever()
        return self.reads.pop(0)


def client(stream, token=b"t" * 8) -> TcpRelayClient:
    session = RelaySession(os.urandom(32), os.urandom(32), os.urandom)
    session.token = token
    return TcpRelayClient(stream, session)


async def test_send_many_is_one_write_of_the_frames_one_send_each_would_write():
    stream = Stream()
    c = client(stream)
    items = [(A, b"\x04" + bytes(100)), (B, b"x"), (A, b"")]
    await c.send_many(items)
    assert stream.writes == [b"".join(W.tcp_frame(W.encode_send(b"t" * 8, d, p)) for d, p in items)]
    c.session.token = b"u" * 8                                   # a re-hello over TCP: a new token
    await c.send_many([(A, b"y")])
    assert stream.writes[-1] == W.tcp_frame(W.encode_send(b"u" * 8, A, b"y"))


async def test_receive_many_returns_every_recv_of_a_read_and_keeps_a_cut_frame():
    frames = [W.tcp_frame(W.encode_recv(A, b"one")), W.tcp_frame(W.MAGIC + bytes([W.T_RECV]) + A[:10]),
              W.tcp_frame(b"junk"), W.tcp_frame(W.encode_recv(B, b"two")), W.tcp_frame(W.encode_recv(A, b"three"))]
    data = b"".join(frames)
    cut = len(data) - 4
    c = client(Stream([data[:cut], data[cut:]]))
    with trio.fail_after(5):
        assert await c.receive_many() == [(A, b"one"), (B, b"two")]
        assert await c.receive_many() == [(A, b"three")]
    assert c.session.drops == 2                                  # the short RECV and the junk

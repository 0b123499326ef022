"""Trio shell of the relay's TCP fallback listener: connection caps at accept, then length-prefixed relay
frames fed to RelayCore, with a short leash until the relay grants the connection a session."""

from __future__ import annotations

import os
import time
from collections import deque

import trio

from meshwg.signaling import relay_wire as W

WRITE_BATCH = 256  # relay frames joined into one send at most
RELAY_TCP_UNAUTH_BYTES = 4096  # a relay TCP connection without a session: a HELLO or two (~95 bytes each)
TCP_DEST_QUEUE = 512  # frames waiting for one connection's writer at most (then dropped, relay_tcp_queue_full)


class TcpDest:
    """One relay TCP connection as a relay destination (hashed by identity; send_nowait as a memory channel's).

    A frame goes straight to the socket (one non-blocking write, no trio task hop: issue 16's RTT) when the
    writer task waits with nothing queued; otherwise, and for whatever the kernel does not take, it queues for
    the writer, which sends the queue in order. Never straight to the socket while anything is queued (that
    would overtake it); a direct write wakes the writer, so the rest of the same burst leaves as one send."""

    def __init__(self, stream, limit: int = TCP_DEST_QUEUE) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno()
        self._queue: deque = deque()   # TCP-framed bytes; the first may be the tail of a partial direct write
        self._limit = limit
        self._idle: trio.Event | None = None  # the writer waits on it with an empty queue
        self.closed = False
        self.direct = 0        # frames written straight to the socket, whole
        self.direct_short = 0  # ... of which the kernel took only part, or none (the rest queued)

    def send_nowait(self, frame: bytes) -> None:
        """Raises trio.WouldBlock when the queue is full, trio.ClosedResourceError after close()."""
        if self.closed:
            raise trio.ClosedResourceError
        idle = self._idle
        if idle is None:
            if len(self._queue) >= self._limit:
                raise trio.WouldBlock
            self._queue.append(W.tcp_frame(frame))
            return
        self._idle = None
        idle.set()
        data = W.tcp_frame(frame)
        try:
            sent = os.write(self._fd, data)
        except OSError:  # full (BlockingIOError) or broken: the writer's send waits, or fails and closes
            sent = 0
        if sent == len(data):
            self.direct += 1
        else:
            self.direct_short += 1
            self._queue.append(data[sent:])

    @property
    def queued(self) -> int:
        """Frames (or a frame's tail) waiting for the writer."""
        return len(self._queue)

    def close(self) -> None:
        self.closed = True

    async def writer(self, send_timeout: float) -> None:
        """Sends what queues, in order: up to WRITE_BATCH frames in one send (one syscall per burst)."""
        queue = self._queue
        while True:
            while not queue:
                self._idle = idle = trio.Event()
                await idle.wait()
            chunks = [queue.popleft() for _ in range(min(len(queue), WRITE_BATCH))]
            with trio.fail_after(send_timeout):
                await self.stream.send_all(b"".join(chunks) if len(chunks) > 1 else chunks[0])


class RelayTcp:
    """The relay TCP listener of `srv` (a SignalServer: relay core, relay_limits, counters, config)."""

    def __init__(self, srv, send, send_many=None) -> None:
        self.srv = srv
        self.cfg = srv.cfg
        self.counters = srv.counters
        self.send = send  # relay_send(frame, dest): UDP destinations go out of the UDP shell's sockets
        self.send_many = send_many or self._send_each  # many (frame, dest) pairs at once: the UDP shell's batch

    def _send_each(self, out: list) -> None:
        for frame, dest in out:
            self.send(frame, dest)

    async def listen(self, nursery, host: str, port: int) -> list:
        ls = await trio.open_tcp_listeners(port, host=host)
        nursery.start_soon(trio.serve_listeners, self.handle, ls)
        return [l.socket.getsockname()[:2] for l in ls]

    async def handle(self, stream) -> None:
        srv = self.srv
        try:
            peer_ip = stream.socket.getpeername()[0]
        except OSError:
            await stream.aclose()
            return
        # Caps in all (a share of the descriptors) and per source, an accept rate per source: at accept.
        refusal = srv.relay_limits.admit(peer_ip, time.monotonic())
        if refusal is not None:
            # Closed at once, no answer: a node's relay client reconnects later on its own.
            self.counters["relay_tcp_refused"] += 1
            self.counters[f"relay_tcp_refused_{refusal.reason}"] += 1
            await stream.aclose()
            return
        conn = TcpDest(stream)  # this connection's relay destination
        try:
            async with trio.open_nursery() as n:
                n.start_soon(conn.writer, self.cfg.send_timeout)
                await self._reader(stream, conn)
                n.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            self.counters["relay_tcp_errors"] += 1
        finally:
            conn.close()
            srv.relay_limits.release(peer_ip)
            srv.relay.drop_dest(conn)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _reader(self, stream, conn) -> None:
        """Feeds one TCP connection's frames to the relay until it closes or idles. Until the relay grants
        it a session (HELLO_OK), a connection gets relay_hello_timeout, HELLO frames only and a few KB:
        an idle or junk connection would otherwise hold a descriptor for SESSION_TTL."""
        relay = self.srv.relay
        dec = W.TcpFrameDecoder()
        hello_by = trio.current_time() + self.cfg.relay_hello_timeout
        unauth_bytes, authed = 0, False
        while True:
            with trio.move_on_at(trio.current_time() + W.SESSION_TTL if authed else hello_by) as idle:
                data = await stream.receive_some(65536 if authed else 4096)
            if idle.cancelled_caught:
                self.counters["relay_tcp_idle_timeout" if authed else "relay_tcp_hello_timeout"] += 1
                return
            if not data:
                return
            unauth_bytes += 0 if authed else len(data)
            if unauth_bytes > RELAY_TCP_UNAUTH_BYTES:
                self.counters["relay_tcp_no_hello"] += 1
                return
            now, wall = time.monotonic(), time.time()
            outs: list = []  # what this read's frames become: sent together (one sendmmsg for the UDP ones)
            for frame in dec.feed(data):
                if not authed and W.frame_type_untrusted(frame) != W.T_HELLO:
                    self.counters["relay_tcp_no_hello"] += 1
                    self.send_many(outs)
                    return
                for out, dest in relay.handle_untrusted(frame, conn, now, wall):
                    authed = authed or (dest is conn and W.frame_type_untrusted(out) == W.T_HELLO_OK)
                    outs.append((out, dest))
            self.send_many(outs)

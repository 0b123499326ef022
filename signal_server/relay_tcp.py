"""Trio shell of the relay's TCP fallback listener: connection caps at accept, then length-prefixed relay
frames fed to RelayCore, with a short leash until the relay grants the connection a session.

With the compiled forwarder (relay_fast, issue 16: the TCP relay's round trip), every connection's bytes are
written through the C table (FastTcpDest), and once RelayCore has granted it a session the connection is handed
to the C TCP worker, which reads it and forwards the SENDs of sessions the table holds itself; the frames it
does not handle (HELLOs, confirms, plain peers, unknown destinations, junk) and the connection's end come back
here (_fast_loop) for RelayCore, as before. This task then only watches the connection's idle and stall clocks."""

from __future__ import annotations

import os
import time
from collections import deque

import trio

from meshwg.signaling import relay_wire as W

WRITE_BATCH = 256  # relay frames joined into one send at most
RELAY_TCP_UNAUTH_BYTES = 4096  # a relay TCP connection without a session: a HELLO or two (~95 bytes each)
TCP_DEST_QUEUE = 512  # frames waiting for one connection's writer at most (then dropped, relay_tcp_queue_full)
FAST_CONNS = 4096  # connection slots of the C side when the server sets no cap (beyond: the Python path)
FAST_CONNS_MAX = 65_536
FAST_TAKE = 512  # frames taken from the C TCP worker per wakeup


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

    fast_handle = None  # the Python path's connection: not on the compiled one

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


class FastTcpDest:
    """A relay TCP connection whose bytes the compiled side writes (relay_fast.FastRelay.tcp_*): frames are
    written at once or kept in its bounded outbound buffer, in order with the RECVs the C threads write to it."""

    def __init__(self, fast, handle: int) -> None:
        self.fast = fast
        self.fast_handle = handle
        self.ended = trio.Event()  # the C reader saw its end (or an error)
        self.closed = False

    def send_nowait(self, frame: bytes) -> None:
        """Raises trio.WouldBlock when its outbound buffer is full (or the socket broke), ClosedResourceError
        after close()."""
        if self.closed:
            raise trio.ClosedResourceError
        if not self.fast.tcp_send(self.fast_handle, frame):
            raise trio.WouldBlock

    def close(self) -> None:
        self.closed = True


class RelayTcp:
    """The relay TCP listener of `srv` (a SignalServer: relay core, relay_limits, counters, config)."""

    def __init__(self, srv, send, send_many=None) -> None:
        self.srv = srv
        self.cfg = srv.cfg
        self.counters = srv.counters
        self.send = send  # relay_send(frame, dest): UDP destinations go out of the UDP shell's sockets
        self.send_many = send_many or self._send_each  # many (frame, dest) pairs at once: the UDP shell's batch
        udp_shell = getattr(srv, "relay_udp", None)
        self.fast = getattr(udp_shell, "fast", None)  # the compiled forwarder (relay_fast), or None
        self.fast_conns: dict[int, FastTcpDest] = {}  # handle -> connection, while the C side knows it
        self._fast_started = False

    def _send_each(self, out: list) -> None:
        for frame, dest in out:
            self.send(frame, dest)

    async def listen(self, nursery, host: str, port: int) -> list:
        ls = await trio.open_tcp_listeners(port, host=host)
        if self.fast is not None and not self._fast_started:
            self._fast_started = True
            fd = self.fast.start_tcp(min(self.srv.relay_limits.total or FAST_CONNS, FAST_CONNS_MAX))
            nursery.start_soon(self._fast_loop, fd)
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
        handle = self.fast.tcp_add(stream.socket.fileno()) if self.fast is not None else None
        # This connection's relay destination: written through the C table, or by its own writer task.
        conn = TcpDest(stream) if handle is None else FastTcpDest(self.fast, handle)
        if handle is not None:
            self.fast_conns[handle] = conn
        try:
            async with trio.open_nursery() as n:
                if handle is None:
                    n.start_soon(conn.writer, self.cfg.send_timeout)
                partial = await self._reader(stream, conn)
                if partial is not None:
                    self.fast.tcp_read(handle, partial)  # the C worker reads it from here on
                    await self._watch(conn)
                n.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            self.counters["relay_tcp_errors"] += 1
        finally:
            conn.close()
            srv.relay_limits.release(peer_ip)
            srv.relay.drop_dest(conn)  # its sessions leave the C table first
            if handle is not None:
                self.fast_conns.pop(handle, None)
                self.fast.tcp_remove(handle)  # before the socket closes: no C thread uses it afterwards
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _watch(self, conn: FastTcpDest) -> None:
        """A connection the C worker reads: until it ends, idles SESSION_TTL, or cannot take our bytes for
        send_timeout (the Python writer's limits)."""
        interval = min(self.cfg.send_timeout, W.SESSION_TTL)
        while True:
            with trio.move_on_after(interval):
                await conn.ended.wait()
                return
            idle, stalled, _ = self.fast.tcp_state(conn.fast_handle)
            if idle >= W.SESSION_TTL:
                self.counters["relay_tcp_idle_timeout"] += 1
                return
            if stalled >= self.cfg.send_timeout:
                raise trio.TooSlowError

    async def _fast_loop(self, fd: int) -> None:
        """The frames the C TCP worker leaves for RelayCore, and the ends of the connections it reads."""
        relay, fast = self.srv.relay, self.fast
        while True:
            await trio.lowlevel.wait_readable(fd)
            items = fast.tcp_take(FAST_TAKE)
            now, wall = time.monotonic(), time.time()
            outs: list = []
            for handle, frame in items:
                conn = self.fast_conns.get(handle)
                if conn is None:
                    continue  # removed since
                if frame is None:
                    conn.ended.set()
                    continue
                outs += relay.handle_untrusted(frame, conn, now, wall)
            self.send_many(outs)
            await trio.lowlevel.checkpoint()

    async def _reader(self, stream, conn) -> bytes | None:
        """Feeds one TCP connection's frames to the relay until it closes or idles. Until the relay grants
        it a session (HELLO_OK), a connection gets relay_hello_timeout, HELLO frames only and a few KB:
        an idle or junk connection would otherwise hold a descriptor for SESSION_TTL. A FastTcpDest stops
        once granted: returns the bytes of the unfinished frame it holds, for the C reader."""
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
                if not authed and W.frame_type_untrusted(frame) not in (W.T_HELLO, W.T_HELLO_CRED):
                    self.counters["relay_tcp_no_hello"] += 1
                    self.send_many(outs)
                    return
                for out, dest in relay.handle_untrusted(frame, conn, now, wall):
                    authed = authed or (dest is conn and W.frame_type_untrusted(out) == W.T_HELLO_OK)
                    outs.append((out, dest))
            self.send_many(outs)
            if authed and conn.fast_handle is not None:
                return dec.pending()

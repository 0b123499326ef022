"""Trio shell of the relay's TCP fallback listener: connection caps at accept, then length-prefixed relay
frames fed to RelayCore, with a short leash until the relay grants the connection a session."""

from __future__ import annotations

import time

import trio

from meshwg.signaling import relay_wire as W

WRITE_BATCH = 256  # relay frames joined into one send at most
RELAY_TCP_UNAUTH_BYTES = 4096  # a relay TCP connection without a session: a HELLO or two (~95 bytes each)


class RelayTcp:
    """The relay TCP listener of `srv` (a SignalServer: relay core, relay_limits, counters, config)."""

    def __init__(self, srv, send) -> None:
        self.srv = srv
        self.cfg = srv.cfg
        self.counters = srv.counters
        self.send = send  # relay_send(frame, dest): UDP destinations go out of the UDP shell's sockets
        # Many (frame, dest) pairs at once: the UDP shell's batch when `send` is its relay_send.
        owner = getattr(send, "__self__", None)
        self.send_many = getattr(owner, "relay_send_many", None) or self._send_each

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
        # The send channel is this connection's relay destination (hashed by identity, has send_nowait).
        conn, recv_ch = trio.open_memory_channel(512)
        try:
            async with trio.open_nursery() as n:
                async def writer():
                    async for frame in recv_ch:
                        # Every frame queued by now in one send (one syscall, one wakeup per burst).
                        frames = [W.tcp_frame(frame)]
                        while len(frames) < WRITE_BATCH:
                            try:
                                frames.append(W.tcp_frame(recv_ch.receive_nowait()))
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        with trio.fail_after(self.cfg.send_timeout):
                            await stream.send_all(b"".join(frames) if len(frames) > 1 else frames[0])
                n.start_soon(writer)
                await self._reader(stream, conn)
                n.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            self.counters["relay_tcp_errors"] += 1
        finally:
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

"""Relay shell: the node's relay client over the shared UDP socket, with a TCP fallback.

Sends are non-blocking (the driver calls them from its flush): over UDP a SEND frame goes out of
the shared socket at once; over TCP it is queued for a writer task; before any session is ready a
few packets wait in a small queue (the first packets of a WireGuard handshake must not be lost).
UDP is tried first; if no HELLO_OK came after UDP_GIVE_UP seconds the TCP relay is opened, and
UDP hellos continue (slowly) so the node moves back to UDP when it starts working.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque

import trio

from meshwg.signaling import relay_wire as W
from meshwg.signaling.invite import join_hostport
from meshwg.control.relay_client import RelaySession, open_tcp_relay

log = logging.getLogger("meshwg.relay")

UDP_GIVE_UP = 3.0          # no UDP HELLO_OK this long: open the TCP relay
UDP_RETRY_WHILE_TCP = 20.0  # while on TCP, try a UDP hello this often
PENDING_MAX = 128
TCP_QUEUE = 1024
TICK = 0.25


class RelayShell:
    def __init__(self, private_key: bytes, *, udp_send, deliver, after_rx, clock=time.monotonic,
                 random_bytes=os.urandom):
        """udp_send(data, addr) -> bool sends from the shared socket; deliver(src_key, packet) feeds
        the mesh node (sync); after_rx() is awaited after TCP deliveries (flushes the node)."""
        self.private_key = private_key
        self.udp_send = udp_send
        self.deliver = deliver
        self.after_rx = after_rx
        self.clock = clock
        self._random = random_bytes
        self.server_key: bytes | None = None
        self.udp_addrs: tuple = ()
        self.tcp_addrs: tuple = ()
        self.session: RelaySession | None = None
        self.tcp = None
        self._tcp_send, self._tcp_recv = trio.open_memory_channel(TCP_QUEUE)
        self._pending: deque = deque(maxlen=PENDING_MAX)
        self.latency: float | None = None       # HELLO -> HELLO_OK round trip over UDP (seconds)
        self.tcp_latency: float | None = None
        self.observed = None                    # our address as the relay sees it
        self.counters: Counter = Counter()
        self.tx_by_peer: Counter = Counter()     # packets handed to the relay, per destination key
        self._udp_since = math.inf              # when we started waiting for UDP to answer
        self._last_refresh = -math.inf          # last hello sent because a peer fell back to the relay
        self._last_udp_ok = -math.inf
        self._configured = trio.Event()
        self._tcp_scope: trio.CancelScope | None = None
        self.mode = "none"                      # "udp" | "tcp" | "none"

    @property
    def relay_addr(self):
        return self.udp_addrs[0] if self.udp_addrs else None

    def configure(self, server_key: bytes, udp_addrs, tcp_addrs) -> None:
        """From the welcome (or the cache). Re-configuring with the same values changes nothing."""
        udp_addrs, tcp_addrs = tuple(tuple(a) for a in udp_addrs), tuple(tuple(a) for a in tcp_addrs)
        if (server_key, udp_addrs, tcp_addrs) == (self.server_key, self.udp_addrs, self.tcp_addrs):
            return
        self.server_key, self.udp_addrs, self.tcp_addrs = server_key, udp_addrs, tcp_addrs
        self.session = RelaySession(self.private_key, server_key, self._random)
        self._udp_since = self.clock()
        self._configured.set()
        self._hello(self.clock())

    def server_restarted(self) -> None:
        """The control channel came back: the relay may have restarted and forgotten our session.

        Start a new session rather than only re-hello: until its HELLO_OK, sends wait in the pending
        queue instead of going out under the old token, which a restarted relay refuses (the first
        answers to peers, e.g. a handshake response, would be lost)."""
        if self.server_key is None:
            return
        self.session = RelaySession(self.private_key, self.server_key, self._random)
        self._udp_since = self.clock()
        self._hello(self.clock())

    def refresh(self) -> None:
        """A peer just fell back to the relay: re-open our NAT mapping towards it now.

        The relay reaches us only through the mapping our last packet to it created; after a NAT
        rebinding that mapping is gone until our next periodic hello or STUN (up to ~25 s). One hello
        per fallback (at most one a second) fixes that."""
        now = self.clock()
        if now - self._last_refresh >= 1.0:
            self._last_refresh = now
            self._hello(now)

    # ---- status ------------------------------------------------------------------------------
    def ready(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return (self.session is not None and self.session.is_ready(now)) or self.tcp is not None

    def status(self) -> dict:
        return {"mode": self.mode, "udp": [join_hostport(h, p) for h, p in self.udp_addrs],
                "tcp": [join_hostport(h, p) for h, p in self.tcp_addrs],
                "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
                "tcp_latency_ms": None if self.tcp_latency is None else round(self.tcp_latency * 1000, 2),
                "observed": None if self.observed is None else join_hostport(*self.observed),
                "counters": dict(self.counters)}

    # ---- data path (sync, non-blocking) ------------------------------------------------------
    def send(self, dst: bytes, packet: bytes) -> None:
        self.tx_by_peer[dst] += 1
        s = self.session
        now = self.clock()
        if s is not None and s.is_ready(now):
            frame = s.encode_send(dst, packet)
            if frame is not None and self.udp_send(frame, self.relay_addr):
                self.counters["tx_udp"] += 1
                return
        if self.tcp is not None:
            try:
                self._tcp_send.send_nowait((dst, packet))
                self.counters["tx_tcp"] += 1
            except trio.WouldBlock:
                self.counters["drop_tcp_queue_full"] += 1
            return
        self._pending.append((dst, packet))
        self.counters["queued_not_ready"] += 1

    def handle_udp(self, data: bytes, addr, now: float) -> None:
        """A relay frame that arrived on the shared socket."""
        s = self.session
        if s is None or addr != self.relay_addr:
            self.counters["drop_not_from_relay"] += 1
            return
        ev = s.handle_untrusted(data, now)
        if ev is None:
            self.counters["drop_bad_frame"] += 1
            return
        if ev[0] == "recv":
            self.counters["rx_udp"] += 1
            self.deliver(ev[1], ev[2])
        elif ev[0] == "ready":
            self.latency = max(0.0, now - s.last_hello)
            self.observed = ev[1]
            self._last_udp_ok = now
            if self.mode != "udp":
                log.info("relay: UDP session ready via %s:%s (%.1f ms)", *self.relay_addr, self.latency * 1000)
            self.mode = "udp"
            self._confirm()
            self._flush_pending(now)
        elif ev[0] == "notice":
            self.counters[f"notice_{ev[1]}"] += 1
            if ev[1] in (W.N_REHELLO, W.N_STALE_HELLO) and s.needs_hello(now):
                self._hello(now)  # at most once a second (notices can be forged); run() sends a deferred one

    def _flush_pending(self, now: float) -> None:
        pending, self._pending = list(self._pending), deque(maxlen=PENDING_MAX)
        for dst, packet in pending:
            self.send(dst, packet)

    def _confirm(self) -> None:
        """Right after HELLO_OK: proves to the relay that we receive at the HELLO's source, so it publishes
        that as our observed address now rather than at our next relayed packet."""
        frame = self.session.confirm()
        if frame is not None and self.udp_send(frame, self.relay_addr):
            self.counters["confirm_udp"] += 1

    def _hello(self, now: float) -> None:
        if self.session is None or self.relay_addr is None:
            return
        self.udp_send(self.session.hello(now, time.time()), self.relay_addr)
        self.counters["hello_udp"] += 1

    # ---- tasks -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Keep the UDP session alive; fall back to TCP while UDP does not answer."""
        await self._configured.wait()
        async with trio.open_nursery() as nursery:
            while True:
                now = self.clock()
                s = self.session
                udp_ok = s.is_ready(now)
                if self.tcp is None:
                    if s.needs_hello(now):
                        self._hello(now)
                    if not udp_ok and now - max(self._udp_since, self._last_udp_ok) >= UDP_GIVE_UP and self.tcp_addrs:
                        await nursery.start(self._run_tcp)
                        self._udp_since = self.clock()
                elif udp_ok:
                    # UDP works again: the relay rebound us to UDP at its HELLO_OK; drop TCP.
                    if self._tcp_scope is not None:
                        self._tcp_scope.cancel()
                elif now - s.last_hello >= UDP_RETRY_WHILE_TCP:
                    self._hello(now)
                await trio.sleep(TICK)

    async def _run_tcp(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        started = False
        for host, port in self.tcp_addrs:
            t0 = self.clock()
            try:
                client = await open_tcp_relay(host, port, self.private_key, self.server_key, self._random)
            except (OSError, trio.TooSlowError, PermissionError, EOFError) as exc:
                log.info("relay: TCP %s:%s failed: %s", host, port, exc)
                continue
            self.tcp_latency = self.clock() - t0
            self.tcp = client
            self.mode = "tcp"
            log.info("relay: using TCP relay %s:%s (UDP relay did not answer)", host, port)
            task_status.started()
            started = True
            try:
                with trio.CancelScope() as self._tcp_scope:
                    async with trio.open_nursery() as n:
                        n.start_soon(self._tcp_writer, client, n.cancel_scope)
                        n.start_soon(self._tcp_reader, client, n.cancel_scope)
                        self._flush_pending(self.clock())
            finally:
                self.tcp = None
                self._tcp_scope = None
                if self.mode == "tcp":
                    self.mode = "none"
                with trio.CancelScope(shield=True):
                    await client.aclose()
            break
        if not started:
            task_status.started()

    async def _tcp_reader(self, client, scope) -> None:
        try:
            while True:
                src, packet = await client.receive()
                self.counters["rx_tcp"] += 1
                self.deliver(src, packet)
                await self.after_rx()
        except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("relay: TCP relay closed: %s", exc)
        scope.cancel()

    async def _tcp_writer(self, client, scope) -> None:
        try:
            while True:
                dst, packet = await self._tcp_recv.receive()
                await client.send(dst, packet)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, RuntimeError) as exc:
            log.info("relay: TCP relay send failed: %s", exc)
        scope.cancel()

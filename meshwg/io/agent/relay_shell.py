"""Relay shell: the node's relay client over the shared UDP socket, with a TCP fallback.

Sends are non-blocking (the driver calls them from its flush): over UDP a SEND frame goes out of
the shared socket at once; over TCP it is written straight to the socket while nothing waits (else queued
for a writer task, which keeps the order); before any session is ready a
few packets wait in a small queue (the first packets of a WireGuard handshake must not be lost).
Which transport carries them, and when the TCP relay is opened and closed, is meshwg.mesh.relay_policy's
decision (UDP and TCP raced: TCP opens after 0.3 s without a UDP answer; the relay's TCP addresses, e.g. 7301
and 443, tried in turn, the next one after 0.25 s or at once when one fails); this shell feeds it events
and carries out its actions. Its counters follow meshwg.counters' convention (`send_udp`, `recv_tcp`, `drop_...`).

The compiled path (issue 16). The shell stays the owner of the session (hello, token, UDP/TCP policy) and of
what the driver's compiled send and receive may do on its behalf (`route`, a meshwg.io.dataplane.udp
RelayRoute, None without the compiled drain): the SEND header of each destination the Python path has sent
to under the current token (rebuilt on a new token, off while UDP is not the transport or the session
lapsed), and the endpoint object of each source key `endpoint_for` calls a peer of ours (learnt from its
first RECV through the Python path; forgotten when the peers change). With those, the driver frames and
batches relayed sends and splits relayed transport data out of its batch receive (`send_udp_fast`,
`recv_udp_fast`); everything else (the first packets, handshakes and disco, frames from another address,
unknown keys, plain peers, bad frames) still comes here, and is checked and counted as before.
Over TCP likewise, given `watch_tcp`/`unwatch_tcp` (the driver's watch_relay_tcp/unwatch_relay_tcp): once the
TCP session is ready the driver's data loop reads its socket, hands the RECVs of transport data from the peers
in `endpoints` to the WireGuard core in one batch (`recv_tcp_fast`) and every other frame here (`_tcp_frames`);
a task of ours keeps the session's timer (re-hellos) and ends the session when the driver reports the close.
The TCP send likewise: while the TCP relay is the transport and nothing else writes its socket (the writer waits
with nothing queued; the client has no write under way, no backlog: `tcp_fast_target`), the driver's compiled
send frames relayed datagrams to destinations the TCP client has a header for and writes them in one writev a
batch (`send_tcp_fast`); what the kernel does not take becomes the client's backlog, flushed by the writer
before anything else (`tcp_fast_sent`). One thread (trio's) runs all of it, so the checks hold for the write.

Relays in regions (issue 14.3; `configure_regions`, from a welcome that lists relays): this shell is the session
with the node's home relay, the nearest by its PING round trip (meshwg.mesh.relay_policy.HomePolicy decides; the
home relay keeps the compiled path); every relay is probed, and a home relay that stops answering while another
answers is replaced by the next nearest: this shell is configured anew for it (a new session) and `on_home(addr)`
tells the agent, which publishes it as our "relay" candidate. A packet for a peer whose home relay (`home_of(key)`:
its "relay" candidate, one of the welcome's relays) is another goes through a session of ours at that relay (a
secondary RelayShell, without the compiled path), where the peer is; frames from that relay go to it. Every HELLO
carries the control plane's credential (`set_credential`), which regional relays admit us by.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque

import trio

from meshwg.mesh import relay_policy as P
from meshwg.signaling import relay_wire as W
from meshwg.signaling.invite import join_hostport
from meshwg.control.relay_client import RelaySession, open_tcp_relay
from meshwg.control.tcp import set_stream_mark
from meshwg.io.dataplane.udp import new_relay_route

log = logging.getLogger("meshwg.relay")

PENDING_MAX = 128
TCP_QUEUE = 1024
# Counter names of the relay's notices (`recv_notice_rehello`, ...): a code we do not know is `recv_notice_unknown`.
NOTICE_NAMES = {W.N_REHELLO: "rehello", W.N_NOT_REGISTERED: "not_registered", W.N_PEER_ABSENT: "peer_absent",
                W.N_RATE_LIMITED: "rate_limited", W.N_STALE_HELLO: "stale_hello"}


def _is_initiation(packet: bytes) -> bool:
    """A WireGuard handshake initiation (message type 1, 148 bytes)."""
    return len(packet) == 148 and packet[:4] == b"\x01\x00\x00\x00"


class RelayShell:
    def __init__(self, private_key: bytes, *, udp_send, deliver, after_rx, clock=time.monotonic,
                 random_bytes=os.urandom, endpoint_type: type | None = None, endpoint_for=None,
                 watch_tcp=None, unwatch_tcp=None):
        """udp_send(data, addr) -> bool sends from the shared socket; deliver(src_key, packet) feeds
        the mesh node (sync); after_rx() is awaited after TCP deliveries (flushes the node).
        endpoint_type (the node's RelayEndpoint) and endpoint_for(key) -> endpoint or None (None: not a
        peer whose relayed transport data may skip this shell) enable the compiled path (`route`);
        watch_tcp(fd, tail, on_frames, on_closed) -> bool and unwatch_tcp(fd) put the TCP relay's receive on it."""
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
        self.policy = P.RelayPolicy()
        self.tcp = None                         # the ready TCP client, while the policy holds one
        self.tcp_addr = None                    # the TCP relay address it is connected to
        self._tcp_out: deque = deque()           # (dst, packet) for the TCP writer, TCP_QUEUE at most
        self._tcp_wake: trio.Event | None = None  # set when the writer waits for _tcp_out
        self._pending: deque = deque(maxlen=PENDING_MAX)
        self.latency: float | None = None       # HELLO -> HELLO_OK round trip over UDP (seconds)
        self.tcp_latency: float | None = None
        self.observed = None                    # our address as the relay sees it
        self._counters: Counter = Counter()
        self.tx_by_peer: Counter = Counter()     # packets handed to the relay, per destination key
        # The compiled path's state (see the module docstring); the dicts are shared with `route`.
        self._headers: dict[bytes, bytes] = {}   # destination key -> SEND header under _header_token
        self._header_token: bytes | None = None
        self._endpoints: dict[bytes, object] = {}  # source key -> the peer's endpoint object
        self.endpoint_for = endpoint_for
        self.watch_tcp, self.unwatch_tcp = watch_tcp, unwatch_tcp
        self._tcp_kick: trio.Event | None = None  # set when a frame or the close moved the TCP session's timer
        self.route = None
        if endpoint_type is not None and endpoint_for is not None:
            self.route = new_relay_route(endpoint_type, self._headers, self._endpoints, self.tx_by_peer)
        self._configured = trio.Event()
        self._wake = trio.Event()               # an input changed the policy's deadlines
        self._nursery: trio.Nursery | None = None
        self._run_scope: trio.CancelScope | None = None
        self._tcp_scopes: dict[int, trio.CancelScope] = {}  # per TCP attempt
        self.fwmark = 0                         # SO_MARK of the TCP relay socket (an exit node's policy routing)
        # Relays in regions (see the module docstring); all empty without them.
        self.cred: bytes | None = None            # the control plane's relay credential, in every HELLO
        self.relays: dict = {}                   # region -> RelayInfo (the welcome's)
        self.home = P.HomePolicy(())
        self.home_region: str | None = None
        self.others: dict[str, RelayShell] = {}  # region -> our session at another relay (peers' homes)
        self._pings: dict[bytes, tuple[str, float]] = {}  # nonce -> (region, sent at)
        self._traffic_mark = 0
        self.home_of = None                      # key -> the peer's home relay (host, port), or None
        self.on_home = None                      # (host, port) of a new home relay -> None

    def set_fwmark(self, fwmark: int) -> None:
        """Mark the TCP relay socket (the live one's and later ones'): it never loops into an exit node."""
        self.fwmark = fwmark
        if self.tcp is not None:
            set_stream_mark(self.tcp.stream, fwmark)

    @property
    def relay_addr(self):
        return self.udp_addrs[0] if self.udp_addrs else None

    def configure(self, server_key: bytes, udp_addrs, tcp_addrs) -> None:
        """From the welcome (or the cache). Re-configuring with the same values changes nothing."""
        udp_addrs, tcp_addrs = tuple(tuple(a) for a in udp_addrs), tuple(tuple(a) for a in tcp_addrs)
        if (server_key, udp_addrs, tcp_addrs) == (self.server_key, self.udp_addrs, self.tcp_addrs):
            return
        self.server_key, self.udp_addrs, self.tcp_addrs = server_key, udp_addrs, tcp_addrs
        self._new_session()
        self._configured.set()

    def server_restarted(self) -> None:
        """The control channel came back: the relay may have restarted and forgotten our session.

        Start a new session rather than only re-hello: until its HELLO_OK, sends wait in the pending
        queue instead of going out under the old token, which a restarted relay refuses (the first
        answers to peers, e.g. a handshake response, would be lost)."""
        if self.server_key is None:
            return
        self._new_session()

    # ---- relays in regions -------------------------------------------------------------------
    def set_credential(self, cred: bytes | None) -> None:
        """The control plane's relay credential: our next HELLOs (every relay's) carry it."""
        self.cred = cred or None
        for shell in (self, *self.others.values()):
            shell.cred = self.cred
            if shell.session is not None:
                shell.session.cred = self.cred

    def configure_regions(self, relays, cred: bytes | None) -> None:
        """The welcome's relays (RelayInfo, ours first) and credential; the home relay is the policy's."""
        self.set_credential(cred)
        self.relays = {r.region: r for r in relays}
        self.home.set_regions([r.region for r in relays])
        for region in [r for r in self.others if r not in self.relays]:
            self.others.pop(region).close()
        self._use_home(self.home.home)
        self._wake.set()

    def _use_home(self, region: str | None) -> None:
        info = self.relays.get(region)
        if info is None:
            return
        self.home_region = region
        other = self.others.pop(region, None)
        if other is not None:
            other.close()
        if (info.key, tuple(info.udp), tuple(info.tcp)) != (self.server_key, self.udp_addrs, self.tcp_addrs):
            for scope in list(self._tcp_scopes.values()):
                scope.cancel()  # a TCP session with the old home relay
            self.configure(info.key, info.udp, info.tcp)
        if self.on_home is not None and info.udp:
            self.on_home(tuple(info.udp[0]))

    def close(self) -> None:
        """A secondary session no longer needed: its task ends."""
        if self._run_scope is not None:
            self._run_scope.cancel()

    def homes_changed(self) -> None:
        """Peers' home relays may have moved: the compiled path's headers are learnt again through send(), which
        routes each peer to its home."""
        if self.relays:
            self._headers.clear()

    def _region_for(self, dst: bytes) -> str | None:
        """The region of `dst`'s home relay when it is not ours (and is one of the welcome's), else None."""
        if not self.relays or self.home_of is None:
            return None
        addr = self.home_of(dst)
        if addr is None:
            return None
        for region, info in self.relays.items():
            if tuple(addr) in info.udp:
                return None if region == self.home_region else region
        return None

    def _other(self, region: str) -> "RelayShell":
        shell = self.others.get(region)
        if shell is None:
            info = self.relays[region]
            shell = RelayShell(self.private_key, udp_send=self.udp_send, deliver=self.deliver, after_rx=self.after_rx,
                               clock=self.clock, random_bytes=self._random)
            shell.fwmark, shell.cred = self.fwmark, self.cred
            shell.configure(info.key, info.udp, info.tcp)
            self.others[region] = shell
            if self._nursery is not None:
                self._nursery.start_soon(shell.run)
        return shell

    def _probe(self, now: float) -> None:
        """PING the relays the policy wants measured; note relayed traffic (ours or the compiled path's)."""
        c = self.counters
        mark = sum(c.get(k, 0) for k in ("send_udp", "send_udp_fast", "recv_udp", "recv_udp_fast", "send_tcp",
                                           "recv_tcp"))
        if mark != self._traffic_mark:
            self._traffic_mark = mark
            self.home.traffic(now)
        for region in self.home.probes_due(now):
            info = self.relays[region]
            self.home.probed(region, now)
            if not info.udp:
                continue
            nonce = self._random(8)
            if len(self._pings) > 64:
                self._pings.clear()  # answers that never came
            self._pings[nonce] = (region, now)
            if self.udp_send(W.encode_ping(nonce), tuple(info.udp[0])):
                self._counters["send_ping"] += 1
        self._choose(now)

    def _on_pong(self, data: bytes, addr, now: float) -> None:
        nonce = W.parse_ping_untrusted(data, W.T_PONG)
        sent = None if nonce is None else self._pings.pop(nonce, None)
        info = None if sent is None else self.relays.get(sent[0])
        if info is None or tuple(addr[:2]) not in info.udp:
            self._counters["drop_pong"] += 1  # not an answer to a probe of ours, from where it went
            return
        self._counters["recv_pong"] += 1
        self.home.answered(sent[0], max(0.0, now - sent[1]))
        self._choose(now)

    def _choose(self, now: float) -> None:
        old = self.home_region
        region = self.home.choose(now)
        if region is not None and region != old:
            log.info("relay: home relay now %s (%s)%s", region,
                     f"{self.home.rtt[region] * 1000:.1f} ms",
                     f"; {old} does not answer" if old and self.home.down(old, now) else "")
            self._use_home(region)

    def region_status(self) -> list[dict]:
        """Every relay with its region and measured latency, for status and netcheck."""
        now = self.clock()
        return [{"region": r, "home": r == self.home_region,
                 "udp": [join_hostport(h, p) for h, p in info.udp],
                 "latency_ms": round(self.home.rtt[r] * 1000, 2) if r in self.home.rtt else None,
                 "down": self.home.down(r, now)} for r, info in self.relays.items()]

    def _new_session(self) -> None:
        self.session = RelaySession(self.private_key, self.server_key, self._random, self.cred)
        now = self.clock()
        self.policy.configured(now, len(self.tcp_addrs))
        self._sync_route()
        self._hello(now)

    @property
    def counters(self) -> Counter:
        """The shell's counters, the compiled path's included (`send_udp_fast`, `recv_udp_fast`, ...)."""
        if self.route is not None:
            for key, value in self.route.counters().items():
                if value:
                    self._counters[key] = value
        return self._counters

    def _sync_route(self) -> None:
        """Tell the compiled path where sends go and until when: the UDP relay while its session holds
        (the policy's UDP deadline), nowhere otherwise. A new token makes every cached header stale."""
        route, s = self.route, self.session
        if route is None:
            return
        if s is None or s.token is None or self.relay_addr is None or not self.policy.udp_ready_at(self.clock()):
            route.set(None, 0.0)
            return
        if s.token != self._header_token:
            self._headers.clear()
            self._header_token = s.token
        route.set(self.relay_addr, self.policy.udp_until)

    def forget_endpoints(self) -> None:
        """The peers changed: source keys are learnt again (a removed peer's frames come here)."""
        self._endpoints.clear()

    def refresh(self) -> None:
        """A peer just fell back to the relay: re-open our NAT mapping towards it now.

        The relay reaches us only through the mapping our last packet to it created; after a NAT
        rebinding that mapping is gone until our next periodic hello or STUN (up to ~25 s)."""
        now = self.clock()
        if self.policy.peer_fell_back(now):
            self._hello(now)

    # ---- status ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """"udp" | "tcp" | "none": where sends go now."""
        return self.policy.transport(self.clock()) or "none"

    def ready(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return (self.session is not None and self.session.is_ready(now)) or self.tcp is not None

    def status(self) -> dict:
        return {"mode": self.mode, "udp": [join_hostport(h, p) for h, p in self.udp_addrs],
                "tcp": [join_hostport(h, p) for h, p in self.tcp_addrs],
                "tcp_connected": None if self.tcp is None else join_hostport(*self.tcp_addr),
                "latency_ms": None if self.latency is None else round(self.latency * 1000, 2),
                "tcp_latency_ms": None if self.tcp_latency is None else round(self.tcp_latency * 1000, 2),
                "observed": None if self.observed is None else join_hostport(*self.observed),
                "counters": dict(self.counters),
                **({"region": self.home_region, "regions": self.region_status()} if self.relays else {})}

    # ---- data path (sync, non-blocking) ------------------------------------------------------
    def send(self, dst: bytes, packet: bytes) -> None:
        if self.relays:
            region = self._region_for(dst)
            if region is not None:
                self.tx_by_peer[dst] += 1
                self._other(region).send(dst, packet)  # counted there too: ours is per peer, theirs per relay
                return
        self.tx_by_peer[dst] += 1
        if self.policy.transport(self.clock()) == P.UDP:
            frame = self.session.encode_send(dst, packet)
            if frame is not None and self.udp_send(frame, self.relay_addr):
                self._counters["send_udp"] += 1
                if self.route is not None and self.session.token == self._header_token and dst not in self._headers:
                    self._headers[dst] = W.encode_send(self._header_token, dst, b"")  # the compiled path's from now on
                return
        if self.tcp is not None:
            wake = self._tcp_wake
            direct = getattr(self.tcp, "send_nowait", None)  # None: a client without direct writes (test fakes)
            if wake is not None and not self._tcp_out and direct is not None and direct(((dst, packet),)):
                # Straight to the socket (the writer was idle, nothing queued): no task hop on a relayed
                # packet's way out. The writer wakes to send the rest of this burst in one write (and any
                # backlog the kernel left).
                self._tcp_wake = None
                wake.set()
                self._counters["send_tcp"] += 1
                self._counters["send_tcp_direct"] += 1
                return
            if len(self._tcp_out) >= TCP_QUEUE:
                self._counters["drop_tcp_queue_full"] += 1
                return
            self._tcp_out.append((dst, packet))
            self._counters["send_tcp"] += 1
            if self._tcp_wake is not None:
                self._tcp_wake.set()
                self._tcp_wake = None
            return
        if _is_initiation(packet) and any(d == dst and _is_initiation(p) for d, p in self._pending):
            # Only our latest initiation to a peer can complete (the core keeps that one's state), and WireGuard
            # ignores a second initiation that arrives right after the first as a flood: flushed together, the
            # peer would answer the stale one only and the handshake would wait for the 5 s retry.
            self._pending = deque(((d, p) for d, p in self._pending if not (d == dst and _is_initiation(p))),
                                  maxlen=PENDING_MAX)
            self._counters["drop_pending_stale_initiation"] += 1
        self._pending.append((dst, packet))
        self._counters["queue_not_ready"] += 1

    def tcp_fast_target(self) -> tuple[int, dict] | None:
        """(fd, headers): the driver's compiled send may write SEND frames framed from `headers` straight to the
        TCP relay's socket now, as send() would write one directly: UDP is not the transport, the writer waits with
        nothing queued, and the client has no write under way, no backlog and current headers. None: not now
        (the packets come through send(), which queues them behind what is under way)."""
        tcp = self.tcp
        if tcp is None or self._tcp_wake is None or self._tcp_out:
            return None
        direct_headers = getattr(tcp, "direct_headers", None)  # None: a client without direct writes (test fakes)
        if direct_headers is None or self.policy.transport(self.clock()) == P.UDP:
            return None
        headers = direct_headers()
        return None if headers is None else (tcp.fileno, headers)

    def tcp_fast_sent(self, count: int, rest: bytes) -> None:
        """The driver's compiled send wrote `count` frames (tx_by_peer counted there); `rest`: the bytes the
        kernel did not take, the client's backlog, which the writer sends before anything else."""
        self._counters["send_tcp"] += count
        self._counters["send_tcp_fast"] += count
        if rest:
            self.tcp.took_direct(rest)
            wake, self._tcp_wake = self._tcp_wake, None
            if wake is not None:
                wake.set()

    def handle_udp(self, data: bytes, addr, now: float) -> None:
        """A relay frame that arrived on the shared socket."""
        s = self.session
        if self.relays:
            if len(data) > 4 and data[4] == W.T_PONG:
                self._on_pong(data, addr, now)
                return
            if addr != self.relay_addr:
                for other in self.others.values():
                    if addr == other.relay_addr:
                        other.handle_udp(data, addr, now)
                        return
        if s is None or addr != self.relay_addr:
            self._counters["drop_not_from_relay"] += 1
            return
        ev = s.handle_untrusted(data, now)
        if ev is None:
            self._counters["drop_bad_frame"] += 1
            return
        if ev[0] == "recv":
            self._counters["recv_udp"] += 1
            self.deliver(ev[1], ev[2])
            if self.route is not None and ev[1] not in self._endpoints:
                self._learn_endpoint(ev[1])
        elif ev[0] == "ready":
            self.latency = max(0.0, now - s.last_hello)
            self.observed = ev[1]
            if not self.policy.udp_ready_at(now):
                log.info("relay: UDP session ready via %s (%.1f ms)", join_hostport(*self.relay_addr[:2]),
                         self.latency * 1000)
            self.policy.udp_ready(now, s.ready_until)
            self._sync_route()
            self._wake.set()
            self._confirm()
            self._flush_pending(now)
        elif ev[0] == "notice":
            self._counters["recv_notice_" + NOTICE_NAMES.get(ev[1], "unknown")] += 1
            self._wake.set()  # a re-hello notice moved the session's hello timer (answered at most 1/s)

    def _learn_endpoint(self, src: bytes) -> None:
        """A RECV from `src` came through here: if it is a peer of ours, its next ones may skip us."""
        endpoint = self.endpoint_for(src)
        if endpoint is not None:
            self._endpoints[src] = endpoint

    def _flush_pending(self, now: float) -> None:
        pending, self._pending = list(self._pending), deque(maxlen=PENDING_MAX)
        for dst, packet in pending:
            self.send(dst, packet)

    def _confirm(self) -> None:
        """Right after HELLO_OK: proves to the relay that we receive at the HELLO's source, so it publishes
        that as our observed address now rather than at our next relayed packet."""
        frame = self.session.confirm()
        if frame is not None and self.udp_send(frame, self.relay_addr):
            self._counters["send_confirm_udp"] += 1

    def _hello(self, now: float) -> None:
        self.policy.udp_hello_sent(now)
        self._wake.set()
        if self.session is None or self.relay_addr is None:
            return
        self.udp_send(self.session.hello(now, time.time()), self.relay_addr)
        self._counters["send_hello_udp"] += 1

    def _rand01(self) -> float:
        return int.from_bytes(self._random(4), "big") / 2**32

    # ---- tasks -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Carry out the policy's actions at its deadlines, and whenever an input may have moved them."""
        await self._configured.wait()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._run_scope = nursery.cancel_scope
            for other in self.others.values():
                nursery.start_soon(other.run)
            try:
                while True:
                    self._wake = trio.Event()
                    now = self.clock()
                    self._apply(now)
                    if self.relays:
                        self._probe(now)
                    deadline = self.policy.next_deadline(now, self.session.get_timer())
                    if self.relays:
                        deadline = min(deadline, self.home.next_deadline(now))
                    # The deadline is on self.clock; trio sleeps on its own clock.
                    with trio.move_on_at(trio.current_time() + max(0.0, deadline - self.clock())):
                        await self._wake.wait()
            finally:
                self._nursery = None

    def _apply(self, now: float) -> None:
        for action in self.policy.tick(now, self.session.get_timer()):
            if isinstance(action, P.HelloUdp):
                self._hello(now)
            elif isinstance(action, P.OpenTcp):
                self._nursery.start_soon(self._run_tcp, action.attempt, action.index)
            elif isinstance(action, P.CloseTcp):
                scope = self._tcp_scopes.get(action.attempt)
                if scope is not None:
                    if not action.superseded:
                        log.info("relay: UDP relay answers again: closing the TCP relay")
                    scope.cancel()

    async def _run_tcp(self, attempt: int, index: int) -> None:
        with trio.CancelScope() as scope:
            self._tcp_scopes[attempt] = scope
            try:
                await self._tcp_session(attempt, index)
            finally:
                del self._tcp_scopes[attempt]

    async def _tcp_connect(self, index: int):
        """(a ready TCP relay client, its address) for the policy's address `index`; (None, None) when that failed."""
        if index >= len(self.tcp_addrs):
            return None, None  # re-configured with fewer addresses meanwhile
        host, port = self.tcp_addrs[index]
        t0 = self.clock()
        try:
            client = await open_tcp_relay(host, port, self.private_key, self.server_key, self._random,
                                          fwmark=self.fwmark, cred=self.cred)
        except (OSError, trio.TooSlowError, PermissionError, EOFError) as exc:
            log.info("relay: TCP %s failed: %s", join_hostport(host, port), exc or type(exc).__name__)
            return None, None
        self.tcp_latency = self.clock() - t0
        return client, (host, port)

    async def _tcp_session(self, attempt: int, index: int) -> None:
        client, addr = await self._tcp_connect(index)
        self._wake.set()
        if client is None:
            self.policy.tcp_failed(self.clock(), attempt, self._rand01())
            return
        try:
            self.policy.tcp_ready(self.clock(), attempt)
            if not self.policy.tcp_current(attempt):
                return
            self.tcp, self.tcp_addr = client, addr
            log.info("relay: using TCP relay %s (UDP relay did not answer)", join_hostport(*addr))
            async with trio.open_nursery() as n:
                n.start_soon(self._tcp_writer, client, n.cancel_scope)
                n.start_soon(self._tcp_reader, client, n.cancel_scope)
                self._flush_pending(self.clock())
            self.policy.tcp_lost(self.clock(), attempt, self._rand01())  # ignored after our own CloseTcp
        finally:
            if self.tcp is client:
                self.tcp = self.tcp_addr = None
            self._wake.set()
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _tcp_reader(self, client, scope) -> None:
        """Every relayed packet of a read delivered, then one flush (not one per packet); with the driver's
        reader, only the session's timer (see _tcp_watch)."""
        if self.route is not None and self.watch_tcp is not None and getattr(client, "fileno", None) is not None:
            await self._tcp_watch(client, scope)
            return
        try:
            while True:
                items = await client.receive_many()
                self._counters["recv_tcp"] += len(items)
                for src, packet in items:
                    self.deliver(src, packet)
                await self.after_rx()
        except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("relay: TCP relay closed: %s", exc)
        scope.cancel()

    async def _tcp_watch(self, client, scope) -> None:
        """The driver reads the socket (its fast path, and _tcp_frames for the rest); here the re-hellos at the
        session's timer, until the driver reports the close."""
        closed: list = []
        kick = self._tcp_kick = trio.Event()

        def on_closed(exc) -> None:
            closed.append(exc)
            if self._tcp_kick is not None:
                self._tcp_kick.set()
        frames, tail = client.detach_reader()
        if not self.watch_tcp(client.fileno, tail, self._tcp_frames, on_closed):
            closed.append(RuntimeError("no reader"))
        try:
            if frames:
                self._tcp_frames(frames, 0, self.clock())
                await self.after_rx()
            while not closed:
                with trio.move_on_at(client._timer_deadline()):
                    await kick.wait()
                kick = self._tcp_kick = trio.Event()
                if not closed and client.session.needs_hello(time.monotonic()):
                    await client.rehello()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            closed.append(exc)
        finally:
            self._tcp_kick = None
            self.unwatch_tcp(client.fileno)
        log.info("relay: TCP relay closed: %s", closed[0] if closed else "cancelled")
        scope.cancel()

    def _tcp_frames(self, frames: list, fast: int, now: float) -> None:
        """From the driver's read of the TCP relay: `fast` RECVs it handed to the core itself, and the other
        frames, checked by the TCP session as _tcp_reader's are and counted; RECVs delivered one by one."""
        if fast:
            self._counters["recv_tcp"] += fast
            self._counters["recv_tcp_fast"] += fast
        tcp, moved = self.tcp, False
        if tcp is None:
            self._counters["drop_tcp_closed"] += len(frames)
            return
        for frame in frames:
            ev = tcp.session.handle_untrusted(frame, time.monotonic())  # the TCP session's clock (relay_client's)
            if ev is None:
                self._counters["drop_tcp_bad_frame"] += 1
            elif ev[0] == "recv":
                self._counters["recv_tcp"] += 1
                self.deliver(ev[1], ev[2])
                if self.route is not None and ev[1] not in self._endpoints:
                    self._learn_endpoint(ev[1])
            else:
                moved = True  # a HELLO_OK or a notice: the session's timer may have moved
                if ev[0] == "notice":
                    self._counters["recv_notice_" + NOTICE_NAMES.get(ev[1], "unknown")] += 1
        if moved and self._tcp_kick is not None:
            self._tcp_kick.set()

    async def _tcp_writer(self, client, scope) -> None:
        """Everything queued since the last write goes out in one write (after a direct write's backlog)."""
        try:
            while True:
                while not self._tcp_out and not getattr(client, "backlog", False):
                    self._tcp_wake = wake = trio.Event()
                    await wake.wait()
                items = list(self._tcp_out)
                self._tcp_out.clear()
                await client.send_many(items)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, RuntimeError) as exc:
            log.info("relay: TCP relay send failed: %s", exc)
        finally:
            self._tcp_wake = None
        scope.cancel()

"""Relay forwarding decisions (DERP-like). Pure: time, wall clock and randomness are inputs.

A node proves possession of its key with a HELLO (nacl Box to the relay key, fresh wall-clock stamp,
single-use nonce). The relay answers with a session token bound to the source (a UDP address or a TCP
connection object). SEND frames carrying that token from that source are forwarded as RECV frames to the
destination key's current binding. Only keys in `allowed` (registered, unexpired nodes) get sessions.

A HELLO's UDP source becomes the node's published "observed" address (a birthday-punching target for every
peer) only once a SEND under the new token comes back from it: a node that spoofs its HELLO's source never
sees the HELLO_OK, so it cannot name another host. Nodes send an empty SEND to W.CONFIRM_DST right after
HELLO_OK for this; the relay forwards it nowhere.

Fast path (issue 16): with `fast_updates` a list (the UDP shell sets it when it has the compiled forwarder),
each confirmed session over UDP, or over a TCP connection the compiled side writes (its `fast_handle`), is
announced there as ("set", Session) and its end as ("remove", key). The shell
pushes them into meshwg/io/dataplane/_fastio.c's table, which forwards that session's SENDs to other such
sessions on its own, within `limits()`; everything else still comes here. This core stays the one that admits,
expires and limits sessions: the table holds only what it was told, and only until told otherwise.

Regional relays (issue 14.3): with `verifier` (a callable (key, credential, wall) -> None or a counter name; the
`meshwg-signal relay --region` process has no database) a node is admitted by the signed, expiring credential its
HELLO_CRED carries (signal_server/relay_auth.py), not by `allowed`. Without one, a HELLO_CRED is a HELLO: the
server's own relay checks its node list. PING frames get a PONG (latency and liveness probes), per source limited.

Plain WireGuard peers (issue 12; `plain`, a plain_ingress.PlainIngress): a datagram from the plain port goes to
the node the ingress names, as a RECV from W.PLAIN_SOURCE (handle_plain_untrusted); a SEND to a plain peer's key
(`plain_keys`, which never get sessions) goes out of the plain port to the address the ingress names (ToPlain).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from nacl.public import Box, PrivateKey, PublicKey

from meshwg.signaling import relay_wire as W
from meshwg.nonce_cache import NonceCache
from signal_server import relay_auth
from signal_server.conn_limits import source_key
from signal_server.ratelimit import KeyedLimiter, TokenBucket

HELLO_SKEW = 120.0  # seconds of wall-clock disagreement tolerated in a HELLO
HELLO_NONCE_CACHE = 100_000  # HELLOs remembered for replay checks (only authenticated ones are stored)
BOX_CACHE = 4096
# Junk per source address (a UDP address, or one TCP connection): HELLOs that fail to open or are stale,
# and the notices answering unregistered keys and unknown tokens. Bounded tables: spoofed sources are free.
JUNK_HELLO_RATE, JUNK_HELLO_BURST = 2.0, 10.0
# Junk crypto from sources not proven (below), whatever the source: spoofed sources are free, each with a
# fresh per-source budget, so this bounds that work (an open is ~2 us: 5,000/s is ~1% of a core).
JUNK_GLOBAL_RATE, JUNK_GLOBAL_BURST = 5000.0, 5000.0
# (UDP source, key) pairs confirmed recently (a SEND under the key's token came back from there). That key's
# HELLOs from there are always opened: a node's address is public (its observed candidate), and junk spoofed
# from it must not exhaust a budget the node's own HELLOs need, per source or global. (Opening at a small
# per-source rate instead would go to whichever HELLO comes first after each refill: at 3 junk HELLOs a
# second or more, mostly the junk's.) Their cost is bounded by the datagram rate: ~2 us on top of the ~4 us
# that receiving and dropping the datagram costs anyway.
PROVEN_TTL = 600.0
PROVEN_MAX = 65_536
NOTICE_RATE, NOTICE_BURST = 5.0, 20.0
# PONGs a source may get: a node probes each relay at most a few times a second; spoofed sources make the relay
# answer someone else, no bigger than the PING (no amplification), within this budget. A UDP source is its IP (an
# IPv6 /64), not its port, as for STUN: spoofed PINGs from a victim's many ports share one budget (~20 active nodes
# behind one NAT address fit in it). The global budget bounds what many spoofed IPs get (~10 Mbit/s of PONGs).
PING_RATE, PING_BURST = 40.0, 50.0
PING_GLOBAL_RATE, PING_GLOBAL_BURST = 20_000.0, 20_000.0
JUNK_SOURCES = 65_536


# The server's relay limits (`serve`/`relay` --relay-node-rate, --relay-node-pps, --relay-total-rate). A node's
# relayed video calls and file copies need hundreds of Mbit/s (issue 16: at least 200 by default); the packet
# rate guards the CPU against floods of tiny packets: 1 packet per 512 bytes of the byte rate is ~98 k packets/s
# at 400 Mbit/s (full-sized data at that rate is ~36 k, plus the TCP acks coming back).
NODE_RATE_MBIT = 400.0
BYTES_PER_PACKET_ALLOWED = 512
MIN_NODE_PPS = 4000.0


def limit_kwargs(node_mbit: float, node_pps: float | None, total_mbit: float) -> dict:
    """RelayCore's keyword arguments for these limits: Mbit/s per node, packets/s per node (None: derived
    from the rate), Mbit/s of all relayed traffic (0: no total limit; the server's CPU is the cap then)."""
    byte_rate = node_mbit * 1e6 / 8
    pps = node_pps if node_pps else max(MIN_NODE_PPS, byte_rate / BYTES_PER_PACKET_ALLOWED)
    return {"pkt_rate": pps, "pkt_burst": 2 * pps, "byte_rate": byte_rate, "total_rate": total_mbit * 1e6 / 8}


class WatchedLimiter(KeyedLimiter):
    """A KeyedLimiter that calls `watch()` when its rate or burst is set: the compiled forwarder applies the
    core's limits on its own thread, so it must hear of a change before the next datagram, not at a poll."""
    watch = None

    def __setattr__(self, name, value) -> None:
        object.__setattr__(self, name, value)
        if name in ("rate", "burst") and self.watch is not None:
            self.watch()


@dataclass(frozen=True)
class ToPlain:
    """A destination on the plain-WireGuard port: the datagram goes out unframed to `addr`."""
    addr: object


@dataclass
class Session:
    key: bytes
    token: bytes
    dest: object  # where RECV frames go: a UDP address object or a TCP connection
    expires: float
    observed: object = None  # the HELLO's UDP source, published once a SEND proves the node receives there
    confirmed: bool = False  # a SEND under this token came from dest
    recv_header: bytes = b""  # MAGIC | T_RECV | key: the head of every RECV frame this session's SENDs become
    fast: bool = False  # announced to the fast path (fast_updates)

    def __post_init__(self) -> None:
        self.recv_header = W.encode_recv(self.key, b"")


class RelayCore:
    def __init__(self, server_private: bytes, random_bytes, *, pkt_rate: float = 4000.0, pkt_burst: float = 8000.0,
                 byte_rate: float = 16e6, hello_rate: float = 5.0, session_ttl: float = W.SESSION_TTL,
                 plain=None, total_rate: float = 0.0, verifier=None) -> None:
        """pkt_rate, byte_rate: per node key (bursts pkt_burst and 2 s of byte_rate); total_rate: bytes a second
        of all relayed traffic (burst 1 s of it), 0 for none."""
        self._sk = PrivateKey(server_private)
        self.verifier = verifier  # credentials instead of `allowed` (a regional relay: see the module docstring)
        self.ping_limit = KeyedLimiter(PING_RATE, PING_BURST, JUNK_SOURCES)
        self.ping_global = TokenBucket(PING_GLOBAL_RATE, PING_GLOBAL_BURST)
        self.plain = plain  # a PlainIngress, or None (no plain port)
        self.plain_keys: frozenset[bytes] = frozenset()
        self._random = random_bytes
        self.allowed: set[bytes] = set()
        self.by_token: dict[bytes, Session] = {}
        self.by_key: dict[bytes, Session] = {}
        self._boxes: OrderedDict[bytes, Box] = OrderedDict()
        self._seen_nonces = NonceCache(HELLO_NONCE_CACHE)  # HELLO replay guard
        self.pkt_limit = WatchedLimiter(pkt_rate, pkt_burst)
        self.byte_limit = WatchedLimiter(byte_rate, byte_rate * 2)
        self.total_limit = TokenBucket(total_rate, total_rate) if total_rate > 0 else None
        self.fast_updates: list | None = None  # see the module docstring
        # The fast path's per-node budget, (key, size) -> bool, when there is one (FastRelay sets it): SENDs
        # forwarded here spend the same buckets as the compiled path's, so mixing paths buys nothing.
        self.node_charge = None
        # The same for the total limit, size -> bool: one total budget for both paths (FastRelay sets it).
        self.total_charge = None
        # Per node key, spent only by HELLOs that authenticate: junk naming a key cannot use up its budget.
        self.hello_limit = KeyedLimiter(hello_rate, hello_rate * 4)
        # Per source, charged for every HELLO that fails; once empty, that source's HELLOs are dropped
        # before their box is opened. A separate table from notices, so a node still sending under a dead
        # token (unknown-token frames) keeps its HELLO budget.
        self.junk_hello_limit = KeyedLimiter(JUNK_HELLO_RATE, JUNK_HELLO_BURST, JUNK_SOURCES)
        self.notice_limit = KeyedLimiter(NOTICE_RATE, NOTICE_BURST, JUNK_SOURCES)
        self.junk_global = TokenBucket(JUNK_GLOBAL_RATE, JUNK_GLOBAL_BURST)
        self._proven = NonceCache(PROVEN_MAX)  # (UDP source, key) pairs, each until (monotonic) PROVEN_TTL on
        self.session_ttl = session_ttl
        self.counters: Counter = Counter()
        self.observed_events: list[tuple[bytes, tuple]] = []

    # --- membership (driven by the registry)

    def set_allowed(self, keys) -> None:
        self.allowed = set(keys)
        for k in [k for k in self.by_key if k not in self.allowed]:
            self.drop_key(k)

    def set_plain(self, keys, targets) -> None:
        """The plain peers' keys (never a session) and the nodes they may reach (the ingress's targets)."""
        self.plain_keys = frozenset(keys)
        for k in self.plain_keys:
            self.drop_key(k)
        if self.plain is not None:
            self.plain.set_targets(targets)

    def drop_key(self, key: bytes) -> None:
        s = self.by_key.pop(key, None)
        if s is not None:
            self.by_token.pop(s.token, None)
            self._unfast(s)

    def _unfast(self, s: Session) -> None:
        if s.fast:
            s.fast = False
            if self.fast_updates is not None:
                self.fast_updates.append(("remove", s.key))

    # The limits as attributes: replacing one, or setting a WatchedLimiter's rate or burst, calls
    # `limits_changed()` (the fast path's, when there is one: see limits()).
    limits_changed = None

    def _limits_set(self) -> None:
        if self.limits_changed is not None:
            self.limits_changed()

    def _limiter_property(name):  # noqa: N805 (a helper of the class body)
        def get(self):
            return self.__dict__[name]

        def set_(self, value):
            self.__dict__[name] = value
            if isinstance(value, WatchedLimiter):
                value.watch = self._limits_set
            self._limits_set()
        return property(get, set_)

    pkt_limit = _limiter_property("pkt_limit")
    byte_limit = _limiter_property("byte_limit")
    total_limit = _limiter_property("total_limit")
    del _limiter_property

    def limits(self) -> tuple:
        """(pkts/s, pkt burst, bytes/s, byte burst) per node and (bytes/s, burst) in all (0: none), as the
        fast path must apply them (read each batch: a change here reaches it at once)."""
        total = self.total_limit
        return (self.pkt_limit.rate, self.pkt_limit.burst, self.byte_limit.rate, self.byte_limit.burst,
                total.rate if total else 0.0, total.burst if total else 0.0)

    def pop_fast_updates(self) -> list:
        out = self.fast_updates or []
        if out:
            self.fast_updates = []
        return out

    def drop_dest(self, dest) -> None:
        """A TCP connection went away."""
        for s in [s for s in self.by_key.values() if s.dest is dest]:
            self.by_key.pop(s.key, None)
            self.by_token.pop(s.token, None)
            self._unfast(s)
        src = _source(dest)
        self.junk_hello_limit.forget(src)
        self.notice_limit.forget(src)

    def _box(self, key: bytes) -> Box:
        box = self._boxes.get(key)
        if box is None:
            box = Box(self._sk, PublicKey(key))
            self._boxes[key] = box
            if len(self._boxes) > BOX_CACHE:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(key)
        return box

    # --- input

    def handle_untrusted(self, data: bytes, dest, now: float, wall: float, observed=None) -> list[tuple[bytes, object]]:
        """Process one relay frame from `dest`; returns (frame, destination) pairs to send."""
        t = W.frame_type_untrusted(data)
        if t == W.T_SEND:
            return self._on_send(data, dest, now)
        if t == W.T_HELLO or t == W.T_HELLO_CRED:
            return self._on_hello(data, dest, now, wall, observed)
        if t == W.T_PING:
            return self._on_ping(data, dest, now)
        self.counters["drop_bad_frame"] += 1
        return []

    def _on_ping(self, data, dest, now):
        nonce = W.parse_ping_untrusted(data)
        if nonce is None:
            self.counters["drop_bad_ping"] += 1
            return []
        if not self.ping_limit.allow(_ping_source(dest), now):
            self.counters["drop_ping_rate"] += 1
            return []
        if not self.ping_global.take(now):
            self.counters["drop_ping_global"] += 1
            return []
        self.counters["pong"] += 1
        return [(W.encode_ping(nonce, pong=True), dest)]

    def _parse_hello(self, data):
        """(key, credential or None, boxed) of a HELLO or HELLO_CRED, else None."""
        if data[4] == W.T_HELLO_CRED:
            return W.parse_hello_cred_untrusted(data)
        parsed = W.parse_hello_untrusted(data)
        return None if parsed is None else (parsed[0], None, parsed[1])

    def _refusal(self, key: bytes, cred, src, now: float, wall: float) -> str | None:
        """None when `key` may have a session: registered here, or (a regional relay) its credential checks;
        else "notice" (refused: say so) or "drop" (over the junk budgets: silence). The signature is checked
        only within the junk budgets (it costs what a box does)."""
        if self.verifier is None:
            if key in self.allowed:
                return None
            self.counters["refused_unregistered"] += 1  # cheap refusal before any crypto: one set lookup
            return "notice"
        if cred is None:
            self.counters["refused_no_credential"] += 1
            return "notice"
        if not self._may_open(key, src, now):
            return "drop"
        reason = self.verifier(key, cred, wall)
        if reason is not None:
            self.counters["refused_" + reason] += 1
            self._charge_junk(key, src, now)
            return "notice"
        return None

    def _on_hello(self, data, dest, now, wall, observed):
        parsed = self._parse_hello(data)
        if parsed is None:
            self.counters["drop_bad_hello"] += 1
            return []
        key, cred, boxed = parsed
        src = _source(dest)
        refusal = self._refusal(key, cred, src, now, wall)
        if refusal is not None:
            return self._notice(W.N_NOT_REGISTERED, key, dest, src, now) if refusal == "notice" else []
        if not self._may_open(key, src, now):
            return []
        opened = W.open_hello_untrusted(self._box(key), boxed)
        if opened is None:
            self.counters["drop_hello_auth"] += 1
            self._charge_junk(key, src, now)
            return []
        wall_ms, _ = opened
        nonce = boxed[:24]
        if abs(wall_ms / 1000.0 - wall) > HELLO_SKEW or self._seen_nonces.seen(nonce, wall):
            # A replay opens too: it is junk from its source, and never spends the key's budget.
            self.counters["drop_hello_stale"] += 1
            self._charge_junk(key, src, now)
            return self._notice(W.N_STALE_HELLO, key, dest, src, now)
        self._seen_nonces.add(nonce, wall + 2 * HELLO_SKEW)
        if not self.hello_limit.allow(key, now):
            self.counters["drop_hello_rate"] += 1
            return []
        old = self.by_key.get(key)
        if old is not None:
            self.by_token.pop(old.token, None)
            self._unfast(old)
        token = self._random(W.TOKEN_LEN)
        ttl = self._session_ttl(cred, wall)
        # `observed` waits for a SEND under this token from `dest` (see the module's docstring).
        s = Session(key, token, dest, now + ttl, observed)
        self.by_key[key] = s
        self.by_token[token] = s
        self.counters["hello_ok"] += 1
        reply = W.encode_hello_ok(self._box(key), token, int(ttl), observed, self._random(24))
        return [(reply, dest)]

    def _session_ttl(self, cred, wall: float) -> float:
        """A session admitted by a credential ends when the credential does (as the relay admits it: SKEW past
        its expiry): a removed node's last credential, not the sessions it renews, bounds its stay."""
        if self.verifier is None or cred is None:
            return self.session_ttl
        expires = relay_auth.credential_expires(cred)
        return self.session_ttl if expires is None else max(0.0, min(self.session_ttl,
                                                                       expires + relay_auth.SKEW - wall))

    def _confirm(self, s: Session, now: float) -> None:
        """The token came back from where its HELLO_OK went: the node receives there (it did not spoof
        its HELLO's source). Only now is that address published, and trusted by the junk limits."""
        s.confirmed = True
        if isinstance(s.dest, tuple):
            self._prove(s.dest, s.key, now)
        if self.fast_updates is not None and (isinstance(s.dest, tuple) or getattr(s.dest, "fast_handle", None)
                                              is not None):
            s.fast = True
            self.fast_updates.append(("set", s))
        if s.observed is not None:
            self.observed_events.append((s.key, s.observed))

    def _may_open(self, key: bytes, src, now: float) -> bool:
        """Whether a HELLO naming `key` from `src` is worth opening its box (junk budgets, before crypto)."""
        if self._is_proven(src, key, now):
            return True
        if self.junk_hello_limit.exhausted(src, now):
            self.counters["drop_hello_junk_rate"] += 1
            return False
        self.junk_global.take(now, 0.0)  # refill only
        if self.junk_global.tokens < 1.0:
            self.counters["drop_hello_junk_global"] += 1
            return False
        return True

    def _charge_junk(self, key: bytes, src, now: float) -> None:
        self.junk_hello_limit.allow(src, now)
        if not self._is_proven(src, key, now):
            self.junk_global.take(now)

    def _prove(self, src, key: bytes, now: float) -> None:
        self._proven.add((src, key), now + PROVEN_TTL)

    def _is_proven(self, src, key: bytes, now: float) -> bool:
        return self._proven.seen((src, key), now)

    def _notice(self, code: int, key: bytes, dest, src, now: float) -> list[tuple[bytes, object]]:
        """An unauthenticated hint, at most NOTICE_RATE a second per source (notices answer junk)."""
        if self.notice_limit.allow(src, now):
            return [(W.encode_notice(code, key), dest)]
        return []

    def _on_send(self, data, dest, now):
        parsed = W.parse_send_untrusted(data)
        if parsed is None:
            self.counters["drop_bad_send"] += 1
            return []
        token, dst_key, packet = parsed
        s = self.by_token.get(token)
        if s is None or s.dest != dest or s.expires < now:
            # Unknown or stale session: the sender must HELLO (again) first.
            self.counters["refused_no_session"] += 1
            if s is not None and s.expires < now:
                self.drop_key(s.key)
            return self._notice(W.N_REHELLO, bytes(32), dest, _source(dest), now)
        if not s.confirmed:
            self._confirm(s, now)
        if dst_key == W.CONFIRM_DST and not packet:
            self.counters["confirm"] += 1
            return []
        if len(packet) > W.MAX_PACKET:
            self.counters["drop_too_big"] += 1
            return []
        if not self._node_allows(s.key, now, len(packet)):
            self.counters["drop_rate_limited"] += 1
            self.counters["drop_relay_node_limit"] += 1
            return []
        if not self._total_allows(now, len(packet)):
            self.counters["drop_rate_limited"] += 1
            self.counters["drop_relay_total_limit"] += 1
            return []
        if dst_key in self.plain_keys or dst_key == W.PLAIN_SOURCE:
            # PLAIN_SOURCE: what the node's WireGuard answers to a plain datagram's source (a cookie reply
            # under load) before it knows the peer; the ingress routes both by receiver index.
            return self._to_plain(s.key, packet, now)
        peer = self.by_key.get(dst_key)
        if peer is None or peer.expires < now:
            self.counters["drop_peer_absent"] += 1
            return []
        self.counters["forwarded_packets"] += 1
        self.counters["forwarded_bytes"] += len(packet)
        return [(s.recv_header + packet, peer.dest)]

    def _node_allows(self, key: bytes, now: float, size: int) -> bool:
        if self.node_charge is not None:
            return self.node_charge(key, size)
        return self.pkt_limit.allow(key, now) and self.byte_limit.allow(key, now, size)

    def _total_allows(self, now: float, size: int) -> bool:
        if self.total_limit is None:
            return True
        if self.total_charge is not None:
            return self.total_charge(size)
        return self.total_limit.take(now, size)

    def _to_plain(self, node_key: bytes, packet: bytes, now: float) -> list[tuple[bytes, object]]:
        """A node's datagram for one of its plain peers: to the address the ingress learned for it."""
        addr = None if self.plain is None else self.plain.route_from_node(node_key, packet, now)
        if addr is None:
            self.counters["drop_plain_unrouted"] += 1  # the ingress counts why
            return []
        self.counters["forwarded_to_plain_packets"] += 1
        self.counters["forwarded_to_plain_bytes"] += len(packet)
        return [(packet, ToPlain(addr))]

    def handle_plain_untrusted(self, data: bytes, src, now: float) -> list[tuple[bytes, object]]:
        """A datagram from the plain port: to the node the ingress names, as a RECV from W.PLAIN_SOURCE."""
        if self.plain is None:
            return []
        node_key = self.plain.route_from_plain(data, src, now)
        if node_key is None:
            return []  # the ingress counted it
        peer = self.by_key.get(node_key)
        if peer is None or peer.expires < now:
            self.counters["drop_plain_node_absent"] += 1
            return []
        # The plain peers of one node share one sender's budget, as one node's traffic does.
        limit_key = (W.PLAIN_SOURCE, node_key)
        if not self.pkt_limit.allow(limit_key, now) or not self.byte_limit.allow(limit_key, now, len(data)):
            self.counters["drop_plain_rate_limited"] += 1
            return []
        if not self._total_allows(now, len(data)):
            self.counters["drop_plain_rate_limited"] += 1
            self.counters["drop_relay_total_limit"] += 1
            return []
        self.counters["forwarded_from_plain_packets"] += 1
        self.counters["forwarded_from_plain_bytes"] += len(data)
        return [(W.encode_recv(W.PLAIN_SOURCE, data), peer.dest)]

    def expire(self, now: float) -> None:
        for s in [s for s in self.by_key.values() if s.expires < now]:
            self.drop_key(s.key)

    def pop_observed(self) -> list[tuple[bytes, tuple]]:
        out, self.observed_events = self.observed_events, []
        return out


def _ping_source(dest):
    """The PONG budget's key: a UDP source's IP (IPv6: its /64) whatever its socket and port, a TCP connection
    by identity (a TCP source cannot be spoofed)."""
    addr = dest[1] if isinstance(dest, tuple) and len(dest) == 2 else None
    if isinstance(addr, tuple) and addr and isinstance(addr[0], str):
        return source_key(addr[0])
    return _source(dest)


def _source(dest):
    """The junk limiters' key for a destination: a UDP (socket index, address) tuple as is, a TCP
    connection by identity (holding the object would keep a closed connection alive in the table)."""
    return dest if isinstance(dest, tuple) else ("conn", id(dest))

"""Relay ingress for plain WireGuard peers (issue 12). Pure and sans-IO: time is an input; nothing is decrypted.

A phone running a stock WireGuard app sends to the signal server's plain-WireGuard UDP port; this core says which
node each datagram goes to (over that node's relay session), and which phone address a node's datagram goes back
to. It only reads the clear header fields of WireGuard messages:

- A handshake initiation (type 1, 148 B) names its responder only through mac1, keyed by HASH("mac1----" ||
  responder's public key): it is matched against the nodes plain peers may reach (`set_targets`) and goes to the
  one whose key verifies it, else nowhere. Its sender index and source address are remembered ("pending").
- The node's response (type 2) carries receiver = that sender index and the node's own sender index: the pair of
  indexes is learned, and from then on transport data (type 4) and cookie replies (type 3) are routed by receiver
  index, both ways: phone -> node by the node's index, node -> phone by (node, phone's index) to the phone's
  latest address.
- A phone changing address (Wi-Fi <-> mobile data) keeps working: a type 4 datagram for a known index from a new
  source moves the phone's address, as WireGuard roaming does. The server cannot authenticate it, so only a
  known index pair moves, and a source's tries at indexes it does not hold (misses, and roams) share one small
  per-source budget: guessing a live index is slow, and a source that guesses cannot also roam.

Limits are charged before the work they guard: initiations pay a per-source (IPv4 address, IPv6 /64) and a global
token bucket before any mac1 check; tables are bounded (oldest evicted). Every datagram moves exactly one
`drop_<reason>` or `forward_<kind>` counter in `counters`; `roam`, `evict_*` and `replace_pair` count alongside.

    ingress = PlainIngress()
    ingress.set_targets({node_public_key, ...})            # nodes plain peers may reach (mac1 keys precomputed)
    node_key = ingress.route_from_plain(data, src, now)    # -> the node to relay `data` to, or None (dropped)
    addr = ingress.route_from_node(node_key, data, now)    # -> the plain address to send `data` to, or None
    ingress.sweep(now)                                     # optional: expiry also runs from the two calls above

The data is forwarded unchanged. Node-initiated handshakes are not routed (dropped and counted): the phone's
WireGuard is the initiator (it re-handshakes every 2 minutes and after its keepalives go unanswered).
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable

from meshwg.token_bucket import KeyedLimiter, TokenBucket
from meshwg.wg.constants import (
    COOKIE_REPLY_SIZE, INITIATION_MAC1_OFFSET, INITIATION_SIZE, KEEPALIVE_SIZE, MSG_COOKIE_REPLY, MSG_INITIATION,
    MSG_RESPONSE, MSG_TRANSPORT, REJECT_AFTER_TIME, REKEY_TIMEOUT, RESPONSE_SIZE,
)
from meshwg.wg.cookie import CookieChecker

# An initiation waits this long for the node's response or cookie reply; its initiator sends a new one (with a
# new index) after REKEY_TIMEOUT plus jitter, so an older answer would reach no handshake.
PENDING_LIFETIME = 2 * REKEY_TIMEOUT
# Both ends refuse a session's keys REJECT_AFTER_TIME after its handshake (the phone re-handshakes after 120 s);
# the margin covers relay latency between the node making the keys and this core seeing its response.
PAIR_LIFETIME = REJECT_AFTER_TIME + 10.0
SWEEP_INTERVAL = 1.0
# A phone sends at most one initiation per 5 s; several phones may share one carrier-grade NAT address.
INIT_RATE, INIT_BURST = 5.0, 10.0
# mac1 checks in all (each ~0.7 us per target node): bounds a flood from many sources.
INIT_GLOBAL_RATE, INIT_GLOBAL_BURST = 2000.0, 2000.0
# Datagrams naming an index the source does not hold, and roams: a node's index has 16 random bits under its
# index tag, so guessing one from a source takes hours at this rate.
MISS_RATE, MISS_BURST = 10.0, 100.0
MAX_PENDING = 4096
MAX_PAIRS = 65_536
MAX_SOURCES = 65_536

_HEAD = struct.Struct("<II")  # type (read as LE u32: non-zero reserved bytes make an unknown type), index


class _Pending:
    __slots__ = ("src", "expires")

    def __init__(self, src: object, expires: float) -> None:
        self.src, self.expires = src, expires


class _Pair:
    __slots__ = ("node_key", "node_index", "phone_index", "addr", "expires")

    def __init__(self, node_key: bytes, node_index: int, phone_index: int, addr: object, expires: float) -> None:
        self.node_key, self.node_index, self.phone_index = node_key, node_index, phone_index
        self.addr, self.expires = addr, expires


def _no_random(n: int) -> bytes:
    raise RuntimeError("the ingress makes no cookies")  # CookieChecker is used for check_mac1 only


def source_key(src: object) -> object:
    """What the per-source budgets count by: the IP of an IPv4 source, the /64 of an IPv6 one (one host has many)."""
    if not isinstance(src, tuple) or not src:
        return src
    host = src[0]
    if isinstance(host, str) and ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0]).packed[:8]
        except ValueError:
            return host
    return host


class PlainIngress:
    def __init__(self, *, init_rate: float = INIT_RATE, init_burst: float = INIT_BURST,
                 init_global_rate: float = INIT_GLOBAL_RATE, init_global_burst: float = INIT_GLOBAL_BURST,
                 miss_rate: float = MISS_RATE, miss_burst: float = MISS_BURST, max_pending: int = MAX_PENDING,
                 max_pairs: int = MAX_PAIRS, max_sources: int = MAX_SOURCES) -> None:
        self.counters: Counter = Counter()
        self.max_pending, self.max_pairs = max_pending, max_pairs
        self._checkers: dict[bytes, CookieChecker] = {}
        # Insertion order is expiry order (fixed lifetimes; a refreshed entry is re-inserted): sweeps stop early.
        self._pending: dict[tuple[bytes, int], _Pending] = {}  # (node key, phone's sender index)
        self._pairs: dict[int, _Pair] = {}  # node's index -> pair (phone -> node)
        self._to_plain: dict[tuple[bytes, int], _Pair] = {}  # (node key, phone's index) -> the same pairs
        self._init_limiter = KeyedLimiter(init_rate, init_burst, max_sources)
        self._init_global = TokenBucket(init_global_rate, init_global_burst)
        self._misses = KeyedLimiter(miss_rate, miss_burst, max_sources)
        self._next_sweep = float("-inf")

    # ---------------------------------------------------------------- configuration and state

    @property
    def targets(self) -> frozenset[bytes]:
        return frozenset(self._checkers)

    def set_targets(self, node_keys: Iterable[bytes]) -> None:
        """The nodes plain peers may reach. A node leaving the set loses its pending handshakes and pairs."""
        wanted = set(node_keys)
        for key in [k for k in self._checkers if k not in wanted]:
            del self._checkers[key]
            for pk in [pk for pk in self._pending if pk[0] == key]:
                del self._pending[pk]
            for pair in [p for p in self._pairs.values() if p.node_key == key]:
                self._remove_pair(pair)
        for key in wanted:
            if key not in self._checkers:
                checker = CookieChecker(_no_random)
                checker.set_public_key(key)  # precomputes HASH("mac1----" || key)
                self._checkers[key] = checker

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def pair_count(self) -> int:
        return len(self._pairs)

    def phone_address(self, node_key: bytes, phone_index: int) -> object | None:
        pair = self._to_plain.get((node_key, phone_index))
        return None if pair is None else pair.addr

    def sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL
        expired = []
        for pk, pending in self._pending.items():
            if pending.expires > now:
                break
            expired.append(pk)
        for pk in expired:
            del self._pending[pk]
        old = []
        for pair in self._pairs.values():
            if pair.expires > now:
                break
            old.append(pair)
        for pair in old:
            self._remove_pair(pair)

    # ---------------------------------------------------------------- datagrams

    def route_from_plain(self, data: bytes, src: object, now: float) -> bytes | None:
        """A datagram from the plain port: the key of the node to relay it to, or None (dropped, counted)."""
        if now >= self._next_sweep:
            self.sweep(now)
        n = len(data)
        if n < KEEPALIVE_SIZE:  # the smallest WireGuard message
            self.counters["drop_short"] += 1
            return None
        kind, index = _HEAD.unpack_from(data)
        if kind == MSG_TRANSPORT:
            pair = self._pairs.get(index)
            if pair is None:
                self._charge_miss(src, now)
                self.counters["drop_unknown_index"] += 1
                return None
            if src != pair.addr and not self._roam(pair, src, now):
                return None
            self.counters["forward_transport_to_node"] += 1
            return pair.node_key
        if kind == MSG_INITIATION and n == INITIATION_SIZE:
            return self._initiation(data, index, src, now)
        if kind == MSG_COOKIE_REPLY and n == COOKIE_REPLY_SIZE:
            pair = self._pairs.get(index)  # the phone answers a node's response under load
            if pair is None:
                self._charge_miss(src, now)
                self.counters["drop_unknown_index"] += 1
                return None
            self.counters["forward_cookie_to_node"] += 1
            return pair.node_key
        if kind == MSG_RESPONSE and n == RESPONSE_SIZE:
            self.counters["drop_unsolicited_response"] += 1  # no node initiation is ever sent to a phone
            return None
        self.counters["drop_malformed" if kind in (1, 2, 3) else "drop_unknown_type"] += 1
        return None

    def route_from_node(self, node_key: bytes, data: bytes, now: float) -> object | None:
        """A datagram a node sent to the relay for its plain peers: the address to send it to, or None."""
        if now >= self._next_sweep:
            self.sweep(now)
        n = len(data)
        if n < KEEPALIVE_SIZE:
            self.counters["drop_node_short"] += 1
            return None
        kind, index = _HEAD.unpack_from(data)
        if kind == MSG_TRANSPORT:
            pair = self._to_plain.get((node_key, index))
            if pair is None:
                self.counters["drop_node_unknown_index"] += 1
                return None
            self.counters["forward_transport_to_plain"] += 1
            return pair.addr
        if kind == MSG_RESPONSE and n == RESPONSE_SIZE:
            phone_index = _HEAD.unpack_from(data, 4)[1]
            pending = self._pending.pop((node_key, phone_index), None)
            if pending is None:
                self.counters["drop_node_unknown_index"] += 1
                return None
            self._add_pair(_Pair(node_key, index, phone_index, pending.src, now + PAIR_LIFETIME))
            self.counters["forward_response"] += 1
            return pending.src
        if kind == MSG_COOKIE_REPLY and n == COOKIE_REPLY_SIZE:
            # receiver = the sender index of the message it answers: a pending initiation (the node is under load)
            pending = self._pending.get((node_key, index))
            if pending is None:
                self.counters["drop_node_unknown_index"] += 1
                return None
            self.counters["forward_cookie_to_plain"] += 1
            return pending.src
        if kind == MSG_INITIATION and n == INITIATION_SIZE:
            self.counters["drop_node_initiation"] += 1
            return None
        self.counters["drop_node_malformed" if kind in (1, 2, 3) else "drop_node_unknown_type"] += 1
        return None

    # ---------------------------------------------------------------- internals

    def _initiation(self, data: bytes, sender: int, src: object, now: float) -> bytes | None:
        if not self._init_limiter.allow(source_key(src), now):
            self.counters["drop_init_ratelimited"] += 1
            return None
        if not self._init_global.take(now):
            self.counters["drop_init_global_limit"] += 1
            return None
        node_key = None
        for key, checker in self._checkers.items():
            if checker.check_mac1(data, INITIATION_MAC1_OFFSET):
                node_key = key
                break
        if node_key is None:
            self.counters["drop_init_no_target"] += 1
            return None
        pk = (node_key, sender)
        old = self._pending.pop(pk, None)
        if old is not None and old.src != src and old.expires > now:
            # The node answers only the first copy of an initiation (the timestamp must grow): a copy replayed
            # from elsewhere must not take the answer away from the phone.
            self._pending[pk] = old
            self.counters["drop_init_index_taken"] += 1
            return None
        while len(self._pending) >= self.max_pending:
            del self._pending[next(iter(self._pending))]
            self.counters["evict_pending"] += 1
        self._pending[pk] = _Pending(src, now + PENDING_LIFETIME)
        self.counters["forward_initiation"] += 1
        return node_key

    def _charge_miss(self, src: object, now: float) -> None:
        self._misses.allow(source_key(src), now)

    def _roam(self, pair: _Pair, src: object, now: float) -> bool:
        if not self._misses.allow(source_key(src), now):
            self.counters["drop_roam_refused"] += 1
            return False
        pair.addr = src
        self.counters["roam"] += 1
        return True

    def _add_pair(self, pair: _Pair) -> None:
        # An index collision between nodes, or a repeated response: the newer pair wins.
        by_node, by_phone = self._pairs.get(pair.node_index), self._to_plain.get((pair.node_key, pair.phone_index))
        olds = {id(p): p for p in (by_node, by_phone) if p is not None}
        for old in olds.values():
            self._remove_pair(old)
            self.counters["replace_pair"] += 1
        while len(self._pairs) >= self.max_pairs:
            self._remove_pair(next(iter(self._pairs.values())))
            self.counters["evict_pair"] += 1
        self._pairs[pair.node_index] = pair
        self._to_plain[(pair.node_key, pair.phone_index)] = pair

    def _remove_pair(self, pair: _Pair) -> None:
        if self._pairs.get(pair.node_index) is pair:
            del self._pairs[pair.node_index]
        if self._to_plain.get((pair.node_key, pair.phone_index)) is pair:
            del self._to_plain[(pair.node_key, pair.phone_index)]

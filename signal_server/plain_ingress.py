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
- A node index belongs to the node whose response brought it, for as long as its pair lives: a response naming an
  index another node's live pair holds is refused (`drop_node_index_taken`), so a registered node cannot take
  over another node's phones by answering its own initiation with their index. Each node holds at most
  `max_pairs_per_node` pairs (its own oldest go first), and a full table evicts from the node holding the most:
  one node's handshakes never push out another's pairs. (Ownership is per index, not per 16-bit index tag: tags
  are random per node, and two honest nodes sharing one would otherwise lock one's phones out.)
- A phone changing address (Wi-Fi <-> mobile data) keeps working: a type 4 datagram for a known index from a new
  source moves the phone's address (`roam`), as WireGuard roaming does, if its 64-bit counter (bytes 8-16, in
  clear) is higher than every counter seen on that pair from the phone: a replayed or stale datagram never moves
  it (`drop_roam_stale`). The first counter (0) must come from the address that made the handshake. A move to a
  new source is charged to that source's budget, which it shares with its tries at indexes it does not hold
  (misses): guessing a live index is slow, and a source that guesses cannot also roam. A move back to the
  previous address, with a counter higher than any seen from it, is free (`roam_return`): an attacker's move is
  undone by the phone's next datagram and cannot spend the phone's budget.

What remains (the server cannot decrypt, so its roaming is not authenticated; WireGuard's own is): whoever knows
a live node index and a counter above the phone's (an on-path attacker who sees the traffic, or one that guessed
the index and forged a high counter) can still move the pair's address, and then trade it back and forth with
the phone; node -> phone datagrams go to the attacker (still encrypted: lost, not read) until the phone's next
datagram. The phone's own datagrams keep reaching the node, and the phone's re-handshake (every 2 minutes, or
after 15 s without answers) makes a new pair under a new index.

Limits are charged before the work they guard: each initiation pays a per-source (IPv4 address, IPv6 /64) budget
and a global budget of mac1 checks (one per target node) before the checks; only one whose mac1 matched pays the
global forward budget, so junk cannot spend what phones need. Sources that hold live pairs (phones re-keying)
skip both global budgets. Tables are bounded (oldest evicted). Every datagram moves exactly one `drop_<reason>`
or `forward_<kind>` counter in `counters`; `roam`, `roam_return`, `evict_*` and `replace_pair` count alongside.

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
# mac1 checks in all, one per target node each (~0.7 us): bounds the CPU a flood from many sources costs.
CHECK_GLOBAL_RATE, CHECK_GLOBAL_BURST = 200_000.0, 50_000.0
# Initiations whose mac1 matched, forwarded to nodes in all.
INIT_GLOBAL_RATE, INIT_GLOBAL_BURST = 2000.0, 2000.0
# Datagrams naming an index the source does not hold, and roams: a node's index has 16 random bits under its
# index tag, so guessing one from a source takes hours at this rate.
MISS_RATE, MISS_BURST = 10.0, 100.0
MAX_PENDING = 4096
MAX_PAIRS = 65_536
# A phone holds about 3 live pairs per node (current, previous, next session): over 1,000 phones per node.
MAX_PAIRS_PER_NODE = 4096
MAX_SOURCES = 65_536

_HEAD = struct.Struct("<II")  # type (read as LE u32: non-zero reserved bytes make an unknown type), index
_COUNTER = struct.Struct("<Q")  # a transport message's counter, at offset 8
_NOWHERE = object()  # a pair's previous address before it ever moved


class _Pending:
    __slots__ = ("src", "expires")

    def __init__(self, src: object, expires: float) -> None:
        self.src, self.expires = src, expires


class _Pair:
    __slots__ = ("node_key", "node_index", "phone_index", "addr", "expires", "top", "addr_top", "prev", "prev_top")

    def __init__(self, node_key: bytes, node_index: int, phone_index: int, addr: object, expires: float) -> None:
        self.node_key, self.node_index, self.phone_index = node_key, node_index, phone_index
        self.addr, self.expires = addr, expires
        # Highest phone -> node counters seen: on the pair, from `addr`, and from `prev` (the address before).
        # Counter 0 counts as seen: the phone's first datagram must come from the handshake's address.
        self.top = self.addr_top = self.prev_top = 0
        self.prev = _NOWHERE


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
                 check_global_rate: float = CHECK_GLOBAL_RATE, check_global_burst: float = CHECK_GLOBAL_BURST,
                 miss_rate: float = MISS_RATE, miss_burst: float = MISS_BURST, max_pending: int = MAX_PENDING,
                 max_pairs: int = MAX_PAIRS, max_pairs_per_node: int = MAX_PAIRS_PER_NODE,
                 max_sources: int = MAX_SOURCES) -> None:
        self.counters: Counter = Counter()
        self.max_pending, self.max_pairs, self.max_pairs_per_node = max_pending, max_pairs, max_pairs_per_node
        self._checkers: dict[bytes, CookieChecker] = {}
        # Insertion order is expiry order (fixed lifetimes; a refreshed entry is re-inserted): sweeps stop early.
        self._pending: dict[tuple[bytes, int], _Pending] = {}  # (node key, phone's sender index)
        self._pairs: dict[int, _Pair] = {}  # node's index -> pair (phone -> node)
        self._to_plain: dict[tuple[bytes, int], _Pair] = {}  # (node key, phone's index) -> the same pairs
        self._node_pairs: dict[bytes, dict[int, _Pair]] = {}  # node key -> its pairs by its index, oldest first
        self._live_sources: Counter = Counter()  # source_key of each live pair's address -> pairs
        self._init_limiter = KeyedLimiter(init_rate, init_burst, max_sources)
        self._check_global = TokenBucket(check_global_rate, check_global_burst)
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
            for pair in list(self._node_pairs.get(key, {}).values()):
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
            if not self._phone_at(pair, data, src, now):
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
            if not self._add_pair(_Pair(node_key, index, phone_index, pending.src, now + PAIR_LIFETIME)):
                self.counters["drop_node_index_taken"] += 1  # another node's live pair holds that index
                return None
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
        sk = source_key(src)
        if not self._init_limiter.allow(sk, now):
            self.counters["drop_init_ratelimited"] += 1
            return None
        live = sk in self._live_sources  # a phone re-keying from where its session is: junk cannot starve it
        if not live and not self._check_global.take(now, max(1, len(self._checkers))):
            self.counters["drop_init_check_limit"] += 1
            return None
        node_key = None
        for key, checker in self._checkers.items():
            if checker.check_mac1(data, INITIATION_MAC1_OFFSET):
                node_key = key
                break
        if node_key is None:
            self.counters["drop_init_no_target"] += 1
            return None
        if not live and not self._init_global.take(now):  # only what may reach a node pays for forwarding
            self.counters["drop_init_global_limit"] += 1
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

    def _phone_at(self, pair: _Pair, data: bytes, src: object, now: float) -> bool:
        """Whether a transport datagram on `pair` from `src` goes on; moves the pair's address when it may."""
        counter = _COUNTER.unpack_from(data, 8)[0]
        if src == pair.addr:
            pair.addr_top = max(pair.addr_top, counter)
            pair.top = max(pair.top, counter)
            return True
        returning = src == pair.prev and counter > pair.prev_top
        if not returning and counter <= pair.top:
            self.counters["drop_roam_stale"] += 1  # a replayed or late datagram: never moves the phone
            return False
        if not returning and not self._misses.allow(source_key(src), now):
            self.counters["drop_roam_refused"] += 1
            return False
        self._live_sources[source_key(src)] += 1
        self._unlive(pair.addr)
        pair.prev, pair.prev_top = pair.addr, pair.addr_top
        pair.addr, pair.addr_top = src, counter
        pair.top = max(pair.top, counter)
        self.counters["roam"] += 1
        if returning:
            self.counters["roam_return"] += 1
        return True

    def _add_pair(self, pair: _Pair) -> bool:
        """Adds `pair`, unless another node's live pair holds its node index (the existing pair wins)."""
        held = self._pairs.get(pair.node_index)
        if held is not None and held.node_key != pair.node_key:
            return False
        # A repeated response, or this node reusing an index: the newer pair wins within one node.
        by_phone = self._to_plain.get((pair.node_key, pair.phone_index))
        olds = {id(p): p for p in (held, by_phone) if p is not None}
        for old in olds.values():
            self._remove_pair(old)
            self.counters["replace_pair"] += 1
        mine = self._node_pairs.setdefault(pair.node_key, {})
        while len(mine) >= self.max_pairs_per_node:
            self._remove_pair(next(iter(mine.values())))
            self.counters["evict_pair"] += 1
        while len(self._pairs) >= self.max_pairs:
            # From the node holding the most pairs: a node filling the table pushes out its own first.
            biggest = max(self._node_pairs.values(), key=len)
            self._remove_pair(next(iter(biggest.values())))
            self.counters["evict_pair"] += 1
        self._pairs[pair.node_index] = pair
        self._to_plain[(pair.node_key, pair.phone_index)] = pair
        self._node_pairs.setdefault(pair.node_key, {})[pair.node_index] = pair
        self._live_sources[source_key(pair.addr)] += 1
        return True

    def _unlive(self, addr: object) -> None:
        sk = source_key(addr)
        self._live_sources[sk] -= 1
        if self._live_sources[sk] <= 0:
            del self._live_sources[sk]

    def _remove_pair(self, pair: _Pair) -> None:
        if self._pairs.get(pair.node_index) is pair:
            del self._pairs[pair.node_index]
        if self._to_plain.get((pair.node_key, pair.phone_index)) is pair:
            del self._to_plain[(pair.node_key, pair.phone_index)]
        mine = self._node_pairs.get(pair.node_key)
        if mine is not None and mine.get(pair.node_index) is pair:
            del mine[pair.node_index]
            self._unlive(pair.addr)
            if not mine:
                del self._node_pairs[pair.node_key]

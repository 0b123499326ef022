"""Per-peer path state machine: which candidates to probe, when, and which path carries traffic.

Pure: time is `now`, randomness comes from the owner, outputs are action objects the node turns into
sealed datagrams. Policy in short:
- Traffic uses the relay from the first packet; a pong from a direct candidate makes it the path.
- The chosen direct path is pinged every HEARTBEAT_INTERVAL while the peer is active; when no pong
  arrived for TRUST_DURATION the peer falls back to the relay (within ~4.5 s of a cut).
- While relayed and active, all candidates are probed in rounds backing off 5 s -> 60 s; while direct,
  all are re-probed every UPGRADE_INTERVAL (a better path may appear), or, when the path is already
  within GOOD_ENOUGH_LATENCY, only the candidates of a better address kind (a LAN address over a NAT).
- Idle (no traffic for SESSION_ACTIVE_TIMEOUT): no probing at all; traffic resumes probing at once.
- Probes are bounded: at most MAX_CANDIDATES candidates per peer, invalid ones dropped, a per-peer token
  bucket, plus the node's global bucket passed in as `budget` (the node also bounds each address).
- A ping's source becomes a candidate only once it answered a ping of ours from that same address
  (Tailscale's disco does the same): a sealed ping from a spoofed source earns one ping back, no more.
- NAT traversal techniques (meshwg.disco.techniques, birthday punching first) run beside the probe rounds:
  PeerPaths arms and polls them, sends their probes and passes their socket actions on.
"""

from __future__ import annotations

import collections
import ipaddress
import math
from dataclasses import dataclass, field

from meshwg.disco import paths as P
from meshwg.disco.netcheck import EDM
from meshwg.disco.techniques import Probe, Started, Technique
from meshwg.disco.techniques import birthday as BD
from meshwg.token_bucket import TokenBucket

MAX_CANDIDATES = 16
MAX_PENDING_PINGS = 64
PEER_PING_RATE = 20.0        # pings per second per peer (token bucket)
PEER_PING_BURST = 20.0
PONG_RATE = 20.0             # pongs per second per peer: a chatty peer cannot make us a reflector
PONG_BURST = 20.0
MAX_PEER_REFLEXIVE = 4       # ping sources being verified at once (a birthday hit is always verified)
VERIFY_INTERVAL = 1.0        # at most one verification ping a second to an unverified ping source

# Candidate sources, best first when the list must be truncated.
SOURCE_RANK = {"observed": 0, "stun": 1, "directory": 2, "ping": 3, "cmm": 4, "local": 5}

# The NAT traversal techniques every peer runs (one file each in meshwg/disco/techniques).
TECHNIQUES: tuple[type[Technique], ...] = (BD.Birthday,)


@dataclass(frozen=True)
class SendPing:
    addr: tuple
    txid: bytes
    via: int | None = None        # extra socket index (a technique's), None = main socket
    technique: str | None = None  # the technique's probe (the node bounds these per target IP), None = a normal one


@dataclass(frozen=True)
class SendPong:
    addr: tuple
    txid: bytes
    observed: tuple
    via: int | None = None


@dataclass(frozen=True)
class SendCallMeMaybe:
    pass


@dataclass
class Candidate:
    addr: tuple
    source: str
    via: int | None = None
    last_ping: float = -math.inf
    last_pong: float | None = None
    latency: float | None = None  # the least of the recent samples: queueing on a busy host only adds
    # Its source stopped listing it while it was our trusted path: kept only until another address answers or it stops
    # answering itself (the peer moved networks: its old address must not stay among the candidates beside the new).
    withdrawn: bool = False
    last_ping_back: float = -math.inf   # our last ping answering one of the peer's from here (VERIFY_INTERVAL)
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=P.LATENCY_SAMPLES))

    def sample(self, rtt: float) -> float:
        self.samples.append(rtt)
        self.latency = min(self.samples)
        return self.latency


def parse_network(text):
    """An ip_network from a prefix text ("100.64.0.0/10"; host bits allowed), None if empty or not one."""
    try:
        return ipaddress.ip_network(str(text), strict=False) if text else None
    except ValueError:
        return None


def in_networks(ip, nets) -> bool:
    """`ip` (an ip_address) lies in one of `nets` (ip_networks of either family)."""
    return any(ip.version == net.version and ip in net for net in nets)


def valid_candidate(addr: object, blocked=()) -> bool:
    """Drop candidates no honest peer would advertise, or that would aim probes at no peer: loopback (our
    own host), unspecified, multicast (link-local included), broadcast, reserved, and the `blocked`
    networks (the mesh's own prefixes). Private ranges stay (LAN peers need them)."""
    if not (isinstance(addr, tuple) and len(addr) == 2):
        return False
    ip_s, port = addr
    if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(ip_s, str):
        return False
    try:
        ip = ipaddress.ip_address(ip_s)
    except ValueError:
        return False
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_loopback:
        return False
    if in_networks(ip, blocked):
        return False
    if ip.version == 4 and ip_s == "255.255.255.255":
        return False
    if ip.version == 6 and (ip.is_link_local or ip.ipv4_mapped is not None):
        return False  # link-local needs a scope we do not carry; mapped forms are written as IPv4
    return True


def _hhmmss(wall: float) -> str:
    # Status text only; wall is an input (UTC, the shell may localise).
    s = int(wall) % 86400
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class PeerPaths:
    def __init__(self, peer_key: bytes, random_bytes, *, local_nat: str | None = None,
                 peer_nat: str | None = None):
        self.peer_key = peer_key
        self._random = random_bytes
        self.candidates: dict[tuple, Candidate] = {}
        self._pending: dict[bytes, tuple[tuple, float, int | None]] = {}
        self.best: P.ScoredPath | None = None
        self.best_via: int | None = None
        self.trust_until = -math.inf
        self.last_activity = -math.inf
        self.next_probe_at = math.inf
        self.probe_attempt = 0
        self.next_heartbeat_at = math.inf
        self._contend_left = 0        # heartbeats that still re-ping higher-bonus candidates
        self.last_cmm_sent = -math.inf
        self.want_cmm = False
        self._answer_cmm = False
        self.unanswered_since: float | None = None   # wall time of the first unanswered round
        self.local_nat, self.peer_nat = local_nat, peer_nat
        self._ping_bucket = TokenBucket(PEER_PING_RATE, PEER_PING_BURST)
        self._pong_bucket = TokenBucket(PONG_RATE, PONG_BURST)
        self._outbox: list = []
        self.counters: collections.Counter = collections.Counter()   # meshwg.counters' convention
        self.techniques: list[Technique] = [t(random_bytes) for t in TECHNIQUES]
        self._verifying: dict[tuple, tuple] = {}   # unverified ping source -> (last ping back, via)

    # --- inputs -----------------------------------------------------------------------------
    def set_candidates(self, source: str, addrs, now: float) -> bool:
        """Replace the candidates of one source; returns True when the set changed."""
        new = []
        for a in addrs:
            if isinstance(a, list):
                a = tuple(a)
            if valid_candidate(a) and a not in new:
                new.append(a)
        old = {a for a, c in self.candidates.items() if c.source == source}
        changed = False
        for a in old - set(new):
            if self.best is None or self.best.addr != a or now >= self.trust_until:
                del self.candidates[a]
                changed = True
            elif not self.candidates[a].withdrawn:
                self.candidates[a].withdrawn = True
                changed = True  # probe now: the peer likely moved (_probe_round)
        for a in new:
            if a not in self.candidates:
                self.candidates[a] = Candidate(a, source)
                changed = True
            elif (SOURCE_RANK.get(source, 9) < SOURCE_RANK.get(self.candidates[a].source, 9)
                  or self.candidates[a].source == "ping"):
                # The peer advertises it now (a call-me-maybe ranks below "ping"): it earns the LAN bonus.
                self.candidates[a].source = source
            self.candidates[a].withdrawn = False  # listed (again)
        self._trim()
        if changed:
            self.probe_attempt = 0
            if self.active(now):
                self.next_probe_at = min(self.next_probe_at, now)
            return True
        return False

    def _best_withdrawn(self) -> bool:
        c = self.candidates.get(self.best.addr) if self.best is not None else None
        return c is not None and c.withdrawn

    def _drop_withdrawn(self) -> None:
        """A withdrawn address goes once it is not our path any more."""
        for a in [a for a, c in self.candidates.items() if c.withdrawn and a != self.best.addr]:
            del self.candidates[a]
            self.counters["drop_withdrawn_candidate"] += 1

    def _trim(self) -> None:
        if len(self.candidates) <= MAX_CANDIDATES:
            return
        keep_best = self.best.addr if self.best else None
        ranked = sorted(self.candidates.values(),
                        key=lambda c: (c.addr != keep_best, c.last_pong is None, SOURCE_RANK.get(c.source, 9)))
        self.candidates = {c.addr: c for c in ranked[:MAX_CANDIDATES]}

    def note_activity(self, now: float) -> bool:
        """Traffic now; returns True when the peer was idle (probing resumes: the owner should poll)."""
        was_idle = not self.active(now)
        self.last_activity = now
        if was_idle:
            # Resume instantly: probe now, tell the peer to probe us too.
            self.probe_attempt = 0
            self.next_probe_at = now
            self.want_cmm = True
            if self.best is not None:
                self.next_heartbeat_at = now
        return was_idle

    def on_punch(self, now: float) -> None:
        """The server says both sides want to talk: probe every candidate now."""
        self.last_activity = max(self.last_activity, now)
        self.probe_attempt = 0
        self.next_probe_at = now
        self.want_cmm = True
        self._arm_techniques(now)

    def on_call_me_maybe(self, endpoints, now: float) -> None:
        self.set_candidates("cmm", endpoints, now)
        # The peer is pinging us right now: ping back at once so both NATs open. This neither marks
        # us active nor sends a call-me-maybe back (two idle peers must not keep each other awake).
        self._answer_cmm = True
        if self.active(now):
            self._arm_techniques(now)

    def on_ping(self, txid: bytes, src: tuple, via: int | None, now: float) -> None:
        if not self._pong_bucket.take(now):
            self.counters["limit_pong_rate"] += 1
            return
        self._outbox.append(SendPong(src, txid, src, via))
        if not valid_candidate(src):
            return
        if via is not None:
            self._socket_alive(via)   # the peer reaches us on this socket: it must stay open
        cand = self.candidates.get(src)
        if cand is None:
            self._verify_source(src, via, now)
            return
        if via is not None:
            cand.via = via
        # Ping back unconfirmed sources so our NAT opens and we measure the path ourselves. Even when we pinged it a
        # moment ago: in a simultaneous punch that ping reached the peer's NAT before the peer's own ping opened it
        # and was dropped, so waiting for the next round cost the second side seconds (once ticks stopped polling).
        if cand.last_pong is None and now - cand.last_ping_back >= VERIFY_INTERVAL:
            if self._ping(cand, now, None):
                cand.last_ping_back = now

    def _verify_source(self, src: tuple, via: int | None, now: float) -> None:
        """Ping back a source we do not know: it becomes a candidate when it answers from there (on_pong),
        which a spoofed source cannot. The ping back also opens our NAT towards it."""
        for a in [a for a, (t, _) in self._verifying.items() if now - t > P.PING_TIMEOUT]:
            del self._verifying[a]
        last = self._verifying.get(src)
        if last is not None and now - last[0] < VERIFY_INTERVAL:
            return
        # Birthday hits (via set) are always verified: they are the whole point of the attempt.
        if (last is None and via is None
                and sum(1 for _, v in self._verifying.values() if v is None) >= MAX_PEER_REFLEXIVE):
            self.counters["limit_ping_verifying"] += 1
            return
        if not self._ping_bucket.take(now):
            self.counters["limit_ping_rate"] += 1
            return
        self._verifying[src] = (now, via)
        self._send_ping(src, via, now, MAX_PENDING_PINGS)

    def on_pong(self, txid: bytes, now: float, via: int | None = None, src: tuple | None = None) -> bool:
        """A pong for one of our pings; `src` is where it came from (None: not known, trusted as the
        pinged address)."""
        entry = self._pending.get(txid)
        if entry is None:
            self.counters["drop_pong_unmatched"] += 1
            return False
        addr, sent_at, pvia = entry
        cand = self.candidates.get(addr)
        if pvia != via or (cand is None and src is not None and src != addr):
            # A ping source is verified only by an answer from that very address.
            self.counters["drop_pong_unmatched"] += 1
            return False
        del self._pending[txid]
        self.counters["recv_pong"] += 1
        if cand is None:
            self._verifying.pop(addr, None)
            cand = self.candidates[addr] = Candidate(addr, "ping", via=pvia)
        cand.last_pong = now
        latency = cand.sample(max(0.0, now - sent_at))
        if pvia is not None:
            cand.via = pvia
            self._socket_alive(pvia)
        scored = P.ScoredPath(addr, latency, advertised=cand.source != "ping")
        if self.best is not None and self.best.addr == addr:
            self.best = scored
            self.trust_until = now + P.TRUST_DURATION
        elif (self.best is None or now >= self.trust_until or self._best_withdrawn()
              or P.better_path(scored, self.best)):
            self.best, self.best_via = scored, cand.via
            self._drop_withdrawn()
            self.trust_until = now + P.TRUST_DURATION
            self.counters["switch_path"] += 1
            self.next_heartbeat_at = now + P.HEARTBEAT_INTERVAL
            self._contend_left = P.CONTENDER_ROUNDS
            self._stop_techniques()
        self._trim()
        self.unanswered_since = None
        self.probe_attempt = 0
        return True

    def expect_pong(self, txid: bytes, addr: tuple, via: int | None, now: float) -> None:
        """A ping the node sent for the user (meshwg.disco.user_ping) to candidate `addr`: its pong counts as the
        answer to any ping of ours (on_pong), no more; the same pending bound."""
        if len(self._pending) >= MAX_PENDING_PINGS:
            self._pending.pop(next(iter(self._pending)))
        self._pending[txid] = (addr, now, via)

    def pong_allowed(self, now: float) -> bool:
        """One pong more within the per-peer pong rate (a ping through the relay is answered there, not here)."""
        if self._pong_bucket.take(now):
            return True
        self.counters["limit_pong_rate"] += 1
        return False

    def set_nat(self, local_nat: str | None, peer_nat: str | None) -> None:
        self.local_nat, self.peer_nat = local_nat, peer_nat

    # --- decisions ----------------------------------------------------------------------------
    def active(self, now: float) -> bool:
        return now - self.last_activity < P.SESSION_ACTIVE_TIMEOUT

    def direct(self, now: float) -> bool:
        return self.best is not None and now < self.trust_until

    def endpoint(self, now: float):
        """(addr, via) of the direct path when trusted, else None (use the relay)."""
        if self.direct(now):
            return self.best.addr, self.best_via
        return None

    def relay_reason(self, now: float, wall: float) -> str:
        if self.direct(now):
            return ""
        if self.local_nat == EDM and self.peer_nat == EDM:
            return "symmetric NAT on both sides"
        if not self.candidates:
            return "no direct candidates known"
        if not self.active(now):
            # No traffic, so no probes: a past direct path timed out for want of heartbeats, not answers.
            return "idle (not probing)"
        if self.unanswered_since is not None:
            return "probes unanswered since " + _hhmmss(self.unanswered_since)
        if self.best is not None and now >= self.trust_until:
            return "direct path stopped answering"
        return "probing direct candidates"

    # --- timers -------------------------------------------------------------------------------
    def poll(self, now: float, wall: float, budget) -> list:
        """Run due timers; return actions. `budget(n)` -> bool takes n probes from the node's
        global rate limit."""
        active = self.active(now)
        if self.best is not None and now >= self.trust_until and self._best_withdrawn():
            del self.candidates[self.best.addr]  # withdrawn, and no longer answering: nothing keeps it
            self.counters["drop_withdrawn_candidate"] += 1
        if self.best is not None and now >= self.trust_until and self.unanswered_since is None:
            self.unanswered_since = wall - (now - (self.trust_until - P.TRUST_DURATION))
        if self._answer_cmm:
            self._answer_cmm = False
            for cand in list(self.candidates.values()):
                self._ping(cand, now, budget)
        if active:
            if self.best is not None and now >= self.next_heartbeat_at:
                self.next_heartbeat_at = now + P.HEARTBEAT_INTERVAL
                cand = self.candidates.get(self.best.addr)
                if cand is not None:
                    self._ping(cand, now, budget)
                if self._contend_left > 0:
                    self._contend_left -= 1
                    self._ping_contenders(now, budget)
            if now >= self.next_probe_at:
                self._probe_round(now, wall, budget)
            for t in self.techniques:
                self._run(t, t.poll(self, now, budget), now)
        else:
            self._stop_techniques()
        if self.want_cmm and active and now >= self.last_cmm_sent + P.CALL_ME_MAYBE_MIN_INTERVAL:
            self.want_cmm = False
            self.last_cmm_sent = now
            self._outbox.append(SendCallMeMaybe())
        # forget stale pings
        if self._pending:
            for txid in [t for t, (_, sent, _) in self._pending.items() if now - sent > P.PING_TIMEOUT]:
                del self._pending[txid]
        out, self._outbox = self._outbox, []
        return out

    def _probe_round(self, now: float, wall: float, budget) -> None:
        # A path the peer no longer lists does not hold the round back to contenders: ping every candidate.
        if self.direct(now) and not self._best_withdrawn():
            self.next_probe_at = now + P.UPGRADE_INTERVAL
            if self.best.latency <= P.GOOD_ENOUGH_LATENCY:
                # As Tailscale: no latency gain is worth a full round here. Unlike it, still re-ping the
                # better address kinds: their bonus can win (LAN over hairpin NAT, test_lan_preference).
                self._ping_contenders(now, budget)
                return
        else:
            if self.candidates and self.unanswered_since is None and self.probe_attempt > 0:
                # the previous round got nothing back
                self.unanswered_since = wall - P.probe_interval(self.probe_attempt - 1)
            self.next_probe_at = now + P.probe_interval(self.probe_attempt)
            self.probe_attempt += 1
            self.want_cmm = True
            self._arm_techniques(now)
        for cand in list(self.candidates.values()):
            self._ping(cand, now, budget)

    def _ping_contenders(self, now: float, budget) -> None:
        """Re-ping the candidates that beat the best path on address kind, in step with its heartbeat.

        A switch is decided on one RTT sample each; a LAN candidate's first one is often slow (ARP),
        and while direct others are re-probed only every UPGRADE_INTERVAL. Paired samples right after
        the switch let the better kind win; below GOOD_ENOUGH_LATENCY the upgrade round pings just these."""
        best_bonus = P.addr_bonus(self.best.addr, self.best.advertised)
        for cand in list(self.candidates.values()):
            if cand.addr != self.best.addr and P.addr_bonus(cand.addr, cand.source != "ping") > best_bonus:
                self._ping(cand, now, budget)

    def _ping(self, cand: Candidate, now: float, budget) -> bool:
        if not self._ping_bucket.take(now) or (budget is not None and not budget(1)):
            self.counters["limit_ping_rate"] += 1
            return False
        self._send_ping(cand.addr, cand.via, now, MAX_PENDING_PINGS)
        cand.last_ping = now
        return True

    def _send_ping(self, addr: tuple, via: int | None, now: float, max_pending: int,
                   technique: str | None = None) -> None:
        """Emit a ping and remember its txid, evicting the oldest pending one beyond max_pending."""
        txid = self._random(12)
        if len(self._pending) >= max_pending:
            self._pending.pop(next(iter(self._pending)))
        self._pending[txid] = (addr, now, via)
        self.counters["send_ping"] += 1
        self._outbox.append(SendPing(addr, txid, via, technique))

    # --- NAT traversal techniques (meshwg.disco.techniques) ------------------------------------
    def observed_addr(self) -> tuple | None:
        """The peer's address as the signal server saw it: the only one a technique's bursts aim at (no
        address a peer reported, nor one it pinged us from: those can name anyone)."""
        return next((c.addr for c in self.candidates.values() if c.source == "observed"), None)

    @property
    def birthday(self) -> BD.BirthdayPlan | None:
        """The running birthday attempt, or None."""
        return self._technique(BD.Birthday.name).plan

    def birthday_role(self) -> str | None:
        return BD.role_for(self.local_nat, self.peer_nat)

    def holds_sockets(self) -> bool:
        """A running technique has extra sockets open for this peer (the node closes them if it goes)."""
        return any(t.holds_sockets for t in self.techniques)

    def _technique(self, name: str) -> Technique:
        return next(t for t in self.techniques if t.name == name)

    def _arm_techniques(self, now: float) -> None:
        for t in self.techniques:
            t.arm(self, now)

    def _stop_techniques(self) -> None:
        for t in self.techniques:
            if t.running:
                self._outbox += t.stop()

    def _socket_alive(self, via: int) -> None:
        for t in self.techniques:
            t.socket_alive(via)

    def _run(self, t: Technique, actions: list, now: float) -> None:
        """Carry out a technique's actions: its probes become pings with their own pending bound."""
        for act in actions:
            if isinstance(act, Probe):
                self._send_ping(act.addr, act.via, now, MAX_PENDING_PINGS + t.max_outstanding, technique=t.name)
            elif isinstance(act, Started):
                self.counters[f"attempt_{t.name}"] += 1
            else:
                self._outbox.append(act)

    # --- scheduling ---------------------------------------------------------------------------
    def get_timer(self, now_hint: float | None = None) -> float:
        t = [self.trust_until if self.best is not None and self.trust_until > (now_hint or -math.inf) else math.inf]
        if self.last_activity > -math.inf:
            idle_at = self.last_activity + P.SESSION_ACTIVE_TIMEOUT
            if now_hint is None or now_hint < idle_at:
                t.append(self.next_probe_at)
                t += [tech.deadline() for tech in self.techniques]
                if self.best is not None:
                    t.append(self.next_heartbeat_at)
                if self.want_cmm:
                    t.append(self.last_cmm_sent + P.CALL_ME_MAYBE_MIN_INTERVAL)
                t.append(idle_at)
        if self._outbox or self._answer_cmm:
            return -math.inf
        return min(t)

"""Path scoring and discovery timing constants. Pure functions, no state.

Scoring follows Tailscale's betterAddr idea: points = percentage latency advantage, plus bonuses for
address kinds that are cheaper/more robust (loopback, link-local, private LAN, IPv6); a direct path
always beats the relay; a new path must win by more than SWITCH_MARGIN points (hysteresis).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# Timing (seconds). Tailscale trusts a pong for 6.5 s with a 3 s heartbeat; the lab requires falling
# back to the relay within 5 s of a cut, so we ping the best path every 2 s and trust a pong 4.5 s
# (one lost pong is tolerated: 2 pings fit in the window).
HEARTBEAT_INTERVAL = 2.0
TRUST_DURATION = 4.5
PING_TIMEOUT = 5.0               # an unanswered ping is forgotten after this
PROBE_INTERVAL_MIN = 5.0         # re-probe all candidates while relayed: 5, 10, 20, 40, 60, 60 ...
UPGRADE_INTERVAL = 60.0          # while direct (or relayed long), look for better paths this often
SESSION_ACTIVE_TIMEOUT = 45.0    # no traffic this long -> idle: stop probing
GOOD_ENOUGH_LATENCY = 0.005      # direct this fast: upgrade rounds ping only better address kinds
CALL_ME_MAYBE_MIN_INTERVAL = 5.0

SWITCH_MARGIN = 1.0              # points a challenger needs above the incumbent (>1 % better)
# One RTT sample of a userspace agent jitters by milliseconds (scheduling on a busy host, ARP on a
# path's first packet): this much of a latency gain is noise and earns no points. Without it a noisy
# first sample (2.7 ms vs 1.6 ms = 40 points) outweighed the LAN bonus and parked LAN peers on the NAT.
MIN_ABS_GAIN = 0.002
# A path's latency is the least of its last few samples (one pong in four may be late on a busy host
# without moving traffic off the peer's LAN address: seen in the lab, a 10 ms sample against the hairpin's 1 ms).
LATENCY_SAMPLES = 4
CONTENDER_ROUNDS = 3             # heartbeats after a switch that also re-ping higher-bonus candidates


@dataclass(frozen=True)
class ScoredPath:
    addr: object                  # (ip, port) for direct paths; anything else counts as relay
    latency: float                # seconds (RTT)
    # False for an address only learned as the source of a ping: a hairpinning router's LAN address
    # must not earn the LAN bonus that belongs to the peer's own (advertised) address.
    advertised: bool = True

    @property
    def is_direct(self) -> bool:
        return is_direct_addr(self.addr)


def is_direct_addr(addr: object) -> bool:
    return isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[0], str)


# Real LAN ranges only: Python's is_private also covers the documentation ranges the NAT lab uses as
# "public" addresses, which would give every lab path the LAN bonus.
_LAN_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


def addr_bonus(addr: object, advertised: bool = True) -> float:
    """Score bonus of a direct address kind (points, comparable to percent latency)."""
    if not is_direct_addr(addr):
        return 0.0
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return 0.0
    bonus = 0.0
    if ip.is_loopback:
        bonus += 50
    elif ip.is_link_local:
        bonus += 30
    elif advertised and any(ip in net for net in _LAN_NETS if net.version == ip.version):
        bonus += 20
    if ip.version == 6:
        bonus += 10
    return bonus


def advantage_points(new: ScoredPath, old: ScoredPath) -> float:
    """How many points `new` is ahead of `old` (negative: behind)."""
    if new.is_direct != old.is_direct:
        return float("inf") if new.is_direct else float("-inf")
    points = addr_bonus(new.addr, new.advertised) - addr_bonus(old.addr, old.advertised)
    lo, hi = min(new.latency, old.latency), max(new.latency, old.latency)
    if hi > 0 and hi - lo > MIN_ABS_GAIN:
        pct = (hi - lo - MIN_ABS_GAIN) / hi * 100.0
        points += pct if new.latency < old.latency else -pct
    return points


def better_path(new: ScoredPath, old: ScoredPath | None) -> bool:
    """True when `new` should replace `old` as the peer's path (hysteresis included)."""
    if old is None:
        return True
    if new.addr == old.addr:
        return False
    return advantage_points(new, old) > SWITCH_MARGIN


def probe_interval(attempt: int) -> float:
    """Backoff between full probe rounds while relayed and active: 5 s doubling, capped at 60 s."""
    return min(UPGRADE_INTERVAL, PROBE_INTERVAL_MIN * (2 ** max(0, attempt)))

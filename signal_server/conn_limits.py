"""Connection accounting for the signal server's TCP listeners. Pure: time is an input.

One source (an IPv4 address, or an IPv6 /64, which one host or site usually holds whole) must not be able
to take every slot of a phase that costs the server a descriptor and a task before it knows who is
there: unauthenticated control connections, relay TCP connections. `SourceLimits` counts the live
connections of such a phase per source and in total, and charges each accepted connection to a
per-source rate bucket at accept, before any work is done for it.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from dataclasses import dataclass

from signal_server.ratelimit import KeyedLimiter

__all__ = ["Refusal", "SourceLimits", "relay_tcp_caps", "source_key"]

NOFILE_CEILING = 1 << 20  # an "unlimited" descriptor limit is read as this many


def source_key(ip: str) -> str:
    """The accounting unit of a peer address: the IPv4 address, or the IPv6 /64 ("2001:db8:1:2::/64").
    An IPv4-mapped IPv6 address counts as its IPv4 address; a zone id is ignored; junk stays as is."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True)
class Refusal:
    reason: str  # "rate" | "per_source" | "global"
    retry_after: int  # seconds: the hint sent to a client that can read one (BUSY frame)


class SourceLimits:
    """Live connections of one phase, per source and in total, plus an accept rate per source.

    admit() decides at accept (and counts the connection in when it says yes); release() must follow
    every admitted connection when it leaves the phase. Memory: the per-source table holds only sources
    with live connections (at most `total`), the rate table is bounded by `max_keys`."""

    def __init__(self, total: int, per_source: int, rate: float | None = None, burst: float | None = None,
                 *, cap_retry: int = 2, max_keys: int = 50_000) -> None:
        self.total, self.per_source, self.cap_retry = total, per_source, cap_retry
        self.rate = rate
        self._accepts = KeyedLimiter(rate, burst if burst is not None else rate, max_keys) if rate else None
        self._held: Counter = Counter()
        self.active = 0

    def admit(self, ip: str, now: float) -> Refusal | None:
        """None: admitted (counted in). Every attempt spends from the source's rate bucket, refused ones
        too, so that hammering the port keeps a source refused rather than letting it retry at will."""
        key = source_key(ip)
        if self._accepts is not None and not self._accepts.allow(key, now):
            return Refusal("rate", max(1, math.ceil(1.0 / self.rate)))
        if self._held[key] >= self.per_source:
            return Refusal("per_source", self.cap_retry)
        if self.active >= self.total:
            return Refusal("global", self.cap_retry)
        self._held[key] += 1
        self.active += 1
        return None

    def release(self, ip: str) -> None:
        key = source_key(ip)
        n = self._held.get(key, 0)
        if n <= 0:
            return  # never admitted (or released twice): nothing to give back
        if n == 1:
            del self._held[key]
        else:
            self._held[key] = n - 1
        self.active -= 1

    def held(self, ip: str) -> int:
        return self._held.get(source_key(ip), 0)

    @property
    def sources(self) -> int:
        return len(self._held)


def relay_tcp_caps(nofile_soft: int, share: float, total: int | None = None,
                   per_source: int | None = None) -> tuple[int, int]:
    """(total, per_source) caps of relay TCP connections. Unset caps come from the descriptor budget:
    relay TCP may hold at most `share` of RLIMIT_NOFILE's soft limit, so that the control listener
    (nodes' sessions, joins) always has descriptors left; one source at most an eighth of that."""
    if nofile_soft <= 0 or nofile_soft > NOFILE_CEILING:  # RLIM_INFINITY and friends
        nofile_soft = NOFILE_CEILING
    if total is None:
        total = max(1, int(nofile_soft * share))
    if per_source is None:
        # A site that blocks UDP has only the TCP relay: the floor keeps a household or an office on it
        # even where the descriptor limit is small; the ceiling keeps one address from holding tens of
        # thousands where it is large (`serve` raises its soft limit to the hard one).
        per_source = min(max(64, total // 8), 4096)
    return total, min(per_source, total)

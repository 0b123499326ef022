"""Which of the server's STUN sockets answers a Binding request, and with what. Pure: the shell only sends.

The server can have up to two addresses per family, each with a main port (STUN + relay) and an
alternate port (STUN only): the RFC 3489/5780 layout (A1:P1, A1:P2, A2:P1, A2:P2) that lets clients
test their NAT's filtering with CHANGE-REQUEST. A change the layout cannot honour is dropped rather
than answered from the wrong place: an answer from the receiving socket would read as "the NAT let
the changed source through", i.e. a falsely open NAT.

An RFC 5389 request carrying comprehension-required attributes the codec does not understand (including
RFC 5780's RESPONSE-PORT and PADDING, which this server does not implement) gets a 420 "Unknown
Attribute" error from the receiving socket, never from a CHANGE-REQUEST target. Classic (RFC 3489)
requests are answered as before.

Anyone can spoof a request's source, so answers are a reflection tool: they are limited per source IP
(a bounded table) and carry only what the client needs. An RFC 5389 answer is XOR-MAPPED-ADDRESS, plus
OTHER-ADDRESS when the server can honour changes (RFC 5780 clients learn it from a plain request),
RESPONSE-ORIGIN only in answers to a CHANGE-REQUEST, and FINGERPRINT only when the request carried one;
no MAPPED-ADDRESS (classic clients get the classic answer) and no SOFTWARE. Classic answers keep the
three addresses RFC 3489 makes mandatory.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from meshwg.disco import stun
from signal_server.ratelimit import KeyedLimiter

WILDCARDS = ("0.0.0.0", "::")
# Answers per source IP: a node's STUN and netcheck send a handful a second (netcheck's retransmits and
# `stun`'s NAT test some tens at once); a spoofed flood gets BURST + RATE x seconds.
ANSWER_RATE, ANSWER_BURST = 20.0, 50.0
ANSWER_SOURCES = 65_536
_FINGERPRINT_HEAD = struct.pack("!HH", stun.ATTR_FINGERPRINT, 4)


@dataclass(frozen=True)
class StunSocket:
    addr: tuple      # (ip, port) as bound
    alt: bool        # the alternate port of its address (STUN only, no relay)


@dataclass(frozen=True)
class Reply:
    sock: int        # index (into the layout's sockets) to send from
    data: bytes


class StunResponder:
    def __init__(self, sockets: list[StunSocket], *, rate: float = ANSWER_RATE, burst: float = ANSWER_BURST,
                 max_sources: int = ANSWER_SOURCES) -> None:
        self.sockets = list(sockets)
        self.limit = KeyedLimiter(rate, burst, max_sources)
        self._by_place = {(s.addr[0], s.alt): i for i, s in enumerate(self.sockets)}
        # Distinct concrete IPs per family in configuration order: each one's "other" is the next.
        self._ips: dict[int, list[str]] = {}
        for s in self.sockets:
            ip = s.addr[0]
            if ip in WILDCARDS:
                continue  # the kernel picks the source: it cannot stand for one concrete address
            fam = ipaddress.ip_address(ip).version
            if ip not in self._ips.setdefault(fam, []):
                self._ips[fam].append(ip)

    def other_ip(self, ip: str) -> str | None:
        if ip in WILDCARDS:
            return None
        ips = self._ips.get(ipaddress.ip_address(ip).version, [])
        if len(ips) < 2 or ip not in ips:
            return None
        return ips[(ips.index(ip) + 1) % len(ips)]

    def target(self, idx: int, change: int) -> int | None:
        """The socket that answers a request received on socket idx asking for `change`; None: cannot."""
        s = self.sockets[idx]
        ip = s.addr[0]
        if change & stun.CHANGE_IP:
            ip = self.other_ip(ip)
            if ip is None:
                return None
        alt = (not s.alt) if change & stun.CHANGE_PORT else s.alt
        return self._by_place.get((ip, alt))

    def other_address(self, idx: int) -> tuple | None:
        """RFC 5780 OTHER-ADDRESS / RFC 3489 CHANGED-ADDRESS of socket idx: its other IP and other port."""
        t = self.target(idx, stun.CHANGE_IP | stun.CHANGE_PORT)
        return None if t is None else self.sockets[t].addr

    def handle_untrusted(self, idx: int, data: bytes, src, now: float) -> tuple[Reply | None, tuple]:
        """(reply or None, counter names to bump). Bad bytes give (None, (reason,)); never raises on input."""
        req = stun.parse_any_binding_request_untrusted(data)
        if req is None:
            return None, ("udp_dropped_unknown",)
        if req.classic and ":" in src[0]:
            return None, ("stun_classic_v6_dropped",)  # RFC 3489 addresses are IPv4 only
        fingerprint = not req.classic and data[-8:-4] == _FINGERPRINT_HEAD  # FINGERPRINT is always last
        if req.unknown:
            # RFC 5389 7.3.1: 420 before any processing, so a CHANGE-REQUEST alongside is not honoured and
            # the error leaves from the receiving socket (the client is not testing filtering with it).
            if not self.limit.allow(src[0], now):
                return None, ("stun_rate_limited",)
            error = stun.build_unknown_attribute_error(req.txid, req.unknown, software=False, fingerprint=fingerprint)
            return Reply(idx, error), ("stun_unknown_attribute",)
        out = self.target(idx, req.change)
        if out is None:
            return None, ("stun_change_unsupported",)
        if not self.limit.allow(src[0], now):
            return None, ("stun_rate_limited",)
        here = self.sockets[out].addr
        other = self.other_address(idx)
        if req.classic:
            data = stun.build_classic_binding_response(req.txid, src, here, other)
            counters = ("stun_classic_requests",)
        else:
            # RESPONSE-ORIGIN says which of our addresses answered: news only when the client asked for another.
            origin = None if here[0] in WILDCARDS or not req.change else here
            data = stun.build_binding_response(req.txid, src, response_origin=origin, other_address=other,
                                               mapped=False, software=False, fingerprint=fingerprint)
            counters = ("stun_requests",)
        if req.change:
            counters += ("stun_change_requests",)
        return Reply(out, data), counters

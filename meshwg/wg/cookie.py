"""mac1/mac2, cookie replies and the handshake rate limiter (WireGuard whitepaper §5.3, §5.4.4, §5.4.7;
wireguard-go device/cookie.go, ratelimiter/ratelimiter.go).

CookieChecker is the responder side (one per device, keyed by our static key); CookieGenerator is the
initiator side (one per peer, keyed by the peer's static key).
"""

from __future__ import annotations

import hmac as _hmac
import ipaddress
from collections.abc import Callable

from . import crypto
from .constants import (
    COOKIE_LEN, COOKIE_NONCE_LEN, COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1, RATELIMIT_BURST,
    RATELIMIT_GC_INTERVAL, RATELIMIT_PACKETS_PER_SECOND,
)

_NO_MAC2 = bytes(COOKIE_LEN)


def address_bytes(addr: object) -> bytes:
    """Deterministic bytes of a source address for the cookie: IP bytes + BE port (the kernel's encoding).

    The cookie is opaque to the initiator, so opaque endpoints (relay objects) just use their repr.
    """
    if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str) and isinstance(addr[1], int):
        try:
            return ipaddress.ip_address(addr[0]).packed + (addr[1] & 0xFFFF).to_bytes(2, "big")
        except ValueError:
            pass
    return repr(addr).encode()


def address_host(addr: object) -> object:
    """The rate limiter's key: the source IP for (host, port) tuples, else the whole endpoint."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return addr[0]
    return addr


class CookieChecker:
    """Validates mac1/mac2 on messages addressed to us and makes cookie replies."""

    def __init__(self, random_bytes: Callable[[int], bytes]):
        self._random = random_bytes
        self.mac1_key = b""
        self.cookie_key = b""
        self.secret = b""
        self.secret_time = float("-inf")
        self.enabled = False

    def set_public_key(self, public_key: bytes | None) -> None:
        self.enabled = public_key is not None
        if public_key is not None:
            self.mac1_key = crypto.hash(LABEL_MAC1, public_key)
            self.cookie_key = crypto.hash(LABEL_COOKIE, public_key)

    def check_mac1(self, msg: bytes, mac1_offset: int) -> bool:
        if not self.enabled:
            return False
        expected = crypto.mac(self.mac1_key, msg[:mac1_offset])
        return _hmac.compare_digest(expected, msg[mac1_offset:mac1_offset + COOKIE_LEN])

    def check_mac2(self, msg: bytes, mac2_offset: int, src: object, now: float) -> bool:
        if now - self.secret_time > COOKIE_REFRESH_TIME:
            return False  # the secret is stale: any cookie made with it has expired too
        cookie = crypto.mac(self.secret, address_bytes(src))
        expected = crypto.mac(cookie, msg[:mac2_offset])
        return _hmac.compare_digest(expected, msg[mac2_offset:mac2_offset + COOKIE_LEN])

    def create_reply(self, msg: bytes, mac1_offset: int, src: object, now: float) -> tuple[int, bytes, bytes]:
        """(receiver, nonce, encrypted_cookie) for a cookie reply to `msg` (receiver = msg's sender index)."""
        if now - self.secret_time > COOKIE_REFRESH_TIME:
            self.secret = self._random(32)
            self.secret_time = now
        cookie = crypto.mac(self.secret, address_bytes(src))
        nonce = self._random(COOKIE_NONCE_LEN)
        encrypted = crypto.xaead_encrypt(self.cookie_key, nonce, cookie, msg[mac1_offset:mac1_offset + COOKIE_LEN])
        return int.from_bytes(msg[4:8], "little"), nonce, encrypted


class CookieGenerator:
    """Adds mac1/mac2 to the handshake messages we send to one peer; consumes that peer's cookie replies."""

    __slots__ = ("mac1_key", "cookie_key", "cookie", "cookie_time", "last_mac1")

    def __init__(self, peer_public_key: bytes):
        self.mac1_key = crypto.hash(LABEL_MAC1, peer_public_key)
        self.cookie_key = crypto.hash(LABEL_COOKIE, peer_public_key)
        self.cookie: bytes | None = None
        self.cookie_time = float("-inf")
        self.last_mac1: bytes | None = None

    def add_macs(self, body: bytes, now: float) -> bytes:
        """body = the message up to mac1; returns it with mac1 and mac2 appended."""
        mac1 = crypto.mac(self.mac1_key, body)
        self.last_mac1 = mac1
        with_mac1 = body + mac1
        if self.cookie is None or now - self.cookie_time > COOKIE_REFRESH_TIME:
            return with_mac1 + _NO_MAC2
        return with_mac1 + crypto.mac(self.cookie, with_mac1)

    def consume_reply(self, nonce: bytes, encrypted_cookie: bytes, now: float) -> bool:
        if self.last_mac1 is None:
            return False
        cookie = crypto.xaead_decrypt(self.cookie_key, nonce, encrypted_cookie, self.last_mac1)
        if cookie is None:
            return False
        self.cookie, self.cookie_time = cookie, now
        self.last_mac1 = None  # as the kernel does: one reply per mac1 sent
        return True


class RateLimiter:
    """Per-source token bucket: 20 handshakes/s, burst 5 (wireguard-go ratelimiter), in float seconds."""

    COST = 1.0 / RATELIMIT_PACKETS_PER_SECOND
    MAX_TOKENS = COST * RATELIMIT_BURST

    def __init__(self) -> None:
        self._buckets: dict[object, list[float]] = {}  # key -> [tokens, last_time]
        self._last_gc = float("-inf")

    def allow(self, key: object, now: float) -> bool:
        if now - self._last_gc > RATELIMIT_GC_INTERVAL:
            self._gc(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [self.MAX_TOKENS - self.COST, now]
            return True
        tokens = min(self.MAX_TOKENS, bucket[0] + (now - bucket[1]))
        bucket[1] = now
        if tokens >= self.COST:
            bucket[0] = tokens - self.COST
            return True
        bucket[0] = tokens
        return False

    def _gc(self, now: float) -> None:
        # A bucket idle for a second is full again: forgetting it changes nothing.
        self._last_gc = now
        stale = [k for k, (_, t) in self._buckets.items() if now - t > RATELIMIT_GC_INTERVAL]
        for k in stale:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)

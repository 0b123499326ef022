"""Relay credentials and regional relays' identities (issue 14.3). Pure: wall time is an input.

A relay in another region has no database: it admits a node by a credential the control plane signed, checked
against the control plane's credential key it was configured with. Both keys derive from the server's private
key (one-way, so a relay's secrets never reveal it), so every control server on one database issues the same:
  credential key  Ed25519, seed = HMAC-SHA256(server_sk, "meshwg relay credentials v1")
  relay key       X25519 of region R = HMAC-SHA256(server_sk, "meshwg relay key v1 " + R): the key nodes box
                  their relay HELLOs to, so the welcome can name it without the relay ever telling the server.
A credential (CRED_LEN bytes) = expires (u64, wall-clock seconds) | Ed25519 signature over
CRED_CONTEXT | node key | expires. It names no relay: any relay of the mesh admits its holder until it expires.
The node also proves it holds the key (the HELLO's box), so a credential seen on the wire is no use to others.

A relay's secret (`meshwg-signal relay-secret REGION`, given to `meshwg-signal relay --secret-file`) is one line:
SECRET_PREFIX + base64url(region length u8 | region | relay private key 32 | credential public key 32).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

CRED_CONTEXT = b"meshwg-relay-credential-v1"
CRED_LEN = 8 + 64
CRED_TTL = 600.0        # a credential lasts this long (a removed node keeps reaching regional relays at most this long)
CRED_REFRESH = 300.0    # the server sends a fresh one when the last is this old
SKEW = 60.0             # wall-clock disagreement a relay tolerates past a credential's expiry
SECRET_PREFIX = "mwrelay1:"
REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class RelaySecretError(ValueError):
    """A relay secret that cannot be read (one line, for the operator)."""


def valid_region(name) -> bool:
    return isinstance(name, str) and REGION_RE.match(name) is not None


def signing_key(server_sk: bytes) -> SigningKey:
    return SigningKey(hmac.new(server_sk, b"meshwg relay credentials v1", hashlib.sha256).digest())


def credential_public(server_sk: bytes) -> bytes:
    return bytes(signing_key(server_sk).verify_key)


def relay_private(server_sk: bytes, region: str) -> bytes:
    """The X25519 private key of `region`'s relay (the server's own relay keeps the server key)."""
    return hmac.new(server_sk, b"meshwg relay key v1 " + region.encode(), hashlib.sha256).digest()


def relay_public(server_sk: bytes, region: str) -> bytes:
    from meshwg.wg.crypto import dh_pub

    return dh_pub(relay_private(server_sk, region))


def _signed(node_key: bytes, expires: int) -> bytes:
    return CRED_CONTEXT + node_key + struct.pack("!Q", expires)


def issue(sk: SigningKey, node_key: bytes, wall: float, ttl: float = CRED_TTL) -> bytes:
    expires = int(wall + ttl)
    return struct.pack("!Q", expires) + sk.sign(_signed(node_key, expires)).signature


def credential_expires(cred: bytes) -> int | None:
    return struct.unpack("!Q", cred[:8])[0] if isinstance(cred, bytes) and len(cred) == CRED_LEN else None


def check_untrusted(vk: VerifyKey, node_key: bytes, cred, wall: float) -> str | None:
    """None when `cred` admits `node_key` at `wall`, else why not (a counter name)."""
    expires = credential_expires(cred)
    if expires is None:
        return "cred_malformed"
    if expires + SKEW < wall:  # checked before the signature: an expired one costs no crypto
        return "cred_expired"
    try:
        vk.verify(_signed(node_key, expires), cred[8:])
    except (BadSignatureError, ValueError):
        return "cred_bad_signature"
    return None


def secret_text(region: str, relay_sk: bytes, cred_pub: bytes) -> str:
    raw = bytes([len(region)]) + region.encode() + relay_sk + cred_pub
    return SECRET_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_secret(text: str) -> tuple[str, bytes, bytes]:
    """(region, relay private key, credential public key); RelaySecretError when it is not a relay secret."""
    text = text.strip()
    if not text.startswith(SECRET_PREFIX):
        raise RelaySecretError(f"not a relay secret (it starts with {SECRET_PREFIX})")
    body = text[len(SECRET_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise RelaySecretError("relay secret: bad base64") from None
    n = raw[0] if raw else 0
    if len(raw) != 1 + n + 64:
        raise RelaySecretError("relay secret: wrong length (truncated or not one)")
    region = raw[1 : 1 + n].decode("ascii", "replace")
    if not valid_region(region):
        raise RelaySecretError(f"relay secret: bad region name {region!r}")
    return region, raw[1 + n : 33 + n], raw[33 + n :]


def parse_relay_spec(text: str) -> tuple[str, list[str]]:
    """`serve --relay REGION=UDP_HOST:PORT[,TCP_HOST:PORT...]` -> (region, [host:port...]); ValueError otherwise."""
    region, sep, addrs = text.partition("=")
    if not sep or not valid_region(region):
        raise ValueError(f"--relay {text!r}: expected REGION=HOST:PORT[,HOST:PORT...] with a region of a-z, 0-9, -")
    parts = [a for a in addrs.split(",") if a]
    if not parts:
        raise ValueError(f"--relay {text!r}: no address")
    return region, parts

"""Invite strings: one copy-pasteable token carrying server addresses, the pinned server key and a secret.

Format: "mwg1_" + base64url(msgpack([addrs, server_key32, invite_id, secret]) + blake2s(...)[:4]).
The checksum catches truncated or mistyped pastes before any network traffic.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import msgpack

PREFIX = "mwg1_"


class InviteFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Invite:
    addrs: tuple[str, ...]  # "host:port" of the control server, tried in order
    server_key: bytes
    invite_id: str
    secret: bytes

    def encode(self) -> str:
        body = msgpack.packb([list(self.addrs), self.server_key, self.invite_id, self.secret], use_bin_type=True)
        raw = body + hashlib.blake2s(body).digest()[:4]
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def split_hostport(addr: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {addr!r} (want host:port)")
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_invite(text: str) -> Invite:
    text = text.strip()
    if not text.startswith(PREFIX):
        raise InviteFormatError("not a meshwg invite (it should start with 'mwg1_')")
    try:
        s = text[len(PREFIX) :]
        raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except Exception:
        raise InviteFormatError("invite is not valid base64 (truncated or mistyped?)") from None
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != s:
        # Non-canonical text (changed padding bits): refuse, so one invite has exactly one spelling.
        raise InviteFormatError("invite is not valid base64 (truncated or mistyped?)")
    body, check = raw[:-4], raw[-4:]
    if len(raw) < 5 or hashlib.blake2s(body).digest()[:4] != check:
        raise InviteFormatError("invite checksum mismatch (truncated or mistyped?)")
    try:
        addrs, key, invite_id, secret = msgpack.unpackb(body, raw=False)
        addrs = tuple(str(a) for a in addrs)
        for a in addrs:
            split_hostport(a)
    except Exception:
        raise InviteFormatError("invite content is malformed") from None
    if not isinstance(key, bytes) or len(key) != 32 or not isinstance(secret, bytes) or not isinstance(invite_id, str):
        raise InviteFormatError("invite content is malformed")
    if not addrs:
        raise InviteFormatError("invite has no server address")
    return Invite(addrs, key, invite_id, secret)

"""Invite secrets and validity checks. Pure: the store keeps rows, this decides."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

SECRET_LEN = 16


class JoinRefused(Exception):
    """A join attempt failed; `code` is stable for programs, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class InviteRow:
    invite_id: str
    secret_hash: bytes
    reusable: bool
    expires: float | None  # unix seconds
    tag: str
    created: float
    revoked: bool
    uses: int
    # Routes a node joined with this invite has approved as soon as it advertises them (CIDR text, or "exit";
    # routes.auto_covers). A revoked invite approves nothing more.
    auto_routes: tuple = ()


def hash_secret(secret: bytes) -> bytes:
    return hashlib.blake2s(secret, person=b"mwginv").digest()


def check_invite(row: InviteRow | None, secret: bytes, wall: float) -> None:
    """Raise JoinRefused unless the invite may admit a new node now."""
    if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
        # Unknown id and wrong secret look the same: no oracle for guessing ids.
        raise JoinRefused("invite_invalid", "invite is not valid for this server (unknown or forged)")
    if row.revoked:
        raise JoinRefused("invite_revoked", f"invite {row.invite_id} was revoked")
    if row.expires is not None and wall >= row.expires:
        raise JoinRefused("invite_expired", f"invite {row.invite_id} has expired")
    if not row.reusable and row.uses > 0:
        raise JoinRefused("invite_used", f"one-time invite {row.invite_id} was already used")


_DUR = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    m = _DUR.match(text.strip().lower())
    if not m:
        raise ValueError(f"bad duration {text!r} (examples: 90s, 30m, 24h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def normalize_name(name: str) -> str | None:
    """A DNS-label-like display name, or None when it cannot be made one."""
    n = re.sub(r"[^a-z0-9-]+", "-", name.strip().lower()).strip("-")[:63].strip("-")
    return n if n and _NAME.match(n) else None

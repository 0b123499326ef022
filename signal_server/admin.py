"""Admin operations shared by the CLI and tests (they only touch the Store)."""

from __future__ import annotations

import json
import os
import secrets

from meshwg.signaling.invite import Invite, split_hostport
from meshwg.wg.crypto import dh_pub as public_key
from signal_server.invites import SECRET_LEN
from signal_server.store_api import Store


def create_invite(store: Store, *, wall: float, reusable: bool = False, expires: float | None = None,
                  tag: str = "", addrs=None) -> Invite:
    """Record a new invite and return it; addrs default to the control addresses the server published."""
    addrs = list(addrs or json.loads(store.meta_get("control_addrs") or "[]"))
    if not addrs:
        raise ValueError("the server has not run yet; pass --addr HOST:PORT")
    for a in addrs:
        split_hostport(a)
    invite_id = secrets.token_hex(4)
    secret = secrets.token_bytes(SECRET_LEN)
    store.create_invite(invite_id, secret, reusable, expires, tag, wall)
    return Invite(tuple(addrs), public_key(store.server_private_key(os.urandom)), invite_id, secret)

"""A removed plain peer's private key (the server made it for a phone's config) leaves no copy in the database
file or its WAL: SQLite overwrites deleted content (PRAGMA secure_delete) instead of leaving it in free pages.
Many SQLite builds (Debian's among them) default to secure_delete on and others do not, so the test opens every
connection with it off, as such a build would: only the store's own pragma turns it on."""

from __future__ import annotations

import ipaddress
import os
import sqlite3

from signal_server.store import SqliteStore

P4 = ipaddress.ip_network("100.64.0.0/10")
P6 = ipaddress.ip_network("fd00:1::/48")


def on_disk(path: str) -> bytes:
    out = b""
    for p in (path, path + "-wal"):
        if os.path.exists(p):
            with open(p, "rb") as f:
                out += f.read()
    return out


def test_a_removed_plain_peers_private_key_is_not_left_in_the_database(tmp_path, monkeypatch):
    connect = sqlite3.connect

    def insecure_build(*args, **kw):
        db = connect(*args, **kw)
        db.execute("PRAGMA secure_delete=OFF")
        return db

    monkeypatch.setattr(sqlite3, "connect", insecure_build)
    path = str(tmp_path / "signal.db")
    st = SqliteStore(path, init=True)
    try:
        st.create_invite("inv", b"s" * 32, True, None, "", 500.0)
        node, _ = st.join(os.urandom(32), "inv", b"s" * 32, "home", 1000.0, P4, P6)
        secret = os.urandom(32)
        phone = st.add_plain("phone", os.urandom(32), secret, [node.node_id], None, 1000.0, P4, P6)
        st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert secret in on_disk(path)  # the check below can see it
        assert st.remove(phone.node_id, 1001.0)
        st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert secret not in on_disk(path)
    finally:
        st.close()

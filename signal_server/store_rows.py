"""Pure row conversions shared by the Store backends (store.py for SQLite, store_pg.py for PostgreSQL): both
select the same columns in the same order (NODE_COLS, INVITE_COLS) and turn them into store_api rows here, so
the backends differ only in SQL dialect and transactions."""

from __future__ import annotations

import json

from signal_server import policy, routes
from signal_server.invites import InviteRow
from signal_server.store_api import NodeRow, StoreError

NODE_COLS = ("id, pubkey, name, ipv4, ipv6, created, last_seen, expires, invite_id, tag, kind, private_key, targets, "
             "exit_node, tags")
INVITE_COLS = "id, secret_hash, reusable, expires, tag, created, revoked, uses, auto_routes"


def node_row(row, live_routes) -> NodeRow:
    """A NodeRow from a NODE_COLS row and its advertised and approved prefixes."""
    priv, targets = row[11], row[12]
    subnets, is_exit = routes.visible(live_routes, lambda p: None)
    return NodeRow(row[0], bytes(row[1]), *row[2:11], None if priv is None else bytes(priv),
                   tuple(json.loads(targets)) if targets else (), row[13], subnets, is_exit, tags_of(row[14], row[9]))


def tags_of(stored, invite_tag) -> tuple:
    """A row's tags: the stored list, or (never set) its invite's tag."""
    if stored is None:
        return policy.stored_tags(invite_tag)
    try:
        value = json.loads(stored)
    except ValueError:
        return ()
    return policy.stored_tags(",".join(t for t in value if isinstance(t, str))) if isinstance(value, list) else ()


def invite_row(row) -> InviteRow:
    return InviteRow(row[0], bytes(row[1]), bool(row[2]), row[3], row[4], row[5], bool(row[6]), row[7],
                     tuple(json.loads(row[8])) if row[8] else ())


def migration_statements(path: str, version: int, migrations) -> list[str]:
    """The SQL statements that bring a database at schema `version` to the newest (len(migrations)), in order;
    StoreError naming `path` for a database newer than this program."""
    if version > len(migrations):
        raise StoreError(f"{path}: database schema {version} is newer than this meshwg-signal "
                         f"({len(migrations)}); upgrade meshwg-signal")
    return [stmt for step in migrations[version:] for stmt in step.strip().split(";") if stmt.strip()]

"""Admin operations shared by the CLI and tests (they only touch the Store)."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from meshwg.config.keys import generate_private_key, key_from_base64, key_to_base64
from meshwg.signaling.invite import Invite, join_hostport, split_hostport
from meshwg.signaling.protocol import KIND_PUBLIC
from meshwg.wg.crypto import dh_pub
from meshwg.wg.crypto import dh_pub as public_key
from signal_server import routes
from signal_server.invites import SECRET_LEN
from signal_server.plain_config import TargetNode, render_config
from signal_server.store_api import NODE, PLAIN, Store
from signal_server.stun_responder import WILDCARDS


def create_invite(store: Store, *, wall: float, reusable: bool = False, expires: float | None = None,
                  tag: str = "", addrs=None, auto_routes=()) -> Invite:
    """Record a new invite and return it; addrs default to the control addresses the server published.
    auto_routes: CIDRs (or "exit") whose routes the nodes joining with it have approved as they advertise them."""
    from signal_server.policy import check_tags

    tag = ",".join(check_tags([tag]))  # ValueError naming a bad tag before anything is written
    addrs = list(addrs or running_servers(store, wall) or json.loads(store.meta_get("control_addrs") or "[]"))
    if not addrs:
        raise ValueError("the server has not run yet; pass --addr HOST:PORT")
    for a in addrs:
        split_hostport(a)
    auto = tuple(dict.fromkeys(_auto_route(store, r) for r in auto_routes))
    invite_id = secrets.token_hex(4)
    secret = secrets.token_bytes(SECRET_LEN)
    store.create_invite(invite_id, secret, reusable, expires, tag, wall, auto)
    return Invite(tuple(addrs), public_key(store.server_private_key(os.urandom)), invite_id, secret)


def running_servers(store: Store, wall: float) -> list[str]:
    """The control addresses of every server running on this database (several on PostgreSQL: issue 14), in the
    order they started; [] for a backend one server uses alone."""
    if not store.multi_server:
        return []
    from signal_server.live_state import STALE

    return list(dict.fromkeys(a for _, control, _ in store.servers(wall, STALE) for a in control))


def where_connected(store: Store, wall: float) -> dict | None:
    """Node key -> the control addresses of the server it is connected to, on a database several servers share
    (None on another backend)."""
    if not store.multi_server:
        return None
    from signal_server.live_state import STALE

    servers = {sid: " ".join(control) for sid, control, _ in store.servers(wall, STALE)}
    return {key: servers[sid] for key, sid, online, _, _ in store.live_rows() if online and sid in servers}


# --- plain WireGuard peers (issue 12): phones with a stock WireGuard app, reached through the relay's plain port

def find_target(store: Store, ident: str):
    """A node (not a plain peer) by id, name or key; ValueError naming `ident` otherwise."""
    row = store.find_node(ident)
    if row is None or row.kind != NODE:
        raise ValueError(f"no node {ident!r} (use an id, a name or a public key)")
    return row


def find_plain(store: Store, ident: str):
    for row in store.list_plain():
        if ident in (str(row.node_id), row.name, key_to_base64(row.key)):
            return row
    raise ValueError(f"no plain peer {ident!r} (`meshwg-signal plain list` shows them)")


def _device_key(public_key: str | None, random_bytes) -> tuple[bytes, bytes | None]:
    """(public key, private key or None): the device's own key when given, else a new one kept for its config."""
    if public_key is not None:
        try:
            return key_from_base64(public_key), None
        except ValueError as exc:
            raise ValueError(f"bad public key {public_key!r}: {exc}") from None
    sk = generate_private_key(random_bytes)
    return dh_pub(sk), sk


def add_plain(store: Store, *, name: str, to: list[str], wall: float, public_key: str | None = None,
              exit_node: str | None = None, random_bytes=os.urandom, direct: bool = False, tags=()):
    """Record a plain peer that may reach the nodes `to` (the exit node among them); its row. direct: each of them
    must have reported a public endpoint (direct_endpoint), checked before anything is written."""
    rows = [find_target(store, t) for t in to]
    targets = [r.node_id for r in rows]
    exit_id = None
    if exit_node is not None:
        exit_row = find_target(store, exit_node)
        _require_exit(exit_row, route_policy(store))
        exit_id = exit_row.node_id
        if exit_id not in targets:
            targets.append(exit_id)  # the phone's internet traffic goes to it: it must reach it
            rows.append(exit_row)
    if direct:
        for r in rows:
            direct_endpoint(store, r)
    pub, priv = _device_key(public_key, random_bytes)
    p4, p6 = store.prefixes(random_bytes)  # the server's; chosen now if it never ran
    return store.add_plain(name, pub, priv, targets, exit_id, wall, p4, p6, tags=tuple(tags))


def rotate_plain(store: Store, row, public_key: str | None = None, random_bytes=os.urandom):
    """A new key for the plain peer `row` (made here, or the device's own); its row."""
    if public_key is None and row.private_key is None:
        raise ValueError(f"plain peer {row.name!r} holds its own key: give its new public key with --public-key")
    pub, priv = _device_key(public_key, random_bytes)
    return store.set_plain_key(row.node_id, pub, priv)


def plain_endpoint(store: Store, endpoint: str | None) -> tuple[str, int]:
    """Where phones send: --endpoint, else the plain-WireGuard address the server published."""
    if endpoint:
        return split_hostport(endpoint)
    addrs = json.loads(store.meta_get("plain_addrs") or "[]")
    if not addrs:
        raise ValueError("the server has published no plain WireGuard address (serve binds one unless "
                         "--plain-udp none); pass --endpoint HOST:PORT")
    host, port = split_hostport(addrs[0])
    if host in WILDCARDS:
        raise ValueError(f"the server's plain WireGuard address {addrs[0]} is a wildcard; start serve with "
                         "--advertise HOST, or pass --endpoint HOST:PORT")
    return host, port


# `plain add/config --direct`: a node reachable with no punch (a port forward, or a full-cone NAT or none that
# netcheck saw) reports a "public" candidate (protocol.KIND_PUBLIC). Candidates live in the running server's
# memory; the server keeps each node's in the database's meta under PUBLIC_META (JSON: node key in base64 ->
# "ip:port"), which this CLI reads. An online node's entry follows its report; an offline node keeps its last one
# (a port forward outlives a restart); a node gone from the directory loses it.
PUBLIC_META = "public_endpoints"


def public_endpoints_json(nodes, previous: str | None) -> str:
    """The PUBLIC_META value for the directory's `nodes` (directory.Node), given the value now stored."""
    try:
        prev = json.loads(previous or "{}")
    except ValueError:
        prev = {}
    prev = prev if isinstance(prev, dict) else {}
    out = {}
    for n in nodes:
        if n.kind == PLAIN:
            continue
        key = key_to_base64(n.key)
        if n.online:
            public = next((c for c in n.candidates if c[2] == KIND_PUBLIC), None)
            if public is not None:
                out[key] = join_hostport(public[0], public[1])
        elif isinstance(prev.get(key), str):
            out[key] = prev[key]
    return json.dumps(out, sort_keys=True)


def direct_endpoint(store: Store, row) -> tuple[str, int]:
    """The node `row`'s public endpoint (PUBLIC_META); ValueError (one line, naming the node) when it has none."""
    try:
        known = json.loads(store.meta_get(PUBLIC_META) or "{}")
        return split_hostport(known[key_to_base64(row.key)])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--direct: node {row.name!r} reports no public endpoint (give it a port forward and "
                         f"`meshwg join/set --public-endpoint IP:PORT`, or a full-cone NAT or none, as `meshwg "
                         f"netcheck` on it shows); without --direct the config goes through the server") from None


def plain_config(store: Store, row, *, wall: float, endpoint: str | None = None, direct: bool = False) -> str:
    """The wg-quick config of the plain peer `row`: one [Peer] per live target node, whose Endpoint is the server's
    plain WireGuard address, or with `direct` the node's own public endpoint (direct_endpoint)."""
    nodes = {n.node_id: n for n in store.list_nodes() if n.kind == NODE and n.live(wall)}
    policy = route_policy(store)
    # Each node's mesh addresses and its approved subnet routes: the phone reaches the node's LAN through it.
    targets = [TargetNode(n.name, n.key, [f"{n.ipv4}/32", f"{n.ipv6}/128", *peer_routes(n, policy)[0]],
                          direct_endpoint(store, n) if direct else None)
               for n in (nodes.get(i) for i in row.targets) if n is not None]
    if not targets:
        raise ValueError(f"plain peer {row.name!r}: none of the nodes it may reach is in the mesh any more")
    # With --direct every [Peer] has its node's endpoint: the server's address is not asked for (nor used).
    server = targets[0].endpoint if direct else plain_endpoint(store, endpoint)
    exit_node = None
    if row.exit_node in nodes:
        _require_exit(nodes[row.exit_node], policy)  # approval taken back since: say so, not a config without it
        exit_node = nodes[row.exit_node].key
    return render_config(name=row.name, addresses=[f"{row.ipv4}/32", f"{row.ipv6}/128"], targets=targets,
                         server_endpoint=server, private_key=row.private_key,
                         public_key=row.key if row.private_key is None else None, exit_node=exit_node,
                         dns=_plain_dns(store, nodes.get(row.exit_node) or next(filter(None, map(nodes.get, row.targets)))))


def _plain_dns(store: Store, node) -> tuple[str, str] | None:
    """(the node's mesh IPv4, the mesh domain the server published) for a plain config's DNS line; None without."""
    domain = store.meta_get("dns_domain")
    return (node.ipv4, domain) if domain and node is not None else None


# --- subnet routes and exit nodes (issue 12; routes.py holds the rules)

def route_policy(store: Store) -> routes.Policy:
    """What no route may cover, as the server published it: the mesh prefixes and the addresses it is reached at."""
    ips = list(json.loads(store.meta_get("server_addrs") or "[]"))
    for k in ("control_addrs", "plain_addrs"):
        ips += [split_hostport(a)[0] for a in json.loads(store.meta_get(k) or "[]")]
    return routes.Policy.make([store.meta_get("prefix4"), store.meta_get("prefix6")], ips)


def _auto_route(store: Store, text: str) -> str:
    route = routes.parse_route(text)
    reason = route_policy(store).forbidden(route)
    if reason is not None:
        raise ValueError(f"--auto-approve-routes {route}: {reason}")
    return route


def approve_route(store: Store, node: str, route: str):
    """Approve NODE's route (CIDR or "exit"): (the node's row, the RouteRow). ValueError (one line, naming the
    value) for an unknown node, a bad CIDR, a forbidden route or an overlap with another node's approved route."""
    row = find_target(store, node)
    prefix = routes.parse_route(route)
    reason = route_policy(store).forbidden(prefix)
    try:
        if reason is not None:
            raise ValueError(reason)
        return row, store.approve_route(row.node_id, prefix)
    except ValueError as exc:
        raise ValueError(f"cannot approve {prefix} for {row.name}: {exc}") from None


def reject_route(store: Store, node: str, route: str):
    """Reject NODE's route (CIDR or "exit"): (the node's row, the RouteRow). ValueError for an unknown node or
    route, or a bad CIDR."""
    row = find_target(store, node)
    prefix = routes.parse_route(route)
    try:
        return row, store.reject_route(row.node_id, prefix)
    except ValueError:
        raise ValueError(f"{row.name} has no route {prefix} (`meshwg-signal routes list` shows them)") from None


def peer_routes(row, policy: routes.Policy) -> tuple[tuple[str, ...], bool]:
    """(subnet routes, is an exit node) of a node as its peers see them (the server's directory does the same)."""
    return routes.visible([*row.routes, *([routes.EXIT] if row.is_exit else [])], policy.forbidden)


def _require_exit(row, policy: routes.Policy) -> None:
    if not peer_routes(row, policy)[1]:
        raise ValueError(f"{row.name!r} is not an approved exit node (it must advertise itself as one, and "
                         f"`meshwg-signal routes approve {row.name} exit`)")


# --- `meshwg-signal nodes` (issue 15): who is online. The store's last_seen moves only at a join and when a
# session ends, so it cannot tell a node connected for a week from one gone for a week. The running server keeps
# the set of connected nodes in the database's meta under PRESENCE_META (JSON {"at": wall time, "online": [base64
# keys]}), rewritten when the set changes and every PRESENCE_REFRESH s; the CLI trusts a record younger than
# PRESENCE_STALE only (a killed server leaves its last one behind).
PRESENCE_META = "presence"
PRESENCE_REFRESH = 10.0
PRESENCE_STALE = 30.0  # three refreshes: a busy database may make the server miss two


def presence_json(keys, wall: float) -> str:
    return json.dumps({"at": wall, "online": sorted(key_to_base64(k) for k in keys)})


@dataclass(frozen=True)
class Presence:
    at: float | None  # when the server last wrote it (None: never, or unreadable)
    keys: frozenset  # the nodes connected then
    fresh: bool  # written within PRESENCE_STALE: a server is running


def read_presence(text: str | None, wall: float) -> Presence:
    """The PRESENCE_META value as of wall-clock `wall`; anything unreadable is "no server known"."""
    try:
        doc = json.loads(text or "")
        at = float(doc["at"])
        keys = frozenset(key_from_base64(k) for k in doc["online"])
    except (ValueError, KeyError, TypeError):
        return Presence(None, frozenset(), False)
    return Presence(at, keys, 0 <= wall - at <= PRESENCE_STALE)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(seconds: float) -> str:
    """'45s ago', '3m ago', '5h ago', '12d ago'."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def node_record(row, presence: Presence, wall: float) -> dict:
    """One node as `nodes list --json` prints it (the table shows the same fields)."""
    expired = bool(row.expires and row.expires <= wall)
    seen = row.last_seen
    if row.key in presence.keys and presence.at is not None:  # the server saw it connected then
        seen = presence.at if seen is None else max(seen, presence.at)
    return {
        "id": row.node_id, "name": row.name, "ipv4": row.ipv4, "ipv6": row.ipv6,
        "online": presence.fresh and row.key in presence.keys and not expired,
        "expired": expired,
        "last_seen": None if seen is None else _iso(seen),
        "last_seen_seconds_ago": None if seen is None else max(0, int(wall - seen)),
        "last_seen_unix": seen,
        "tags": list(row.tags),
        "routes": [*row.routes, *(["exit"] if row.is_exit else [])],
        "key": key_to_base64(row.key),
    }


def node_records(rows, presence: Presence, wall: float) -> list[dict]:
    return [node_record(r, presence, wall) for r in rows if r.kind == NODE]


NODE_COLUMNS = ("ID", "NAME", "IPV4", "IPV6", "ONLINE", "LAST SEEN", "TAGS", "ROUTES")
SERVER_COLUMN = "SERVER"  # several servers on one database: the one the node is connected to ("-": none)


def _online_text(rec: dict) -> str:
    if rec["online"]:
        return "yes"
    if rec["expired"]:
        return "expired"
    return "never" if rec["last_seen"] is None else ago(rec["last_seen_seconds_ago"])


def nodes_table(records: list[dict], fmt_time) -> str:
    """The records as aligned columns (each as wide as its widest cell; ID right-aligned); fmt_time(unix or
    None) -> text for LAST SEEN."""
    multi = any("server" in r for r in records)
    cells = [[str(r["id"]), r["name"], r["ipv4"], r["ipv6"], _online_text(r), fmt_time(r["last_seen_unix"]),
              ",".join(r["tags"]) or "-", *([r.get("server") or "-"] if multi else []), ",".join(r["routes"]) or "-"]
             for r in records]
    columns = [*NODE_COLUMNS[:-1], *([SERVER_COLUMN] if multi else []), NODE_COLUMNS[-1]]
    rows = [columns, *cells]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        parts = [row[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
        lines.append("  ".join(parts))
    return "\n".join(lines) + "\n"

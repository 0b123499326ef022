"""The admin commands' operations, as data (issue 15): op(store, live, params) -> a JSON-able dict.

The running server carries them out for `meshwg-signal` over its admin socket (admin_socket.py), with `live` its
registry's view (who is connected, its metrics); with no server running the CLI carries them out itself on the
database it opened (never created), with `live` None. Either way the CLI formats what they return, so the two
print the same. Errors are one line: OpError (with its exit code) or ValueError (exit 2).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

from meshwg.config.keys import key_to_base64
from signal_server import admin
from signal_server.routes import state_text
from signal_server.store_api import NODE


class OpError(Exception):
    """One line for the operator and the CLI's exit code (1: the thing named does not exist or cannot be done)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Live:
    """What the running server knows that the database does not: the keys of the connected nodes, its metrics
    (metrics.parse_text of /metrics) and the admin requests served so far."""
    online: frozenset
    metrics: dict


# --- invites

def invite_create(st, live, p: dict) -> dict:
    inv = admin.create_invite(st, wall=time.time(), reusable=bool(p.get("reusable")), expires=p.get("expires"),
                              tag=str(p.get("tag") or ""), addrs=p.get("addr"), auto_routes=p.get("auto_routes") or ())
    return {"invite": inv.encode(), "invite_id": inv.invite_id}


def invite_list(st, live, p: dict) -> dict:
    return {"invites": [{"invite_id": i.invite_id, "reusable": i.reusable, "revoked": i.revoked, "expires": i.expires,
                         "uses": i.uses, "tag": i.tag, "auto_routes": list(i.auto_routes)} for i in st.list_invites()]}


def invite_revoke(st, live, p: dict) -> dict:
    if not st.revoke_invite(str(p["invite_id"])):
        raise OpError(f"no invite {p['invite_id']}")
    return {}


# --- nodes

def nodes_list(st, live, p: dict) -> dict:
    wall = time.time()
    where = admin.where_connected(st, wall)  # several servers on the database: every server's nodes
    if where is not None:
        presence = admin.Presence(wall, frozenset(where), bool(admin.running_servers(st, wall)))
    elif live is not None:  # the server's own registry: no record to trust or distrust
        presence = admin.Presence(wall, live.online, True)
    else:
        presence = admin.read_presence(st.meta_get(admin.PRESENCE_META), wall)
    records = admin.node_records(st.list_nodes(), presence, wall)
    if where is not None:
        for rec in records:
            rec["server"] = where.get(admin.key_from_base64(rec["key"]))
    return {"records": records, "fresh": presence.fresh, "at": presence.at}


def _node(st, ident: str):
    node = st.find_node(ident)
    if node is None:
        raise OpError(f"no node {ident!r} (use an id, a name or a public key)")
    return node


def node_rename(st, live, p: dict) -> dict:
    node = _node(st, str(p["node"]))
    try:
        return {"node_id": node.node_id, "name": st.rename(node.node_id, str(p["name"]))}
    except ValueError as exc:
        raise OpError(str(exc)) from None


def node_expire(st, live, p: dict) -> dict:
    node = _node(st, str(p["node"]))
    st.expire(node.node_id, float(p["when"]))
    return {"node_id": node.node_id, "name": node.name}


def node_remove(st, live, p: dict) -> dict:
    node = _node(st, str(p["node"]))
    st.remove(node.node_id, time.time())
    return {"node_id": node.node_id, "name": node.name}


def node_tags(st, live, p: dict) -> dict:
    """p: node, tags, add (True: tag, False: untag)."""
    from signal_server.policy import check_tags

    node = _node(st, str(p["node"]))
    given = check_tags(list(p["tags"]))  # ValueError (one line, exit 2) before anything is written
    tags = (*node.tags, *given) if p.get("add") else tuple(t for t in node.tags if t not in given)
    row = st.set_tags(node.node_id, tags)
    return {"name": node.name, "tags": list(row.tags)}


# --- plain WireGuard peers

def plain_list(st, live, p: dict) -> dict:
    names = {n.node_id: n.name for n in st.list_nodes()}
    return {"peers": [{"node_id": r.node_id, "name": r.name, "ipv4": r.ipv4, "ipv6": r.ipv6,
                       "holder": "device" if r.private_key is None else "server",  # who holds its private key
                       "exit": names.get(r.exit_node, "-") if r.exit_node else "-",
                       "reaches": [names.get(i, f"#{i}(gone)") for i in r.targets], "tags": list(r.tags)}
                      for r in st.list_plain()]}


def _config(st, row, p: dict) -> str:
    return admin.plain_config(st, row, wall=time.time(), endpoint=p.get("endpoint"), direct=bool(p.get("direct")))


def plain_add(st, live, p: dict) -> dict:
    if not p.get("direct"):
        admin.plain_endpoint(st, p.get("endpoint"))  # refused before anything is written
    row = admin.add_plain(st, name=str(p["name"]), to=list(p["to"]), wall=time.time(), public_key=p.get("public_key"),
                          exit_node=p.get("exit_node"), direct=bool(p.get("direct")), tags=p.get("tags") or ())
    return {"name": row.name, "ipv4": row.ipv4, "ipv6": row.ipv6, "config": _config(st, row, p)}


def plain_config(st, live, p: dict) -> dict:
    return {"config": _config(st, admin.find_plain(st, str(p["name"])), p)}


def plain_rotate(st, live, p: dict) -> dict:
    row = admin.rotate_plain(st, admin.find_plain(st, str(p["name"])), p.get("public_key"))
    return {"name": row.name}


def plain_remove(st, live, p: dict) -> dict:
    row = admin.find_plain(st, str(p["name"]))
    st.remove(row.node_id, time.time())
    return {"name": row.name}


# --- routes

def routes_list(st, live, p: dict) -> dict:
    policy = admin.route_policy(st)
    names = {n.node_id: n.name for n in st.list_nodes()}
    return {"routes": [{"node": names.get(r.node_id, f"#{r.node_id}"), "prefix": r.prefix,
                        "state": state_text(r.advertised, r.decision),
                        "refused": policy.forbidden(r.prefix) if r.decision is not False else None}
                       for r in st.list_routes()]}


def route_approve(st, live, p: dict) -> dict:
    row, route = admin.approve_route(st, str(p["node"]), str(p["route"]))
    return {"name": row.name, "prefix": route.prefix, "advertised": route.advertised}


def route_reject(st, live, p: dict) -> dict:
    row, route = admin.reject_route(st, str(p["node"]), str(p["route"]))
    return {"name": row.name, "prefix": route.prefix}


# --- the rest

def policy_check(st, live, p: dict) -> dict:
    """p: file (its name, for messages), data (its bytes in base64, read by the CLI): checked against the nodes."""
    from signal_server import policy

    members = [policy.member_of(r) for r in st.list_nodes()]
    try:
        data = base64.b64decode(str(p["data"]), validate=True)
    except ValueError:
        raise ValueError("policy check: the file's bytes did not arrive whole") from None
    pf = policy.load_bytes(data, str(p["file"]), members, policy.invite_tags(st.list_invites()))
    acl = policy.Acl(pf)
    warnings = [f"warning: what {q.name} may send {r.name} needs more than {policy.MAX_ACCEPT} port ranges; "
                "the rest are dropped (merge port ranges)"
                for r in members for q in members
                if r.key != q.key and len(acl.view(acl.class_of(r), acl.class_of(q)).template) > policy.MAX_ACCEPT]
    plain = sum(1 for m in members if m.plain)
    return {"rules": len(pf.rules), "nodes": len(members) - plain, "plain": plain,
            "matrix": policy.matrix_text(acl, members), "warnings": warnings}


def status(st, live, p: dict) -> dict:
    wall = time.time()
    rows = st.list_nodes()
    nodes = [n for n in rows if n.kind == NODE]
    return {"registered": len(nodes), "expired": sum(1 for n in nodes if n.expires and n.expires <= wall),
            "plain": len(rows) - len(nodes), "metrics_addrs": json.loads(st.meta_get("metrics_addrs") or "[]"),
            "live": None if live is None else live.metrics}


def pubkey(st, live, p: dict) -> dict:
    from meshwg.wg.crypto import dh_pub

    return {"key": key_to_base64(dh_pub(st.server_private_key()))}


OPS = {f.__name__: f for f in (
    invite_create, invite_list, invite_revoke, nodes_list, node_rename, node_expire, node_remove, node_tags,
    plain_list, plain_add, plain_config, plain_rotate, plain_remove, routes_list, route_approve, route_reject,
    policy_check, status, pubkey)}


def run(op: str, st, live, params: dict) -> dict:
    fn = OPS.get(op)
    if fn is None:
        raise OpError(f"unknown admin operation {op!r} (a server older than this meshwg-signal?)", 2)
    try:
        return fn(st, live, params)
    except (KeyError, TypeError) as exc:  # a request missing a field, or one of the wrong type
        raise OpError(f"bad {op} request: {exc!r}", 2) from None

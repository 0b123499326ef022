"""Validators for what the server says about peers and about this node: directory entries' fields and the
"self" update. Pure (no I/O, no trio): the control client, the agent's netmap cache and the tests use them.

Every function here reads attacker-controlled values (the server, or a cache file) and never raises on them.
"""

from __future__ import annotations

import ipaddress
import re

from meshwg.control.events import RelayInfo, SelfChanged

MAX_ENTRY_ROUTES = 64   # as many as a node may advertise (the routes contract)
MAX_ACCEPT_RULES = 64  # the server's cut (signal_server/policy.py MAX_ACCEPT); past it, rules are refused
ACCEPT_PROTOS = (0, 1, 6, 17)  # any, icmp (and icmpv6), tcp, udp
MAX_TAGS = 16
_TAG = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
# The server's node names (signal_server/invites.py normalize_name): a name outside it is not the server's.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def entry_routes_untrusted(value) -> tuple:
    """An entry's "routes" field as canonical CIDR texts; a bad prefix (not text, host bits set, a default route)
    is dropped alone, a non-list or one past MAX_ENTRY_ROUTES counts as none. Whether each may be routed here is
    meshwg.mesh.peer_entry's call."""
    if not isinstance(value, list) or len(value) > MAX_ENTRY_ROUTES:
        return ()
    out = []
    for text in value:
        if not isinstance(text, str) or len(text) > 64:
            continue
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError:
            continue
        if net.prefixlen and str(net) not in out:
            out.append(str(net))
    return tuple(out)


def entry_accept_untrusted(value) -> tuple[tuple, int]:
    """An entry's "accept" field (present) as ((proto, lo, hi, cidr text), ...) and how many rules were refused.
    Fails closed: a bad rule is dropped alone (and counted), and a value that is no list at all is an empty list
    (the peer may open nothing), never "no policy". Absent is the caller's None."""
    if not isinstance(value, (list, tuple)):
        return (), 1
    out, refused = [], 0
    for i, rule in enumerate(value):
        parsed = _accept_rule_untrusted(rule) if i < MAX_ACCEPT_RULES else None
        if parsed is None:
            refused += 1
        elif parsed not in out:
            out.append(parsed)
    return tuple(out), refused


def _accept_rule_untrusted(rule) -> tuple | None:
    if not isinstance(rule, (list, tuple)) or len(rule) != 4:
        return None
    proto, lo, hi, cidr = rule
    if any(type(v) is not int for v in (proto, lo, hi)) or proto not in ACCEPT_PROTOS or not 0 <= lo <= hi <= 65535:
        return None
    if not isinstance(cidr, str) or len(cidr) > 64:
        return None
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        return None
    return (proto, lo, hi, str(net))


def tags_untrusted(value) -> tuple[str, ...]:
    """A "tags" field as the tags that look like tags (the server's syntax), at most MAX_TAGS; anything else none."""
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(dict.fromkeys(t for t in value[:MAX_TAGS] if isinstance(t, str) and _TAG.fullmatch(t)))


def self_update_untrusted(msg: dict) -> SelfChanged | None:
    """A T_SELF message as the event, None when malformed: the name is not one the server gives (it is shown in a
    terminal) or "tags" is no list. Within a list, what does not look like a tag is left out, as in the welcome."""
    name, tags = msg.get("name"), msg.get("tags")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not isinstance(tags, list):
        return None
    return SelfChanged(name, tags_untrusted(tags))


MAX_RELAYS = 32          # regions in a welcome
RELAY_CRED_LEN = 72      # signal_server/relay_auth.CRED_LEN
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def relays_untrusted(value, addr_list) -> tuple:
    """The welcome's "relays" as RelayInfo (issue 14.3); a malformed relay is dropped alone, a region named twice
    keeps its first. addr_list: the client's parser of ["host:port", ...] lists."""
    if not isinstance(value, list):
        return ()
    out, seen = [], set()
    for r in value[:MAX_RELAYS]:
        if not isinstance(r, dict):
            continue
        region, key = r.get("region"), r.get("key")
        if not isinstance(region, str) or not _REGION.match(region) or region in seen:
            continue
        if not isinstance(key, bytes) or len(key) != 32:
            continue
        udp, tcp = addr_list(r.get("udp") if isinstance(r.get("udp"), list) else ()), \
            addr_list(r.get("tcp") if isinstance(r.get("tcp"), list) else ())
        if not udp and not tcp:
            continue
        seen.add(region)
        out.append(RelayInfo(region, key, udp[:4], tcp[:4]))
    return tuple(out)


def relay_cred_untrusted(value) -> bytes:
    """A relay credential as the server sent it (the relays check it), b"" when it is not one."""
    return value if isinstance(value, bytes) and len(value) == RELAY_CRED_LEN else b""

"""Access control (issue 13): the policy file, checked against the mesh, compiled to an evaluator. Pure.

The file is TOML (tomllib), the contract's format (/work/notes/acl-contract.md):

    [groups]
    family = ["phone", "laptop"]
    [[rule]]
    from  = ["group:family", "tag:admin"]              # names of nodes or plain peers, tag:X, group:X, *
    to    = ["home", "tag:server", "192.168.1.0/24"]   # the same, or a CIDR inside an approved subnet route
    ports = ["tcp:22", "tcp:8000-8100", "udp:53", "icmp"]   # default "*": every protocol and port

Rules only allow; once a policy is loaded, what no rule allows is denied. A destination that names a node (by
name, tag or group) means its own mesh addresses; "*" also means its approved subnet routes and, for an approved
exit node, everything (0.0.0.0/0, ::/0) it forwards; a CIDR means the part of it inside the approved routes of
each node (an exit node's included). Every error is a PolicyError: one line, "FILE:LINE: problem".

Evaluation is per *class*: members whose (source rules, destination rules) agree behave alike, so an evaluation
is cached per pair of classes, not per pair of nodes. A destination's addresses stay symbolic (SELF) in the
cached accept templates, and are filled in per recipient when the entry is packed.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field

PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP = 0, 1, 6, 17
PROTOS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}
# The node unpacks an entry with msgpack's max_array_len=64 (protocol.unpack_entry_untrusted): a longer accept
# list would lose the whole entry. Past this the list is cut (fail closed) and counted.
MAX_ACCEPT = 64
MAX_TAGS = 16  # per node (a tags list in an entry stays far below the node's array limit)
SELF = ""  # a template's destination token: the recipient's own mesh addresses
EVERYWHERE = ("0.0.0.0/0", "::/0")  # what an approved exit node forwards

_TAG = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # invites.normalize_name's output
_RULE_HEADER = re.compile(r"^\s*\[\[\s*\"?rule\"?\s*\]\]")
_TOML_AT = re.compile(r"\s*\(at line (\d+), column \d+\)$|\s*\(at end of document\)$")


class PolicyError(ValueError):
    """A policy file that cannot be used: one line naming the file, the line and the problem."""


# --- tags (identity: invites give one at join, `meshwg-signal nodes tag` adds more)

def bad_tag(tag) -> str | None:
    """Why `tag` is no tag (None when it is one)."""
    if not isinstance(tag, str) or not _TAG.match(tag):
        return f"bad tag {tag!r} (lowercase letters, digits, '-' and '_', at most 63)"
    return None


def check_tags(tags) -> tuple[str, ...]:
    """Tags as an administrator typed them (a list, or commas in one text): ValueError naming a bad one."""
    out = []
    for text in tags:
        for t in str(text).split(","):
            t = t.strip()
            if not t:
                continue
            why = bad_tag(t)
            if why:
                raise ValueError(why)
            out.append(t)
    out = list(dict.fromkeys(out))
    if len(out) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags per node")
    return tuple(out)


def stored_tags(text) -> tuple[str, ...]:
    """Tags from a stored value (an invite's tag text, commas allowed): the bad ones dropped, never an error."""
    out = [t.strip() for t in str(text or "").split(",")]
    return tuple(dict.fromkeys(t for t in out if t and bad_tag(t) is None))[:MAX_TAGS]


# --- the file

@dataclass(frozen=True)
class Ports:
    proto: int
    lo: int
    hi: int


ALL_PORTS = (Ports(PROTO_ANY, 0, 65535),)


@dataclass(frozen=True)
class Rule:
    line: int
    src: tuple  # ("*",), ("tag", t), ("name", n)
    dst: tuple  # the same, or ("cidr", ip_network)
    ports: tuple  # of Ports


@dataclass(frozen=True)
class PolicyFile:
    path: str
    rules: tuple
    names: frozenset = frozenset()  # every name a rule mentions
    tags: frozenset = frozenset()  # every tag a rule mentions


def _err(path: str, line: int, problem: str) -> PolicyError:
    problem = " ".join(str(problem).split())  # one line, whatever the text held
    return PolicyError(f"{path}:{line}: {problem}")


def _key_line(lines: list[str], key: str) -> int:
    pat = re.compile(r"^\s*(\[+\s*)?\"?" + re.escape(key) + r"\"?\s*(=|\]|\.)")
    return next((i + 1 for i, ln in enumerate(lines) if pat.match(ln)), 1)


def _rule_lines(lines: list[str], count: int) -> list[int]:
    """The line of each [[rule]] (an inline `rule = [...]` array: all on the line of `rule`)."""
    heads = [i + 1 for i, ln in enumerate(lines) if _RULE_HEADER.match(ln)]
    if len(heads) == count:
        return heads
    first = _key_line(lines, "rule")
    return [first] * count


def parse(text: str, path: str = "<policy>") -> PolicyFile:
    """The policy file's text -> PolicyFile (names and tags not yet checked against a mesh: `check`)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_AT.search(msg)
        line = int(m.group(1)) if m and m.group(1) else max(1, text.count("\n") + 1)
        raise _err(path, line, "TOML: " + (msg[:m.start()] if m else msg)) from None
    except (ValueError, TypeError, RecursionError) as exc:  # tomllib keeps to TOMLDecodeError; defensively
        raise _err(path, 1, f"TOML: {exc}") from None
    lines = text.splitlines()
    for k in doc:
        if k not in ("groups", "rule"):
            raise _err(path, _key_line(lines, k), f"unknown key {k!r} (the file has [groups] and [[rule]])")
    groups = _parse_groups(doc.get("groups", {}), path, lines)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise _err(path, _key_line(lines, "rule"), "rule must be [[rule]] tables")
    rules = []
    for r, line in zip(raw_rules, _rule_lines(lines, len(raw_rules))):
        rules.append(_parse_rule(r, groups, path, line))
    names = frozenset(s[1] for r in rules for s in (*r.src, *r.dst) if s[0] == "name")
    tags = frozenset(s[1] for r in rules for s in (*r.src, *r.dst) if s[0] == "tag")
    return PolicyFile(path, tuple(rules), names, tags)


def _parse_groups(raw, path: str, lines: list[str]) -> dict:
    if not isinstance(raw, dict):
        raise _err(path, _key_line(lines, "groups"), "groups must be a table: [groups] name = [...]")
    groups = {}
    for name, members in raw.items():
        line = _key_line(lines, name)
        if not _NAME.match(name):
            raise _err(path, line, f"bad group name {name!r} (lowercase letters, digits and '-')")
        members = _str_list(members, f"group {name}", path, line)
        for m in members:
            if m.startswith("group:"):
                raise _err(path, line, f"group {name}: {m!r}: a group cannot hold groups")
            _selector(m, True, path, line, f" (in group {name})")  # a CIDR in a source is refused where used
        groups[name] = (line, members)
    return groups


def _str_list(value, what: str, path: str, line: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(path, line, f"{what} must be a list of text")
    if not value:
        raise _err(path, line, f"{what} is empty")
    return value


def _parse_rule(r: dict, groups: dict, path: str, line: int) -> Rule:
    for k in r:
        if k not in ("from", "to", "ports", "description"):
            raise _err(path, line, f"rule: unknown key {k!r} (from, to, ports, description)")
    for k in ("from", "to"):
        if k not in r:
            raise _err(path, line, f"rule: no {k!r}")
    if not isinstance(r.get("description", ""), str):
        raise _err(path, line, "rule: description must be text")
    src = _selectors(_str_list(r["from"], "from", path, line), groups, False, path, line)
    dst = _selectors(_str_list(r["to"], "to", path, line), groups, True, path, line)
    ports = tuple(dict.fromkeys(_port(p, path, line) for p in _str_list(r.get("ports", "*"), "ports", path, line)))
    return Rule(line, src, dst, ports)


def _selectors(items: list[str], groups: dict, dst: bool, path: str, line: int) -> tuple:
    out = []
    for item in items:
        if item.startswith("group:"):
            g = item[6:]
            if g not in groups:
                raise _err(path, line, f"unknown group {g!r}")
            out += [_selector(m, dst, path, line, f" (in group {g})") for m in groups[g][1]]
        else:
            out.append(_selector(item, dst, path, line, ""))
    return tuple(dict.fromkeys(out))


def _selector(item: str, dst: bool, path: str, line: int, where: str) -> tuple:
    if item == "*":
        return ("*",)
    if item.startswith("tag:"):
        why = bad_tag(item[4:])
        if why:
            raise _err(path, line, why + where)
        return ("tag", item[4:])
    if _NAME.match(item):
        return ("name", item)
    net = _cidr(item)
    if net is None:
        raise _err(path, line, f"{item!r}{where} is no name, tag:X, group:X, * or CIDR")
    if isinstance(net, str):
        raise _err(path, line, net + where)
    if not dst:
        raise _err(path, line, f"{item}{where}: a CIDR is a destination only (sources are names, tags or groups)")
    return ("cidr", net)


def _cidr(item: str):
    """An ip_network; a text saying why it is a bad one; None when it does not look like an address at all."""
    if not re.fullmatch(r"[0-9a-fA-F:.]+(/\d{1,3})?", item) or not re.search(r"[.:]", item):
        return None
    try:
        return ipaddress.ip_network(item, strict=True)
    except ValueError:
        pass
    try:
        near = ipaddress.ip_network(item, strict=False)
    except ValueError:
        return f"bad CIDR {item!r}"
    return f"bad CIDR {item!r}: host bits are set (did you mean {near}?)"


def _port(text: str, path: str, line: int) -> Ports:
    t = text.strip().lower()
    if t in ("*", "any"):
        return ALL_PORTS[0]
    if t in ("icmp", "icmpv6"):
        return Ports(PROTO_ICMP, 0, 65535)
    proto, _, rng = t.partition(":")
    if proto not in PROTOS:
        raise _err(path, line, f"bad port {text!r} (examples: tcp:22, udp:53, tcp:8000-8100, tcp, icmp, *)")
    if rng in ("", "*"):
        return Ports(PROTOS[proto], 0, 65535)
    m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", rng)
    lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (-1, -1)
    if not (m and 0 <= lo <= hi <= 65535):
        raise _err(path, line, f"bad port {text!r} (a port or a range lo-hi within 0-65535)")
    return Ports(PROTOS[proto], lo, hi)


# --- the mesh it applies to

@dataclass(frozen=True)
class Member:
    """What the policy knows of a node or plain peer."""
    key: bytes
    name: str
    tags: frozenset = frozenset()
    addrs: tuple = ()  # its mesh addresses as CIDR text ("100.64.0.1/32", "fd00::1/128")
    routes: tuple = ()  # its approved subnet routes (CIDR text)
    is_exit: bool = False
    plain: bool = False


def check(pf: PolicyFile, members, known_tags=()) -> None:
    """PolicyError for a name no member has, a tag no member or invite (`known_tags`) has, a CIDR no approved route
    contains: the first such one in file order."""
    members = list(members)
    names = {m.name for m in members}
    tags = set(known_tags).union(*(m.tags for m in members)) if members else set(known_tags)
    nets = [ipaddress.ip_network(r) for m in members for r in _dst_routes(m)]
    for rule in pf.rules:
        for sel in (*rule.src, *rule.dst):
            if sel[0] == "name" and sel[1] not in names:
                raise _err(pf.path, rule.line, f"unknown name {sel[1]!r} (no node or plain peer has it)")
            if sel[0] == "tag" and sel[1] not in tags:
                raise _err(pf.path, rule.line, f"unknown tag {sel[1]!r} (no node, plain peer or invite has it)")
            if sel[0] == "cidr" and not any(n.version == sel[1].version and sel[1].subnet_of(n) for n in nets):
                raise _err(pf.path, rule.line, f"{sel[1]} is not inside an approved subnet route")


def load(text: str, path: str, members, known_tags=()) -> PolicyFile:
    pf = parse(text, path)
    check(pf, members, known_tags)
    return pf


def _dst_routes(m: Member) -> tuple:
    return (*m.routes, *(EVERYWHERE if m.is_exit else ()))


@dataclass(frozen=True)
class View:
    """How two classes see each other: whether the peer may reach the recipient, the other way round, and what the
    peer may send the recipient (a template of (proto, lo, hi, token); token SELF or a CIDR text)."""
    peer_to_me: bool
    me_to_peer: bool
    template: tuple

    @property
    def visible(self) -> bool:
        return self.peer_to_me or self.me_to_peer


@dataclass
class Acl:
    """A PolicyFile compiled for evaluation; members are passed in (the caller keeps the mesh)."""
    pf: PolicyFile
    _class_ids: dict = field(default_factory=dict)  # signature -> class id
    _sigs: list = field(default_factory=list)  # class id -> (src rule set, {rule: dst tokens})
    _memo: dict = field(default_factory=dict)  # member's relevant identity -> class id
    _views: dict = field(default_factory=dict)  # (recipient class, peer class) -> View
    truncated: int = 0  # accept lists cut at MAX_ACCEPT (counted once per class pair)

    def class_of(self, m: Member) -> int:
        """The member's class: members of one class are allowed and reached alike (up to their own addresses)."""
        ident = (m.name if m.name in self.pf.names else None, m.tags & self.pf.tags, _dst_routes(m))
        cid = self._memo.get(ident)
        if cid is None:
            sig = self._signature(m)
            cid = self._class_ids.setdefault(sig, len(self._sigs))
            if cid == len(self._sigs):
                self._sigs.append(sig)
            if len(self._memo) < 1_000_000:
                self._memo[ident] = cid
        return cid

    def _signature(self, m: Member):
        src, dst = [], []
        routes = [ipaddress.ip_network(r) for r in _dst_routes(m)]
        for i, rule in enumerate(self.pf.rules):
            if any(_names(sel, m) for sel in rule.src):
                src.append(i)
            tokens = set()
            for sel in rule.dst:
                if sel[0] == "*":
                    tokens.add(SELF)
                    tokens.update(str(r) for r in routes)
                elif sel[0] == "cidr":
                    for r in routes:
                        if r.version == sel[1].version and r.overlaps(sel[1]):
                            tokens.add(str(sel[1] if sel[1].subnet_of(r) else r))
                elif _names(sel, m):
                    tokens.add(SELF)
            if tokens:
                dst.append((i, tuple(sorted(tokens))))
        return frozenset(src), tuple(dst)

    def view(self, me: int, peer: int) -> View:
        """Between the recipient's class and the peer's (cached)."""
        v = self._views.get((me, peer))
        if v is None:
            my_src, my_dst = self._sigs[me]
            p_src, p_dst = self._sigs[peer]
            template = _template(self.pf.rules, p_src, my_dst)
            if len(template) > MAX_ACCEPT:
                self.truncated += 1
            v = View(any(i in p_src for i, _ in my_dst), any(i in my_src for i, _ in p_dst), template)
            self._views[(me, peer)] = v
        return v

    # --- the evaluator's plain API (tests, `policy check`)

    def may_reach(self, src: Member, dst: Member) -> bool:
        return src.key != dst.key and self.view(self.class_of(dst), self.class_of(src)).peer_to_me

    def visible(self, me: Member, peer: Member) -> bool:
        return me.key != peer.key and self.view(self.class_of(me), self.class_of(peer)).visible

    def accept_list(self, recipient: Member, peer: Member) -> list:
        """What `peer` may send to `recipient`: [(proto, lo, hi, cidr)], at most MAX_ACCEPT."""
        return expand(self.view(self.class_of(recipient), self.class_of(peer)).template, recipient.addrs)


def _names(sel: tuple, m: Member) -> bool:
    return sel[0] == "*" or (sel[0] == "name" and sel[1] == m.name) or (sel[0] == "tag" and sel[1] in m.tags)


def _template(rules, peer_src: frozenset, my_dst: tuple) -> tuple:
    """(proto, lo, hi, token) the rules allow from a peer with these source rules to these destination tokens,
    merged: per token, an any-protocol entry swallows the rest, and touching port ranges of a protocol join."""
    by_token: dict = {}
    for i, tokens in my_dst:
        if i not in peer_src:
            continue
        for tok in tokens:
            by_token.setdefault(tok, set()).update(rules[i].ports)
    out = []
    for tok in sorted(by_token):
        specs = by_token[tok]
        if any(p.proto == PROTO_ANY for p in specs):
            out.append((PROTO_ANY, 0, 65535, tok))
            continue
        for proto in sorted({p.proto for p in specs}):
            ranges = sorted((p.lo, p.hi) for p in specs if p.proto == proto)
            merged = [list(ranges[0])]
            for lo, hi in ranges[1:]:
                if lo <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            out += [(proto, lo, hi, tok) for lo, hi in merged]
    return tuple(out)


def expand(template: tuple, addrs: tuple) -> list:
    """A template with SELF replaced by the recipient's addresses, cut at MAX_ACCEPT (fail closed)."""
    out = []
    for proto, lo, hi, tok in template:
        for cidr in (addrs if tok == SELF else (tok,)):
            out.append([proto, lo, hi, cidr])
    return out[:MAX_ACCEPT]


def member_of(node) -> Member:
    """A Member for a directory.Node (or anything with its fields)."""
    return Member(node.key, node.name, frozenset(getattr(node, "tags", ()) or ()),
                  (f"{node.ipv4}/32", f"{node.ipv6}/128"), tuple(getattr(node, "routes", ()) or ()),
                  bool(getattr(node, "is_exit", False)), getattr(node, "kind", "node") == "plain")


def matrix_text(acl: Acl, members) -> str:
    """Who may reach whom: a row per source, a column per destination ('x' may, '.' may not, '-' itself)."""
    members = sorted(members, key=lambda m: (m.plain, m.name))
    if not members:
        return "(no nodes)\n"
    width = max(len(m.name) for m in members)
    cols = [m.name for m in members]
    # Column names written top to bottom: a wide mesh stays readable.
    depth = max(len(c) for c in cols)
    head = []
    for row in range(depth):
        cells = [c[row] if row < len(c) else " " for c in cols]
        head.append(" " * (width + 2) + " ".join(cells))
    lines = head + [" " * (width + 2) + " ".join("-" for _ in cols)]
    for src in members:
        cells = ["-" if src.key == dst.key else ("x" if acl.may_reach(src, dst) else ".") for dst in members]
        lines.append(f"{src.name:{width}}  " + " ".join(cells))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def load_bytes(data: bytes, path: str, members, known_tags=()) -> PolicyFile:
    """A policy file's bytes, parsed and checked (PolicyError otherwise)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _err(path, data[:exc.start].count(b"\n") + 1, "not UTF-8 text") from None
    return load(text, path, members, known_tags)


def invite_tags(invites) -> set:
    """The tags invites give (a policy may name a tag before any node has joined with it)."""
    return {t for i in invites for t in stored_tags(i.tag)}

"""The access policy (issue 13), pure: the compiled matcher against a straightforward reference (hypothesis), the
parser never raising anything but its one-line PolicyError (hypothesis), its errors naming file, line and problem,
evaluation per class (not per pair of nodes), and the directory's visibility, "accept" and change marking."""

from __future__ import annotations

import ipaddress
import re

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from signal_server import policy as P
from signal_server.directory import Directory, Node

NAMES = ["home", "laptop", "phone", "box", "nas"]
TAGS = ["admin", "server", "web"]
ROUTES = ["192.168.1.0/24", "10.1.0.0/16", "fd12:1::/64"]
CIDRS = ["192.168.1.0/24", "192.168.1.128/25", "10.1.2.0/24", "10.0.0.0/8", "fd12:1::/64", "fd12:1:0:0::/96"]
PORTS = ["*", "icmp", "tcp", "udp", "tcp:22", "tcp:24", "tcp:443", "tcp:8000-8100", "udp:53", "udp:55", "udp:50-52",
         "tcp:21-23", "tcp:25-30"]


# --- a straightforward reference: rules read one by one, per packet

def ref_src(rule: dict, m: P.Member, groups: dict) -> bool:
    for s in _expand(rule["from"], groups):
        if s == "*" or s == m.name or (s.startswith("tag:") and s[4:] in m.tags):
            return True
    return False


def _expand(sels, groups):
    out = []
    for s in sels:
        out += groups[s[6:]] if s.startswith("group:") else [s]
    return out


def _routes(m: P.Member):
    return [ipaddress.ip_network(r) for r in (*m.routes, *(("0.0.0.0/0", "::/0") if m.is_exit else ()))]


def ref_dst_ip(rule: dict, r: P.Member, ip, groups) -> bool:
    own = ip in {ipaddress.ip_network(a).network_address for a in r.addrs}
    in_route = any(ip in n for n in _routes(r))
    for s in _expand(rule["to"], groups):
        if s == "*" and (own or in_route):
            return True
        if (s == r.name or (s.startswith("tag:") and s[4:] in r.tags)) and own:
            return True
        if "/" in s and ip in ipaddress.ip_network(s) and in_route:
            return True
    return False


def ref_port(spec: str, proto: int, port: int) -> bool:
    if spec == "*":
        return True
    if spec == "icmp":
        return proto in (1, 58)
    name, _, rng = spec.partition(":")
    if {"tcp": 6, "udp": 17}[name] != proto:
        return False
    if not rng:
        return True
    lo, _, hi = rng.partition("-")
    return int(lo) <= port <= int(hi or lo)


def ref_allows(rules, groups, p: P.Member, r: P.Member, proto: int, port: int, ip) -> bool:
    return p.key != r.key and any(
        ref_src(rule, p, groups) and ref_dst_ip(rule, r, ip, groups)
        and any(ref_port(s, proto, port) for s in rule.get("ports", ["*"])) for rule in rules)


def ref_may_reach(rules, groups, p, r) -> bool:
    """Some rule lets p send r something: r's own addresses, or some address in its routes the rule names."""
    if p.key == r.key:
        return False
    for rule in rules:
        if not ref_src(rule, p, groups):
            continue
        for s in _expand(rule["to"], groups):
            if s == "*" or s == r.name or (s.startswith("tag:") and s[4:] in r.tags):
                return True
            net = ipaddress.ip_network(s) if "/" in s else None
            if net is not None and any(n.version == net.version and n.overlaps(net) for n in _routes(r)):
                return True
    return False


def list_accepts(accept: list, proto: int, port: int, ip) -> bool:
    """The node's side of the contract: does an "accept" list let this packet in."""
    for eproto, lo, hi, cidr in accept:
        if ip not in ipaddress.ip_network(cidr):
            continue
        if eproto == 0:
            return True
        if eproto == 1 and proto in (1, 58):
            return True
        if eproto == proto and proto in (6, 17) and lo <= port <= hi:
            return True
    return False


# --- strategies

@st.composite
def members(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=5, unique=True))
    out = []
    for i, name in enumerate(names):
        out.append(P.Member(bytes([i + 1]) * 32, name, frozenset(draw(st.sets(st.sampled_from(TAGS), max_size=2))),
                            (f"100.64.0.{i + 1}/32", f"fd00::{i + 1}/128"),
                            tuple(draw(st.sets(st.sampled_from(ROUTES[i % 3:i % 3 + 1]), max_size=1))),
                            draw(st.booleans()) and i == 0))
    return out


def selector(dst: bool):
    base = [st.just("*"), st.sampled_from(NAMES), st.sampled_from(TAGS).map(lambda t: "tag:" + t),
            st.just("group:g")]
    if dst:
        base.append(st.sampled_from(CIDRS))
    return st.one_of(*base)


@st.composite
def policies(draw):
    groups = {"g": draw(st.lists(st.one_of(st.sampled_from(NAMES), st.sampled_from(TAGS).map(lambda t: "tag:" + t)),
                                 min_size=1, max_size=3))}
    rules = []
    for _ in range(draw(st.integers(0, 4))):
        rule = {"from": draw(st.lists(selector(False), min_size=1, max_size=3)),
                "to": draw(st.lists(selector(True), min_size=1, max_size=3))}
        if draw(st.booleans()):
            rule["ports"] = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=3))
        rules.append(rule)
    return groups, rules


def toml(groups, rules) -> str:
    q = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    out = ["[groups]"] + [f"{k} = {q(v)}" for k, v in groups.items()]
    for r in rules:
        out += ["", "[[rule]]", f"from = {q(r['from'])}", f"to = {q(r['to'])}"]
        if "ports" in r:
            out.append(f"ports = {q(r['ports'])}")
    return "\n".join(out) + "\n"


def probes(r: P.Member):
    ips = [ipaddress.ip_network(a).network_address for a in r.addrs]
    ips += [ipaddress.ip_address(x) for x in ("192.168.1.7", "192.168.1.200", "10.1.2.3", "10.1.9.9", "fd12:1::5",
                                              "fd12:1::1:0:0:5", "8.8.8.8", "100.64.0.99")]
    for ip in ips:
        for proto, port in ((6, 22), (6, 443), (6, 8050), (6, 23), (6, 24), (6, 20), (6, 31), (17, 53), (17, 54),
                            (17, 55), (17, 22), (1, 0), (58, 0), (47, 0)):
            yield proto, port, ip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members(), policies())
def test_compiled_matcher_agrees_with_the_reference(ms, pol):
    groups, rules = pol
    pf = P.parse(toml(groups, rules), "p.toml")  # names unchecked: a removed node's name matches nothing
    acl = P.Acl(pf)
    for p in ms:
        for r in ms:
            assert acl.may_reach(p, r) == ref_may_reach(rules, groups, p, r), (p.name, r.name)
            assert acl.visible(r, p) == (acl.may_reach(p, r) or acl.may_reach(r, p))
            template = acl.view(acl.class_of(r), acl.class_of(p)).template
            assume(len(template) <= P.MAX_ACCEPT)
            accept = acl.accept_list(r, p)
            if p.key == r.key:
                continue
            for proto, port, ip in probes(r):
                assert list_accepts(accept, proto, port, ip) == ref_allows(rules, groups, p, r, proto, port, ip), (
                    p.name, r.name, proto, port, str(ip), accept)


def test_reference_and_matcher_on_a_worked_example():
    ms = [P.Member(b"h" * 32, "home", frozenset({"server"}), ("100.64.0.1/32", "fd00::1/128"), ("192.168.1.0/24",)),
          P.Member(b"p" * 32, "phone", frozenset(), ("100.64.0.2/32", "fd00::2/128"), plain=True),
          P.Member(b"l" * 32, "laptop", frozenset({"admin"}), ("100.64.0.3/32", "fd00::3/128")),
          P.Member(b"b" * 32, "box", frozenset(), ("100.64.0.4/32", "fd00::4/128"))]
    home, phone, laptop, box = ms
    acl = P.Acl(P.load(EXAMPLE, "ex.toml", ms))
    assert acl.accept_list(home, phone) == [
        [1, 0, 65535, "100.64.0.1/32"], [1, 0, 65535, "fd00::1/128"], [6, 22, 22, "100.64.0.1/32"],
        [6, 22, 22, "fd00::1/128"], [6, 443, 444, "100.64.0.1/32"], [6, 443, 444, "fd00::1/128"],
        [17, 53, 53, "100.64.0.1/32"], [17, 53, 53, "fd00::1/128"],
        [1, 0, 65535, "192.168.1.128/25"], [6, 22, 22, "192.168.1.128/25"], [6, 443, 444, "192.168.1.128/25"]]
    assert acl.accept_list(home, box) == [[17, 53, 53, "100.64.0.1/32"], [17, 53, 53, "fd00::1/128"]]
    assert acl.accept_list(phone, home) == [] and acl.visible(phone, home) and not acl.may_reach(home, phone)
    assert not acl.visible(box, phone) and not acl.visible(laptop, box) and acl.may_reach(laptop, home)
    assert P.matrix_text(acl, ms).splitlines()[-4:] == [
        "box     - x . .", "home    . - . .", "laptop  . x - .", "phone   . x . -"]


EXAMPLE = """\
[groups]
family = ["phone", "laptop"]

[[rule]]
from = ["group:family", "tag:admin"]
to = ["home", "tag:server", "192.168.1.128/25"]
ports = ["tcp:22", "tcp:443", "tcp:444", "icmp"]

[[rule]]
from = ["*"]
to = ["tag:server"]
ports = ["udp:53"]
"""


# --- the parser

ERRORS = [
    ("[[rule]]\nfrom = ['nobody']\nto = ['*']\n", 1, "unknown name 'nobody'"),
    ("[[rule]]\nfrom = ['*']\nto = ['*']\n\n[[rule]]\nfrom = ['tag:ghost']\nto = ['*']\n", 5, "unknown tag 'ghost'"),
    ("[[rule]]\nfrom=['*']\nto=['*']\n[[rule]]\nfrom=['*']\nto=['*']\n[[rule]]\nfrom=['*']\nto=['*']\n"
     "ports=['tcp:70000']\n", 7, "bad port 'tcp:70000'"),
    ("[[rule]]\nfrom = ['*']\nto = ['*']\nports = ['tcp:90-80']\n", 1, "bad port 'tcp:90-80'"),
    ("[[rule]]\nfrom = ['*']\nto = ['*']\nports = ['sctp:1']\n", 1, "bad port 'sctp:1'"),
    ("[[rule]]\nfrom = ['*']\nto = ['10.9.0.0/16']\n", 1, "10.9.0.0/16 is not inside an approved subnet route"),
    ("[[rule]]\nfrom = ['*']\nto = ['192.168.1.1/24']\n", 1, "host bits are set (did you mean 192.168.1.0/24?)"),
    ("[[rule]]\nfrom = ['group:nope']\nto = ['*']\n", 1, "unknown group 'nope'"),
    ("[[rule]]\nfrom = ['192.168.1.0/24']\nto = ['*']\n", 1, "a CIDR is a destination only"),
    ("\n\n[[rule]]\nfrom = ['*']\n", 3, "rule: no 'to'"),
    ("[[rule]]\nfrom = ['*']\nto = ['*']\nport = ['tcp:22']\n", 1, "unknown key 'port'"),
    ("[[rule]]\nfrom = []\nto = ['*']\n", 1, "from is empty"),
    ("\n[[rule]]\nfrom = ['*'\nto = ['*']\n", 4, "TOML: "),
    ("\n\nrules = 1\n", 3, "unknown key 'rules'"),
    ("[groups]\nx = ['Bad Name!']\n", 2, "is no name, tag:X, group:X, * or CIDR"),
    ("[[rule]]\nfrom = ['tag:UPPER']\nto = ['*']\n", 1, "bad tag 'UPPER'"),
]


@pytest.mark.parametrize("text,line,problem", ERRORS)
def test_errors_are_one_line_naming_file_line_and_problem(text, line, problem):
    ms = [P.Member(b"h" * 32, "home", frozenset({"server"}), ("100.64.0.1/32", "fd00::1/128"), ("192.168.1.0/24",))]
    with pytest.raises(P.PolicyError) as exc:
        P.load(text, "/etc/meshwg/policy.toml", ms)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"/etc/meshwg/policy.toml:{line}: "), msg
    assert problem in msg, msg


def test_a_tag_only_an_invite_gives_is_known_and_not_utf8_is_an_error():
    P.load("[[rule]]\nfrom = ['tag:ops']\nto = ['*']\n", "p", [], known_tags={"ops"})
    with pytest.raises(P.PolicyError, match=r"^p:2: not UTF-8"):
        P.load_bytes(b"\n# \xff\n", "p", [])


TOMLISH = st.lists(st.one_of(
    st.sampled_from(["[[rule]]", "[groups]", "[rule]", "from = ", "to = ", "ports = ", "description = ", "g = ",
                     "[", "]", "'", '"', "*", "tag:", "group:", "g", "home", "tcp:", "udp:", "icmp", "10.0.0.0/8",
                     "::/0", "1.2.3.4", "-", "65536", "22", ",", "\n", " ", "=", "{", "}", "#", "true", "1.5", "a.b"]),
    st.text(max_size=8)), max_size=40).map("".join)


VALUES = st.recursive(
    st.one_of(st.sampled_from(["*", "home", "tag:x", "tag:", "group:g", "10.0.0.0/8", "tcp:22", "icmp", "x:y"]),
              st.integers(-2, 70000), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["from", "to", "a"]), inner,
                                                                         max_size=2)), max_leaves=6)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def structured(draw):
    """Well-formed TOML with the right keys and any kind of value: the parser's type checks, not tomllib's."""
    out = []
    if draw(st.booleans()):
        out += ["[groups]", f"g = {toml_value(draw(VALUES))}"]
    for _ in range(draw(st.integers(0, 3))):
        out.append("[[rule]]")
        for k in draw(st.lists(st.sampled_from(["from", "to", "ports", "description"]), unique=True)):
            out.append(f"{k} = {toml_value(draw(VALUES))}")
    return "\n".join(out) + "\n"


@settings(max_examples=1500, deadline=None)
@given(st.one_of(TOMLISH, st.text(max_size=200), structured()))
def test_the_parser_raises_only_its_one_line_error(text):
    ms = [P.Member(b"h" * 32, "home", frozenset({"server"}), ("100.64.0.1/32", "fd00::1/128"), ("10.0.0.0/8",))]
    try:
        pf = P.load(text, "f.toml", ms, known_tags={"x"})
    except P.PolicyError as exc:
        msg = str(exc)
        m = re.match(r"^f\.toml:(\d+): \S", msg)
        assert m and "\n" not in msg and "\r" not in msg, msg
        assert 1 <= int(m.group(1)) <= text.count("\n") + text.count("\r") + 2, msg
        return
    acl = P.Acl(pf)  # what parses evaluates
    acl.may_reach(ms[0], ms[0])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_bytes_raise_only_the_one_line_error(data):
    try:
        P.load_bytes(data, "b", [])
    except P.PolicyError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("b:")


# --- per class, not per pair

def mesh(n: int, tag_of) -> list[Node]:
    return [Node(i + 1, i.to_bytes(2, "big") * 16, f"n{i}", f"100.64.{i >> 8}.{i & 255}", f"fd00::{i:x}",
                 tags=(tag_of(i),)) for i in range(n)]


def test_a_mesh_is_evaluated_per_class_pair_not_per_node_pair(monkeypatch):
    calls = {"signature": 0, "template": 0}

    def counting(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(P, "_template", counting("template", P._template))
    monkeypatch.setattr(P.Acl, "_signature", counting("signature", P.Acl._signature))
    pf = P.parse("[[rule]]\nfrom = ['tag:a']\nto = ['tag:b']\nports = ['tcp:22']\n"
                 "[[rule]]\nfrom = ['tag:c']\nto = ['*']\n", "p")
    acl = P.Acl(pf)
    nodes = [P.member_of(n) for n in mesh(300, lambda i: "abc"[i % 3])]
    for a in nodes:
        for b in nodes:
            acl.visible(a, b)
            acl.accept_list(a, b)
    # 90,000 pairs of three tag sets: three signatures, nine evaluations
    assert calls == {"signature": 3, "template": 9}


def test_accept_lists_are_cut_at_64_fail_closed():
    ports = ", ".join(f"'tcp:{p}'" for p in range(1000, 1200, 2))  # 100 ranges that do not touch
    acl = P.Acl(P.parse(f"[[rule]]\nfrom = ['*']\nto = ['*']\nports = [{ports}]\n", "p"))
    a, b = (P.member_of(n) for n in mesh(2, lambda i: "x"))
    got = acl.accept_list(a, b)
    assert len(got) == 64 and all(e[0] == 6 and e[1] == e[2] for e in got) and acl.truncated == 1


# --- the directory under a policy

def unpack(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False)


def policy_of(text: str):
    return P.parse(text, "p.toml")


ALLOW_AB = "[[rule]]\nfrom = ['a']\nto = ['b']\nports = ['tcp:22']\n"


def directory(*names, tags=None):
    d = Directory()
    for i, name in enumerate(names):
        d.put(Node(i + 1, bytes([i + 1]) * 32, name, f"100.64.0.{i + 1}", f"fd00::{i + 1}",
                   tags=tuple((tags or {}).get(name, ()))))
    return d


def key(i):
    return bytes([i]) * 32


def test_a_denied_pair_never_gets_entries_and_an_allowed_one_gets_accept():
    d = directory("a", "b", "c")
    d.set_policy(policy_of(ALLOW_AB))
    snap = {n: [unpack(e) for e in d.subscribe(key(i + 1))] for i, n in enumerate("abc")}
    assert [e["name"] for e in snap["a"]] == ["b"] and [e["name"] for e in snap["b"]] == ["a"] and snap["c"] == []
    assert snap["b"][0]["accept"] == [[6, 22, 22, "100.64.0.2/32"], [6, 22, 22, "fd00::2/128"]]
    assert snap["a"][0]["accept"] == []  # b may send a nothing new (a's replies come back statefully)
    d.update(key(3), candidates=[("198.51.100.3", 1, "stun")])  # c's change goes to nobody
    assert d.take_pending(key(1)) == ([], []) and d.take_pending(key(2)) == ([], [])


def test_a_policy_change_removes_and_reveals_only_what_changed():
    d = directory("a", "b", "c")
    d.set_policy(policy_of(ALLOW_AB))
    for i in (1, 2, 3):
        d.subscribe(key(i))
    d.set_policy(policy_of("[[rule]]\nfrom = ['a']\nto = ['c']\n"))
    ups, rems = d.take_pending(key(1))
    assert [unpack(u)["name"] for u in ups] == ["c"] and rems == [key(2)]
    assert unpack(ups[0])["accept"] == []
    ups, rems = d.take_pending(key(3))
    assert [(unpack(u)["name"], unpack(u)["accept"]) for u in ups] == [
        ("a", [[0, 0, 65535, "100.64.0.3/32"], [0, 0, 65535, "fd00::3/128"]])] and rems == []
    assert d.take_pending(key(2)) == ([], [key(1)])
    d.set_policy(None)  # no policy: everyone again, without "accept"
    ups, _ = d.take_pending(key(2))
    assert sorted(unpack(u)["name"] for u in ups) == ["a", "c"] and all("accept" not in unpack(u) for u in ups)
    ups, _ = d.take_pending(key(1))
    assert sorted(unpack(u)["name"] for u in ups) == ["b", "c"]  # b back, c without its accept list
    assert all("accept" not in unpack(u) for u in ups)


def test_a_policy_change_that_changes_nothing_sends_nothing():
    d = directory("a", "b", "c")
    d.set_policy(policy_of(ALLOW_AB))
    for i in (1, 2, 3):
        d.subscribe(key(i))
    d.set_policy(policy_of("# the same, reworded\n[[rule]]\nto = ['b']\nfrom = ['a']\nports = ['tcp:22-22']\n"))
    assert not any(d.has_pending(key(i)) for i in (1, 2, 3))


def test_a_tag_change_reveals_and_hides_and_changes_accept_both_ways():
    d = directory("a", "b", "c", tags={"c": ("dev",)})
    d.set_policy(policy_of("[[rule]]\nfrom = ['tag:ops']\nto = ['tag:dev']\nports = ['tcp:22']\n"))
    for i in (1, 2, 3):
        d.subscribe(key(i))
    d.update(key(1), tags=("ops",))  # a becomes ops: c sees a (with accept), a sees c (accept [])
    assert [(unpack(u)["name"], unpack(u)["accept"], unpack(u)["tags"]) for u in d.take_pending(key(3))[0]] == [
        ("a", [[6, 22, 22, "100.64.0.3/32"], [6, 22, 22, "fd00::3/128"]], ["ops"])]
    assert [unpack(u)["name"] for u in d.take_pending(key(1))[0]] == ["c"]
    assert not d.has_pending(key(2))
    d.update(key(3), tags=())  # c stops being dev: both lose each other
    assert d.take_pending(key(1)) == ([], [key(3)]) and d.take_pending(key(3)) == ([], [key(1)])


def test_plain_ingress_targets_follow_the_policy():
    d = directory("a", "b")
    d.put(Node(9, key(9), "phone", "100.64.0.9", "fd00::9", kind="plain", targets=frozenset({1, 2})))
    assert d.plain_targets() == {key(1), key(2)}
    d.set_policy(policy_of("[[rule]]\nfrom = ['phone']\nto = ['b']\n[[rule]]\nfrom = ['a']\nto = ['phone']\n"))
    assert d.plain_targets() == {key(2)}  # a may reach the phone, but the phone may not reach a
    snap_a = [unpack(e) for e in d.subscribe(key(1))]
    assert [(e["name"], e["accept"]) for e in snap_a] == [("phone", [])]  # a sees it: it may reach it

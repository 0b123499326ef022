"""Access control in the join agent (issue 13): a directory entry's "accept" list parsed so that nothing a server
or a corrupted cache sends turns into "accept everything" (absent is the only way to say no policy), its tags, the
netmap cache keeping both, and `meshwg status` saying per peer what it may send us and the node's tags."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshwg.commands.mesh import format_status
from meshwg.control import events as CE
from meshwg.control.client import _peer_untrusted, entry_accept_untrusted, tags_untrusted
from meshwg.io.agent.agent import _peer_from_json, _peer_to_json, _welcome_from_json, _welcome_to_json
from meshwg.signaling.protocol import pack_entry

KEY = bytes(range(32))
SSH = [6, 22, 22, "100.64.0.1/32"]


def entry(**extra) -> bytes:
    return pack_entry({"key": KEY, "id": 3, "name": "laptop", "ipv4": "100.64.0.3", "ipv6": "fd00::3", "cand": [],
                       "online": True, **extra})


def test_an_absent_accept_field_is_no_policy_and_any_present_value_is_a_policy():
    assert _peer_untrusted(entry()).accept is None
    assert _peer_untrusted(entry(accept=[SSH])).accept == ((6, 22, 22, "100.64.0.1/32"),)
    assert _peer_untrusted(entry(accept=[])).accept == ()
    for junk in (None, "all", {"x": 1}, 7, True, b"\x00"):
        p = _peer_untrusted(entry(accept=junk))
        assert p is not None and p.accept == () and p.accept_refused == 1, junk


def test_bad_rules_are_dropped_alone_and_counted():
    rules = [SSH, [True, 0, 1, "100.64.0.1/32"], [6, 23, 22, "100.64.0.1/32"], [7, 0, 0, "100.64.0.1/32"],
             [6, 0, 70000, "100.64.0.1/32"], [6, 1, 1, "100.64.0.1/24"], [6, 1, 1, 5], "junk", [6, 1, 1],
             [6, -1, 1, "100.64.0.1/32"], [17, 53, 53, "fd00::1/128"], [1, 0, 65535, "not a cidr"], [6, 1.0, 2, "::/0"]]
    accept, refused = entry_accept_untrusted(rules)
    assert accept == ((6, 22, 22, "100.64.0.1/32"), (17, 53, 53, "fd00::1/128"))
    assert refused == 11


def test_past_64_rules_the_rest_are_refused():
    accept, refused = entry_accept_untrusted([[6, p, p, "100.64.0.1/32"] for p in range(1, 71)])
    assert len(accept) == 64 and refused == 6


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=False) |
                       st.text(max_size=20) | st.sampled_from(["100.64.0.1/32", "fd00::/64", "0.0.0.0/0"]),
                       lambda inner: st.lists(inner, max_size=6), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(JSONISH)
def test_any_accept_value_parses_to_a_list_never_to_no_policy(value):
    accept, refused = entry_accept_untrusted(value)
    assert isinstance(accept, tuple) and refused >= 0
    for proto, lo, hi, cidr in accept:
        assert proto in (0, 1, 6, 17) and 0 <= lo <= hi <= 65535 and isinstance(cidr, str)
    p = _peer_untrusted(entry(accept=value))
    assert p is not None and p.accept is not None


def test_tags_keep_only_what_looks_like_a_tag():
    assert tags_untrusted(["server", "Bad Tag", 5, "laptop", "server", "\x1b[31m"]) == ("server", "laptop")
    assert tags_untrusted("server") == ()
    assert _peer_untrusted(entry(tags=["build"])).tags == ("build",)


def test_the_cache_keeps_accept_lists_and_tags_and_a_bad_cached_list_fails_closed():
    p = _peer_untrusted(entry(accept=[SSH], tags=["laptop"]))
    again = _peer_from_json(_peer_to_json(p))
    assert again.accept == p.accept and again.tags == ("laptop",)
    none = _peer_untrusted(entry())
    assert _peer_from_json(_peer_to_json(none)).accept is None
    corrupt = {**_peer_to_json(p), "accept": "everything"}
    assert _peer_from_json(corrupt).accept == ()
    w = CE.Welcome(1, "me", "100.64.0.1", "fd00::1", "100.64.0.0/10", "fd00::/48", (), (), (), 10.0, KEY, ("nas",))
    assert _welcome_from_json(_welcome_to_json(w)).tags == ("nas",)
    old = _welcome_to_json(w)
    del old["tags"]   # a cache written before tags
    assert _welcome_from_json(old).tags == ()


def _status(peers) -> dict:
    return {"interface": "mesh0", "name": "home", "tags": ["server"], "addresses": ["100.64.0.1/32"],
            "listen_port": 1, "control": {"connected": True}, "relay": {"mode": "udp"},
            "nat": {"mapping": None, "reflexive": []}, "peers": peers}


def _peer(name, accepts, tags=()) -> dict:
    return {"name": name, "addresses": ["100.64.0.2/32"], "online": True, "path": "relay", "relay_reason": None,
            "endpoint": None, "latency_ms": None, "last_handshake_ago": None, "rx_bytes": 0, "tx_bytes": 0,
            "accepts": accepts, "tags": list(tags)}


def test_status_says_what_each_peer_may_send_once_a_policy_is_in_force():
    text = format_status(_status([_peer("phone", "tcp/22,443 icmp", ["family"]), _peer("box", "replies only"),
                                  _peer("old", None)]))
    assert "mesh0: home  100.64.0.1/32  port 1  tags server" in text
    assert "peer phone  100.64.0.2/32  [tags family]" in text
    assert "; accepts: tcp/22,443 icmp\n" in text and "; accepts: replies only\n" in text
    assert "; accepts: all (no policy)\n" in text
    assert "accepts:" not in format_status(_status([_peer("a", None), _peer("b", None)]))


def test_a_status_row_names_the_rules_the_node_enforces():
    from meshwg.io.agent.agent import _accepts
    from meshwg.mesh.netmap import PeerSpec

    assert _accepts(None) is None
    assert _accepts(PeerSpec.make(KEY, "x", accept=None)) is None
    assert _accepts(PeerSpec.make(KEY, "x", accept=[(6, 22, 22, "100.64.0.1/32"), (1, 0, 65535, "fd00::1/128")])) \
        == "tcp/22 icmp"
    assert _accepts(PeerSpec.make(KEY, "x", accept=[])) == "replies only"

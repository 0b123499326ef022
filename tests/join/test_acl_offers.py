"""`meshwg status` says per peer both directions in one line (issue 13, item 4): what this node may send it (the
entry's "offers", informational: the peer enforces it) and what this node's filter accepts from it. The "offers"
field is parsed like "accept": a bad rule is dropped alone and counted, a bad value is an empty list, never "no
policy" nor anything else; the netmap cache keeps it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshwg.commands.mesh import format_status
from meshwg.control.client import _peer_untrusted
from meshwg.io.agent.agent import _peer_from_json, _peer_to_json, _sends
from meshwg.signaling.protocol import pack_entry

KEY = bytes(range(32))
SSH = [6, 22, 22, "100.64.0.3/32"]


def entry(**extra) -> bytes:
    return pack_entry({"key": KEY, "id": 3, "name": "laptop", "ipv4": "100.64.0.3", "ipv6": "fd00::3", "cand": [],
                       "online": True, **extra})


def test_offers_absent_is_none_and_present_is_parsed():
    assert _peer_untrusted(entry()).offers is None
    assert _peer_untrusted(entry(accept=[])).offers is None   # a server that sends no offers
    p = _peer_untrusted(entry(accept=[], offers=[SSH, [1, 0, 65535, "fd00::3/128"]]))
    assert p.offers == ((6, 22, 22, "100.64.0.3/32"), (1, 0, 65535, "fd00::3/128")) and p.accept == ()
    assert p.accept_refused == 0


def test_bad_offers_are_dropped_and_counted_never_turned_into_anything_else():
    p = _peer_untrusted(entry(accept=[SSH], offers=[SSH, [6, 23, 22, "100.64.0.3/32"], [9, 0, 0, "::/0"], "x",
                                                      [6, 1, 1, "100.64.0.3/24"], [True, 0, 1, "::/0"]]))
    assert p.offers == ((6, 22, 22, "100.64.0.3/32"),) and p.accept == ((6, 22, 22, "100.64.0.3/32"),)
    assert p.accept_refused == 5
    for junk in (None, "all", {"x": 1}, 7, True, b"\x00"):
        q = _peer_untrusted(entry(accept=[SSH], offers=junk))
        assert q is not None and q.offers == () and q.accept == ((6, 22, 22, "100.64.0.3/32"),), junk


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=False) |
                       st.text(max_size=20) | st.sampled_from(["100.64.0.1/32", "fd00::/64", "0.0.0.0/0"]),
                       lambda inner: st.lists(inner, max_size=6), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(JSONISH)
def test_any_offers_value_leaves_the_accept_list_alone(value):
    p = _peer_untrusted(entry(accept=[SSH], offers=value))
    assert p is not None and p.accept == ((6, 22, 22, "100.64.0.3/32"),) and isinstance(p.offers, tuple)
    for proto, lo, hi, cidr in p.offers:
        assert proto in (0, 1, 6, 17) and 0 <= lo <= hi <= 65535 and isinstance(cidr, str)
    assert _peer_untrusted(entry(offers=value)).accept is None   # offers never make a policy of their own


def test_the_cache_keeps_offers_and_a_bad_cached_list_is_empty():
    p = _peer_untrusted(entry(accept=[], offers=[SSH]))
    assert _peer_from_json(_peer_to_json(p)).offers == p.offers
    assert _peer_from_json(_peer_to_json(_peer_untrusted(entry()))).offers is None
    assert "offers" not in _peer_to_json(_peer_untrusted(entry()))
    assert _peer_from_json({**_peer_to_json(p), "offers": "everything"}).offers == ()


def test_a_status_row_summarises_the_offers():
    assert _sends(_peer_untrusted(entry())) is None
    assert _sends(_peer_untrusted(entry(offers=[SSH, [1, 0, 65535, "fd00::3/128"]]))) == "tcp/22 icmp"
    assert _sends(_peer_untrusted(entry(offers=[]))) == "replies only"


def _status(peers) -> dict:
    return {"interface": "mesh0", "name": "home", "tags": [], "addresses": ["100.64.0.1/32"], "listen_port": 1,
            "control": {"connected": True}, "relay": {"mode": "udp"}, "nat": {"mapping": None, "reflexive": []},
            "peers": peers}


def _peer(name, sends, accepts) -> dict:
    return {"name": name, "addresses": ["100.64.0.2/32"], "online": True, "path": "relay", "relay_reason": None,
            "endpoint": None, "latency_ms": None, "last_handshake_ago": None, "rx_bytes": 0, "tx_bytes": 0,
            "accepts": accepts, "sends": sends, "tags": []}


def test_status_shows_both_directions_in_one_line():
    text = format_status(_status([_peer("phone", "tcp/22 icmp", "replies only"), _peer("box", None, "icmp"),
                                  _peer("old", None, None)]))
    lines = text.splitlines()
    assert "    sends: tcp/22 icmp; accepts: replies only" in lines
    assert "    sends: unknown; accepts: icmp" in lines            # a server that sent no offers
    assert "    sends: all (no policy); accepts: all (no policy)" in lines
    assert "sends:" not in format_status(_status([_peer("a", None, None)]))   # no policy: no line

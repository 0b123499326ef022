"""LAN peers behind one hairpinning NAT settle on each other's own LAN address (lab flake, hairpin case).

Seen in the lab: the peer's own LAN address answered first at 2.7 ms (its first packet waits for ARP),
the router's hairpin path 1.6 ms later; one noisy sample outweighed the LAN bonus, and while direct
below GOOD_ENOUGH_LATENCY nothing re-probed the LAN address, so traffic stayed on the NAT for good.
"""

import itertools

from meshwg.disco import paths as P
from meshwg.disco.peer_paths import PeerPaths, SendPing

OWN = ("192.168.6.3", 41000)        # the peer's advertised LAN address
PUBLIC = ("198.51.100.15", 57534)   # the peer's STUN address, reached through the hairpin
ROUTER = ("192.168.6.1", 41000)     # the hairpin's source: only ever learned from pings


def _rb():
    counter = itertools.count()
    return lambda n: next(counter).to_bytes(n, "big")


def _pings(actions):
    return {a.addr: a.txid for a in actions if isinstance(a, SendPing)}


def _peer(now=0.0):
    pp = PeerPaths(b"k" * 32, _rb())
    pp.set_candidates("directory", [OWN, PUBLIC], now)
    pp.note_activity(now)
    return pp


def test_noisy_first_sample_does_not_outweigh_the_lan_bonus():
    assert not P.better_path(P.ScoredPath(ROUTER, 0.00162, advertised=False), P.ScoredPath(OWN, 0.00273))
    assert not P.better_path(P.ScoredPath(PUBLIC, 0.00162), P.ScoredPath(OWN, 0.00273))
    # a real latency gain still counts
    assert P.better_path(P.ScoredPath(("203.0.113.2", 1), 0.030), P.ScoredPath(("203.0.113.1", 1), 0.050))


def test_lan_candidate_wins_after_a_slow_first_pong():
    pp = _peer()
    sent = _pings(pp.poll(0.0, 0.0, None))
    assert set(sent) == {OWN, PUBLIC}
    # the hairpin path answers first; the LAN address's first pong is late (ARP), so it loses once
    assert pp.on_pong(sent[PUBLIC], 0.001)
    assert pp.on_pong(sent[OWN], 0.015)
    assert pp.endpoint(0.02)[0] == PUBLIC
    t = 0.0
    for _ in range(P.CONTENDER_ROUNDS):
        t = pp.next_heartbeat_at
        sent = _pings(pp.poll(t, t, None))
        assert OWN in sent, "the better address kind is re-pinged with the heartbeat"
        for addr in (PUBLIC, OWN):
            if addr in sent:
                pp.on_pong(sent[addr], t + 0.001)
        if pp.endpoint(t + 0.002)[0] == OWN:
            break
    assert pp.endpoint(t + 0.002)[0] == OWN, "settled on the hairpin path instead of the LAN address"
    assert t - 0.0 <= P.CONTENDER_ROUNDS * P.HEARTBEAT_INTERVAL
    # once on the best kind, heartbeats ping only the best path
    t = pp.next_heartbeat_at
    assert set(_pings(pp.poll(t, t, None))) == {OWN}


def test_contenders_stop_after_a_few_heartbeats():
    # the LAN address answers but is really much slower: re-pinging it is bounded
    pp = _peer()
    sent = _pings(pp.poll(0.0, 0.0, None))
    pp.on_pong(sent[PUBLIC], 0.001)
    pp.on_pong(sent[OWN], 0.050)
    extra = 0
    for _ in range(10):
        t = pp.next_heartbeat_at
        sent = _pings(pp.poll(t, t, None))
        extra += OWN in sent
        for addr, latency in ((PUBLIC, 0.001), (OWN, 0.050)):
            if addr in sent:
                pp.on_pong(sent[addr], t + latency)
    assert pp.endpoint(t)[0] == PUBLIC
    assert extra == P.CONTENDER_ROUNDS


def test_ping_learned_address_advertised_later_earns_the_lan_bonus():
    pp = PeerPaths(b"k" * 32, _rb())
    pp.note_activity(0.0)
    pp.on_ping(b"t" * 12, OWN, None, 0.0)       # the peer pinged us before we knew its candidates
    assert pp.candidates[OWN].source == "ping"
    pp.on_call_me_maybe([PUBLIC, OWN], 0.1)     # "cmm" ranks below "ping", yet the peer advertises it
    assert pp.candidates[OWN].source == "cmm"

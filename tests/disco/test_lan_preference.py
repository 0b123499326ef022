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
    assert pp.on_pong(_pings(pp.poll(0.0, 0.0, None))[OWN], 0.001, src=OWN)   # and answered ours
    assert pp.candidates[OWN].source == "ping"
    pp.on_call_me_maybe([PUBLIC, OWN], 0.1)     # "cmm" ranks below "ping", yet the peer advertises it
    assert pp.candidates[OWN].source == "cmm"


OTHER = ("198.51.100.16", 41641)    # a second public address of the peer: same kind as PUBLIC


def _drive(pp, until, latency, step=0.5):
    """Keep the peer active and run its timers up to `until`; latency(addr, t) is the RTT of a ping
    sent at t (None: lost). Returns the (t, addr) of every ping sent after t=0."""
    log = []
    for i in range(int(until / step) + 1):
        t = i * step
        pp.note_activity(t)
        for addr, txid in _pings(pp.poll(t, t, None)).items():
            if t > 0:
                log.append((t, addr))
            rtt = latency(addr, t)
            if rtt is not None:
                pp.on_pong(txid, t + rtt)
    return log


def _three_candidates():
    pp = PeerPaths(b"k" * 32, _rb())
    pp.set_candidates("directory", [OWN, PUBLIC, OTHER], 0.0)
    pp.note_activity(0.0)
    return pp


def test_good_enough_direct_path_gets_no_full_upgrade_round():
    """Pins GOOD_ENOUGH_LATENCY: on a direct path within it whose address kind nothing beats (the peer's
    LAN address), upgrade rounds ping no other candidate; only the heartbeat pings the path. The old
    code ran a full round every UPGRADE_INTERVAL whatever the latency (the rule was dead code)."""
    pp = _three_candidates()
    log = _drive(pp, 2 * P.UPGRADE_INTERVAL + 10, lambda addr, t: 0.001 if addr == OWN else 0.002)
    assert pp.endpoint(pp.next_heartbeat_at)[0] == OWN
    assert {a for _, a in log} == {OWN}
    assert len(log) >= 2 * P.UPGRADE_INTERVAL / P.HEARTBEAT_INTERVAL   # the heartbeat kept running


def test_good_enough_upgrade_round_still_pings_the_lan_address():
    """Pins the LAN preference under GOOD_ENOUGH_LATENCY: parked on the hairpin NAT path (the LAN
    address lost its first pings and every contender round), the upgrade round re-pings the LAN
    address, and only it (not the same-kind OTHER), so traffic moves to the LAN within one interval."""
    pp = _three_candidates()

    def latency(addr, t):
        if addr == OWN:
            return 0.001 if t >= P.UPGRADE_INTERVAL else None
        return 0.001 if addr == PUBLIC else 0.002

    log = _drive(pp, P.UPGRADE_INTERVAL + 10, latency)
    assert pp.endpoint(pp.next_heartbeat_at)[0] == OWN, "stayed on the NAT path"
    assert any(P.UPGRADE_INTERVAL <= t for t, a in log if a == OWN)
    assert OTHER not in {a for _, a in log}


def test_slow_direct_path_still_gets_full_upgrade_rounds():
    """Above GOOD_ENOUGH_LATENCY a direct path keeps the full upgrade round every UPGRADE_INTERVAL:
    a same-kind candidate may have become faster."""
    pp = _three_candidates()
    log = _drive(pp, P.UPGRADE_INTERVAL + 10, lambda addr, t: 0.020 if addr == OWN else 0.030)
    assert pp.endpoint(pp.next_heartbeat_at)[0] == OWN
    for addr in (PUBLIC, OTHER):
        times = [t for t, a in log if a == addr]
        assert times and max(times) >= P.UPGRADE_INTERVAL, addr


def test_one_late_pong_on_the_lan_path_does_not_hand_traffic_to_the_hairpin():
    """Lab flake (CI, hairpin case): settled on the peer's own LAN address, one heartbeat's pong came 10 ms
    late on a busy host while the router's address (the hairpin's source, verified from the peer's ping)
    answered in 1 ms; scored on that one sample the LAN bonus lost and traffic left the LAN path."""
    pp = _peer()
    sent = _pings(pp.poll(0.0, 0.0, None))
    pp.on_pong(sent[OWN], 0.001)
    pp.on_pong(sent[PUBLIC], 0.0012)
    assert pp.endpoint(0.01)[0] == OWN
    t = pp.next_heartbeat_at
    sent = _pings(pp.poll(t, t, None))
    pp.on_pong(sent[OWN], t + 0.001)
    t = pp.next_heartbeat_at
    sent = _pings(pp.poll(t, t, None))
    pp.on_pong(sent[OWN], t + 0.010)          # the late one
    # the peer pings us from behind the hairpin: its source is verified with a ping of ours
    pp.on_ping(b"t" * 12, ROUTER, None, t + 0.011)
    verify = _pings(pp.poll(t + 0.011, t + 0.011, None))
    assert ROUTER in verify
    pp.on_pong(verify[ROUTER], t + 0.012, src=ROUTER)
    assert pp.endpoint(t + 0.013)[0] == OWN, "one late sample moved traffic off the LAN address"

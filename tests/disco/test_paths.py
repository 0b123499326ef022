import ipaddress
import random

from meshwg.disco import paths as P
from meshwg.disco.netcheck import ADM, APDM, EIM, FilteringTests, StunResult, classify
from meshwg.disco.peer_paths import MAX_CANDIDATES, PeerPaths, SendPing, valid_candidate

S = P.ScoredPath


def test_relay_always_loses_to_direct():
    relay = S(object(), 0.001)
    assert P.better_path(S(("203.0.113.1", 1), 0.5), relay)
    assert not P.better_path(relay, S(("203.0.113.1", 1), 0.5))


def test_hysteresis_and_bonuses():
    cur = S(("203.0.113.1", 1), 0.050)
    assert not P.better_path(S(("203.0.113.2", 1), 0.0499), cur)   # 0.2 % better, under 0.5 ms: noise
    assert P.better_path(S(("203.0.113.2", 1), 0.030), cur)         # 40 % better
    assert not P.better_path(S(("203.0.113.2", 1), 0.060), cur)
    # a LAN path wins over a slightly faster public one (+20 points)
    assert P.better_path(S(("192.168.1.5", 1), 0.011), S(("203.0.113.2", 1), 0.010))
    assert not P.better_path(S(("203.0.113.2", 1), 0.010), S(("192.168.1.5", 1), 0.011))
    assert not P.better_path(cur, cur)


def test_probe_backoff():
    assert [P.probe_interval(i) for i in range(6)] == [5, 10, 20, 40, 60, 60]


def test_valid_candidate():
    assert valid_candidate(("192.168.1.1", 5))
    assert valid_candidate(("2001:db8::1", 5))
    for bad in [("192.168.1.1", 0), ("0.0.0.0", 5), ("224.0.0.1", 5), ("255.255.255.255", 5),
                ("240.0.0.1", 5), ("fe80::1", 5), ("x", 5), ("1.2.3.4", 70000), ("1.2.3.4",), "a", None,
                ("127.0.0.1", 53), ("127.8.0.1", 53), ("::1", 53), ("ff02::1", 5), ("::", 5)]:
        assert not valid_candidate(bad), bad
    mesh = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd00::/48"))
    assert not valid_candidate(("100.64.0.9", 5), mesh) and not valid_candidate(("fd00::9", 5), mesh)
    assert valid_candidate(("100.128.0.9", 5), mesh) and valid_candidate(("fd01::9", 5), mesh)


def _rb(seed=1):
    r = random.Random(seed)
    return lambda n: r.getrandbits(8 * n).to_bytes(n, "big")


def test_bogus_candidates_cannot_flood():
    pp = PeerPaths(b"k" * 32, _rb())
    bogus = [(f"10.{i // 250}.{i % 250}.1", 1000 + i) for i in range(5000)] + [("1.2.3.4", 0)] * 100
    pp.set_candidates("directory", bogus, 0.0)
    pp.on_call_me_maybe(bogus[:32], 0.0)
    assert len(pp.candidates) <= MAX_CANDIDATES
    pp.note_activity(0.0)
    sent = []
    t = 0.0
    while t < 60.0:
        sent += [(t, a) for a in pp.poll(t, t, None) if isinstance(a, SendPing)]
        pp.on_call_me_maybe(bogus[:32], t)   # a hostile peer spamming call-me-maybe
        pp.last_activity = t
        t += 0.01
    per_second = {}
    for ts, _ in sent:
        per_second[int(ts)] = per_second.get(int(ts), 0) + 1
    # The per-peer budget: 20 pings a second after a burst of 20 (literals: the bound under test must not
    # move with the constant it checks).
    assert max(per_second.values()) <= 20 + 20
    assert len(sent) <= 20 + 60 * 20
    assert len({a.addr for _, a in sent}) <= 16


def test_netcheck_classification():
    cone = classify([StunResult(("198.51.100.1", 3478), ("203.0.113.1", 4000), 4000),
                     StunResult(("198.51.100.2", 3478), ("203.0.113.1", 4000), 4000)],
                    FilteringTests(False, False))
    assert cone.mapping == EIM and cone.mapping_kind == "endpoint-independent" and not cone.hard
    assert cone.reflexive == [("203.0.113.1", 4000)] and cone.preserves_port
    assert cone.filtering == APDM
    sym = classify([StunResult(("198.51.100.1", 3478), ("203.0.113.1", 4000)),
                    StunResult(("198.51.100.1", 3479), ("203.0.113.1", 4001)),
                    StunResult(("198.51.100.2", 3478), ("203.0.113.1", 4002))])
    assert sym.mapping == APDM and sym.hard and sym.mapping_kind == "endpoint-dependent"
    adm = classify([StunResult(("198.51.100.1", 3478), ("203.0.113.1", 4000)),
                    StunResult(("198.51.100.1", 3479), ("203.0.113.1", 4000)),
                    StunResult(("198.51.100.2", 3478), ("203.0.113.1", 4002))], FilteringTests(True, True))
    assert adm.mapping == ADM and adm.filtering == EIM
    assert not classify([StunResult(("198.51.100.1", 3478), None)]).udp
    assert classify([StunResult(("198.51.100.1", 3478), ("203.0.113.1", 1))]).mapping == "unknown"


def test_lan_bonus_only_for_advertised_addresses():
    # A hairpinning router forwards a LAN peer's pings from its own LAN address; that source must not
    # tie with the peer's own advertised LAN address, or the first pong would keep traffic on the NAT.
    own = P.ScoredPath(("192.168.6.3", 41000), 0.0010)
    hairpin = P.ScoredPath(("192.168.6.1", 41000), 0.0010, advertised=False)
    assert P.better_path(own, hairpin)
    assert not P.better_path(hairpin, own)


def test_note_activity_says_when_the_peer_wakes_up():
    pp = PeerPaths(b"k" * 32, _rb())
    assert pp.note_activity(10.0) is True          # idle until now: the owner must poll
    assert pp.note_activity(11.0) is False and pp.last_activity == 11.0
    assert pp.note_activity(11.0 + P.SESSION_ACTIVE_TIMEOUT) is True


def test_a_ping_source_becomes_a_candidate_only_after_it_answers_from_there():
    """Issue 10 item 15: a sealed ping from an address we do not know earns a pong and one verification
    ping; the address is no candidate and no path until a pong comes back from that very address."""
    pp = PeerPaths(b"k" * 32, _rb())
    pp.note_activity(0.0)
    src = ("203.0.113.77", 9)
    pp.on_ping(b"p" * 12, src, None, 0.0)
    assert src not in pp.candidates and pp.endpoint(0.0) is None
    out = pp.poll(0.0, 0.0, None)
    [verify] = [a for a in out if isinstance(a, SendPing)]
    assert verify.addr == src
    # more pings from it within the second: no more verification pings, still no candidate
    for i in range(5):
        pp.on_ping(bytes([i]) * 12, src, None, 0.1 * i)
    assert not [a for a in pp.poll(0.5, 0.5, None) if isinstance(a, SendPing)] and src not in pp.candidates
    # the txid answered from elsewhere (someone who saw our ping) proves nothing about src
    assert not pp.on_pong(verify.txid, 0.6, None, ("198.51.100.5", 9))
    assert src not in pp.candidates and pp.endpoint(0.6) is None
    assert pp.on_pong(verify.txid, 0.7, None, src)
    assert pp.candidates[src].source == "ping" and pp.endpoint(0.7) == (src, None)


def test_unverified_ping_sources_are_bounded():
    pp = PeerPaths(b"k" * 32, _rb())
    pp.note_activity(0.0)
    for i in range(100):
        pp.on_ping(bytes([i]) * 12, (f"203.0.113.{i + 1}", 9), None, 0.0)
    pings = [a for a in pp.poll(0.0, 0.0, None) if isinstance(a, SendPing)]
    assert len(pings) == 4 and not pp.candidates


def _answer(pp, addr, now):
    """Poll, and answer the ping sent to `addr` (the peer is reachable there)."""
    pings = [a for a in pp.poll(now, now, None) if isinstance(a, SendPing) and a.addr == addr]
    assert pings, f"no ping to {addr}"
    assert pp.on_pong(pings[0].txid, now + 0.001, pings[0].via, addr)


def test_the_peers_old_address_leaves_once_its_new_one_answers():
    """A peer that moved networks: its directory entry lists the new address only. The old one was our path, so it
    stays until another address answers, and then leaves (before: listed beside the new one until the next
    directory change)."""
    old, new = ("10.62.0.2", 5000), ("10.62.1.2", 5000)
    pp = PeerPaths(b"k" * 32, _rb())
    pp.note_activity(0.0)
    pp.set_candidates("directory", [old], 0.0)
    _answer(pp, old, 0.0)
    assert pp.endpoint(0.1)[0] == old
    pp.set_candidates("directory", [new], 1.0)  # the switch: the old address no longer listed
    assert set(pp.candidates) == {old, new} and pp.endpoint(1.0)[0] == old  # still our path meanwhile
    _answer(pp, new, 1.0)  # within the old path's trust: the withdrawn path gives way all the same
    assert set(pp.candidates) == {new} and pp.endpoint(1.1)[0] == new
    # listed again before another address answers: not withdrawn any more, our trusted path stays and so does it
    pp = PeerPaths(b"k" * 32, _rb())
    pp.note_activity(0.0)
    pp.set_candidates("directory", [old], 0.0)
    _answer(pp, old, 0.0)
    pp.set_candidates("directory", [new], 1.0)
    pp.set_candidates("directory", [old, new], 1.0)
    assert not pp.candidates[old].withdrawn and set(pp.candidates) == {old, new} and pp.endpoint(1.1)[0] == old


def test_a_withdrawn_path_that_stops_answering_leaves_too():
    """The peer's new address does not answer us (no route to it): its old one still leaves the candidates once it
    is withdrawn and not answering, at once when it was already untrusted."""
    old, new = ("10.62.0.2", 5000), ("10.62.1.2", 5000)
    pp = PeerPaths(b"k" * 32, _rb())
    pp.note_activity(0.0)
    pp.set_candidates("directory", [old], 0.0)
    _answer(pp, old, 0.0)
    pp.set_candidates("directory", [new], 1.0)
    assert old in pp.candidates
    pp.poll(4.0, 4.0, None)
    assert old in pp.candidates  # trusted until 4.5 s after its pong
    pp.poll(5.0, 5.0, None)
    assert set(pp.candidates) == {new}
    # already untrusted when withdrawn: gone with the directory change itself
    pp = PeerPaths(b"k" * 32, _rb())
    pp.note_activity(0.0)
    pp.set_candidates("directory", [old], 0.0)
    _answer(pp, old, 0.0)
    pp.set_candidates("directory", [new], 10.0)
    assert set(pp.candidates) == {new}


def test_a_ping_from_a_candidate_we_just_pinged_is_pinged_back_at_once():
    """A coordinated punch: both sides ping at once; ours reaches the peer's NAT before the peer's own ping has
    opened it and is dropped. The peer's ping arriving here proves its NAT now lets us in: we ping back at once,
    not at the next probe round (5 s; it took 2 s in the lab once the agent stopped ticking every 0.1 s). Still at
    most one ping back a second per candidate."""
    peer = ("198.51.100.10", 51160)
    pp = PeerPaths(b"k" * 32, _rb())
    pp.set_candidates("directory", [peer], 0.0)
    pp.on_punch(0.0)
    [first] = [a for a in pp.poll(0.0, 0.0, None) if isinstance(a, SendPing)]   # lost at the peer's NAT
    assert first.addr == peer
    pp.on_ping(b"p" * 12, peer, None, 0.004)
    back = [a for a in pp.poll(0.004, 0.004, None) if isinstance(a, SendPing)]
    assert [a.addr for a in back] == [peer]
    assert pp.on_pong(back[0].txid, 0.010, None, peer) and pp.endpoint(0.010) == (peer, None)
    pp2 = PeerPaths(b"k" * 32, _rb())
    pp2.set_candidates("directory", [peer], 0.0)
    pp2.on_punch(0.0)
    pp2.poll(0.0, 0.0, None)
    for i in range(5):   # the peer's pings within the second, none of ours answered: one ping back
        pp2.on_ping(bytes([i]) * 12, peer, None, 0.004 + 0.1 * i)
    assert len([a for a in pp2.poll(0.5, 0.5, None) if isinstance(a, SendPing)]) == 1

import random

from meshwg.disco import paths as P
from meshwg.disco.netcheck import ADM, APDM, EIM, FilteringTests, StunResult, classify
from meshwg.disco.peer_paths import MAX_CANDIDATES, PEER_PING_RATE, PeerPaths, SendPing, valid_candidate

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
                ("240.0.0.1", 5), ("fe80::1", 5), ("x", 5), ("1.2.3.4", 70000), ("1.2.3.4",), "a", None]:
        assert not valid_candidate(bad), bad


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
    assert max(per_second.values()) <= PEER_PING_RATE + 20   # burst + rate in the first second
    assert len(sent) <= 20 + 60 * PEER_PING_RATE
    assert len({a.addr for _, a in sent}) <= MAX_CANDIDATES


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

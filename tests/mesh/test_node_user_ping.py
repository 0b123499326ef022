"""`meshwg ping` in the node (MeshNode.user_ping) over the simulated network, on explicit time: which paths get a
ping, which pong answers, the relay's answer, the timeout, and that path selection moves no more than for any pong.
Latencies: 10 ms a direct hop, 40 ms a relay hop (mesh_sim's defaults)."""

from __future__ import annotations

import pytest

from meshwg.disco import user_ping as UP
from meshwg.mesh.node import PathChanged, RelayEndpoint
from mesh_sim import Sim


def public_pair(**kw) -> Sim:
    """Two hosts with public addresses (no NAT): a direct path works at once."""
    sim = Sim(**kw)
    sim.add_host("a", lan_ip="198.51.100.10", mesh_ip="100.64.0.1")
    sim.add_host("b", lan_ip="198.51.100.20", mesh_ip="100.64.0.2")
    sim.join_all(with_nat=False)
    return sim


def key(sim: Sim, name: str) -> bytes:
    return sim.hosts[name].node.public_key


def user_ping(sim: Sim, ref: int, timeout: float = 5.0, src: str = "a", dst: str = "b") -> list:
    """Send user ping `ref` from src to dst; the datagrams' destinations."""
    node = sim.hosts[src].node
    node.user_ping(ref, key(sim, dst), sim.now, timeout)
    out = node.datagrams_to_send()
    for data, dest in out:
        sim.send(sim.hosts[src], data, dest)
    return [dest for _, dest in out]


def done(sim: Sim, name: str = "a") -> list:
    return [(t, e) for t, e in sim.hosts[name].events if isinstance(e, UP.UserPingDone)]


def test_every_candidate_and_the_relay_get_one_ping_and_the_direct_pong_answers_first():
    sim = public_pair()
    sim.run(1.0)
    dests = user_ping(sim, 1)
    assert dests == [("198.51.100.20", 41641), RelayEndpoint(key(sim, "b"))]
    sim.run(2.0)
    [(t, ev)] = done(sim)
    assert ev.ref == 1 and ev.peer_key == key(sim, "b") and ev.path == ("198.51.100.20", 41641)
    assert ev.rtt == pytest.approx(0.020) and t == pytest.approx(1.020)


def test_candidates_of_every_source_are_pinged():
    sim = public_pair()
    pp = sim.hosts["a"].node.paths[key(sim, "b")]
    pp.set_candidates("cmm", [("192.0.2.7", 5000)], 0.0)
    dests = user_ping(sim, 1)
    assert set(dests) == {("198.51.100.20", 41641), ("192.0.2.7", 5000), RelayEndpoint(key(sim, "b"))}
    assert len(dests) == 3


def test_relay_answers_when_the_direct_path_is_cut():
    sim = public_pair()
    sim.blocked.add(frozenset(("a", "b")))
    user_ping(sim, 4)
    sim.run(1.0)
    [(t, ev)] = done(sim)
    assert ev.path == UP.RELAY and ev.rtt == pytest.approx(0.080)
    c = sim.hosts["b"].node.counters
    assert c["recv_disco_ping_relay"] == 1 and c["send_disco_pong_relay"] == 1


def test_no_answer_times_out_at_the_deadline():
    sim = public_pair()
    sim.blocked.add(frozenset(("a", "b")))
    sim.relay_up = False
    user_ping(sim, 2, timeout=3.0)
    sim.run(2.9)
    assert done(sim) == []
    sim.run(3.1)
    [(t, ev)] = done(sim)
    assert ev == UP.UserPingDone(2, key(sim, "b"), None, None) and t == pytest.approx(3.0)


def test_a_relay_pong_moves_no_path_and_the_peer_stays_idle():
    sim = public_pair()
    sim.blocked.add(frozenset(("a", "b")))
    pp = sim.hosts["a"].node.paths[key(sim, "b")]
    user_ping(sim, 1)
    sim.run(1.0)
    assert done(sim)[0][1].path == UP.RELAY
    assert pp.best is None and not sim.is_direct("a", "b")
    assert not pp.active(sim.now) and pp.probe_attempt == 0   # a user ping is no traffic: no probe rounds
    moves = [e for _, e in sim.hosts["a"].events if isinstance(e, PathChanged)]
    assert [e.reason for e in moves] == ["relay until a direct path answers"]   # the first one, at the netmap


def test_a_direct_pong_counts_for_the_path_as_any_pong_does():
    """The user's direct pong confirms the candidate exactly as a probe's pong would (same RTT sample, same trust);
    the relay's pong on the same ping changes nothing more."""
    sim = public_pair()
    pp = sim.hosts["a"].node.paths[key(sim, "b")]
    user_ping(sim, 1)
    sim.run(1.0)
    cand = pp.candidates[("198.51.100.20", 41641)]
    assert cand.last_pong == pytest.approx(0.020) and cand.latency == pytest.approx(0.020)
    assert pp.best.addr == ("198.51.100.20", 41641) and sim.is_direct("a", "b")
    c = sim.hosts["a"].node.counters
    assert c["recv_disco_pong"] == 1 and c["recv_disco_pong_user"] == 1
    assert c["ignore_disco_pong_via_relay"] == 1       # the relay's later pong: the ping was answered


def test_relay_pings_are_answered_at_the_pong_rate():
    """A peer that floods pings through the relay gets at most the per-peer pong burst (20) back at once."""
    sim = public_pair()
    sim.blocked.add(frozenset(("a", "b")))
    sim.relay_up = True
    a = sim.hosts["a"].node
    for ref in range(8):
        user_ping(sim, ref)
    # more than the bound in flight: refused by the caller's check
    assert a.user_pings.full()
    with pytest.raises(ValueError):
        a.user_ping(99, key(sim, "b"), sim.now, 5.0)
    b = sim.hosts["b"].node
    wall = sim.now + b.wall_offset
    from meshwg.disco.messages import Ping
    for i in range(40):
        b.receive_relay(a.public_key, a.codec.seal(b.public_key, Ping(i.to_bytes(12, "big"), a.public_key), wall),
                        sim.now)
    assert b.counters["send_disco_pong_relay"] == 20


def test_user_pings_keep_the_per_address_probe_bound():
    """40 user pings within a second to an address that never answers: at most the burst of 30 reach it."""
    sim = public_pair()
    sim.blocked.add(frozenset(("a", "b")))
    sim.relay_up = False
    a = sim.hosts["a"].node
    sent = 0
    for i in range(40):
        now = 1.0 + i * 0.01
        a.user_ping(i, key(sim, "b"), now, 0.005)
        sent += sum(1 for _, d in a.datagrams_to_send() if d == ("198.51.100.20", 41641))
        a.handle_timer(now + 0.005)
    assert sent <= 30 and a.counters["limit_probe_addr"] + a.counters["limit_probe_ip"] >= 10

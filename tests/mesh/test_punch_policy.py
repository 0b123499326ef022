"""The agent's punch and candidate-report decisions on explicit time (meshwg/mesh/punch_policy.py).

The rules, from the agent's documented behaviour: a relayed peer is punched when its traffic starts and
every 30 s while it stays active and relayed; a peer whose candidates appear or change, or that comes
online, is punched; at most one request per peer a second (a server-started punch counts), at most 20 a
second over all peers (the rest wait, they are not lost); never a peer that is gone, offline or direct.
"""

from __future__ import annotations

from meshwg.disco import netcheck as NC
from meshwg.mesh.punch_policy import CandidateReport, PathState, PunchPolicy, local_candidates

A, B = b"A" * 32, b"B" * 32
RELAYED, DIRECT, IDLE = PathState(True, False), PathState(True, True), PathState(False, False)
CANDS = (("198.51.100.1", 4000, "stun"),)


def everyone_online(key: bytes) -> bool:
    return True


def tick(p: PunchPolicy, now: float, paths: dict, online=everyone_online, connected: bool = True) -> list:
    return sorted(p.tick(now, connected, paths, online))


# ---- traffic over the relay ----------------------------------------------------------------------
def test_relayed_peer_punched_when_its_traffic_starts_then_every_30s():
    p = PunchPolicy()
    assert tick(p, 0.0, {A: IDLE}) == []
    assert tick(p, 1.0, {A: RELAYED}) == [A]
    asked = [t / 10 for t in range(11, 400) if tick(p, t / 10, {A: RELAYED})]
    assert asked == [31.0]


def test_traffic_starting_again_is_punched_again_after_a_second():
    p = PunchPolicy()
    assert tick(p, 0.0, {A: RELAYED}) == [A]
    assert tick(p, 0.5, {A: IDLE}) == []
    assert tick(p, 0.6, {A: RELAYED}) == []      # became active again, but within the 1 s per peer
    assert tick(p, 0.7, {A: IDLE}) == []
    assert tick(p, 1.1, {A: RELAYED}) == [A]


def test_direct_or_idle_peers_are_not_punched():
    p = PunchPolicy()
    for t in range(0, 100):
        assert tick(p, float(t), {A: DIRECT, B: IDLE}) == []


def test_a_path_that_goes_relayed_while_active_waits_for_the_30s():
    """Active since it was direct: falling back to the relay is no new activity (the agent's behaviour)."""
    p = PunchPolicy()
    assert tick(p, 0.0, {A: DIRECT}) == []
    assert tick(p, 5.0, {A: RELAYED}) == [A]    # never asked before: the 30 s since -inf have passed
    assert tick(p, 6.0, {A: DIRECT}) == []
    assert tick(p, 20.0, {A: RELAYED}) == []
    assert tick(p, 35.0, {A: RELAYED}) == [A]


# ---- directory changes -----------------------------------------------------------------------------
def test_new_peer_with_candidates_is_punched_even_without_traffic():
    p = PunchPolicy()
    p.peer_changed(A, True, CANDS, None)
    assert tick(p, 0.0, {A: IDLE}) == [A]
    assert tick(p, 0.1, {A: IDLE}) == []         # asked once, not on every tick


def test_only_online_peers_with_new_candidates_are_punched():
    p = PunchPolicy()
    p.peer_changed(A, False, CANDS, None)        # offline
    p.peer_changed(B, True, (), None)            # no candidates
    assert tick(p, 0.0, {A: IDLE, B: IDLE}) == []
    p.peer_changed(A, True, CANDS, (True, CANDS))  # nothing new
    assert tick(p, 5.0, {A: IDLE, B: IDLE}) == []
    p.peer_changed(A, True, CANDS, (False, CANDS))  # came online
    assert tick(p, 10.0, {A: IDLE, B: IDLE}) == [A]
    p.peer_changed(A, True, (("198.51.100.1", 4001, "stun"),), (True, CANDS))  # candidates changed
    assert tick(p, 20.0, {A: IDLE, B: IDLE}) == [A]


def test_offline_or_direct_peer_in_the_directory_is_not_punched():
    p = PunchPolicy()
    p.peer_changed(A, True, CANDS, None)
    p.peer_changed(B, True, CANDS, None)
    assert tick(p, 0.0, {A: IDLE, B: DIRECT}, online=lambda k: k != A) == []


def test_peer_removed_meanwhile_is_not_asked_for():
    p = PunchPolicy()
    p.peer_changed(A, True, CANDS, None)
    assert tick(p, 0.0, {}) == []                # the node has no paths for it any more
    assert tick(p, 1.0, {A: IDLE}) == []         # and the stale request is not kept
    p.peer_changed(B, True, CANDS, None)
    p.peer_removed(B)
    assert tick(p, 2.0, {B: IDLE}) == []


def test_a_removed_and_readded_peer_starts_afresh():
    p = PunchPolicy()
    assert tick(p, 0.0, {A: RELAYED}) == [A]
    p.peer_removed(A)
    assert tick(p, 0.1, {}) == []
    p.peer_changed(A, True, CANDS, None)
    assert tick(p, 0.2, {A: RELAYED}) == [A]     # a new peer: the old one's second does not hold it back


# ---- rates -----------------------------------------------------------------------------------------
def test_one_request_per_peer_a_second():
    p = PunchPolicy()
    p.peer_changed(A, True, CANDS, None)
    assert tick(p, 0.0, {A: IDLE}) == [A]
    p.peer_changed(A, True, CANDS, (False, CANDS))
    assert tick(p, 0.9, {A: IDLE}) == []
    p.peer_changed(A, True, CANDS, (False, CANDS))
    assert tick(p, 1.0, {A: IDLE}) == [A]


def test_a_punch_the_server_started_counts_for_the_second():
    p = PunchPolicy()
    p.punched(A, 10.0)
    assert tick(p, 10.5, {A: RELAYED}) == []
    p.peer_changed(A, True, CANDS, (False, CANDS))
    assert tick(p, 10.9, {A: RELAYED}) == []
    p.peer_changed(A, True, CANDS, (False, CANDS))
    assert tick(p, 11.0, {A: RELAYED}) == [A]


def test_global_budget_20_a_second_and_the_rest_wait():
    p = PunchPolicy()
    keys = [bytes([i]) * 32 for i in range(50)]
    paths = {k: IDLE for k in keys}
    for k in keys:
        p.peer_changed(k, True, CANDS, None)
    first = tick(p, 0.0, paths)
    assert len(first) == 20
    assert tick(p, 0.0, paths) == []             # the budget is spent, nothing is lost
    second = tick(p, 0.5, paths)                 # half a second refills 10
    assert len(second) == 10
    later = [k for t in (1.0, 1.5) for k in tick(p, t, paths)]
    assert sorted(first + second + later) == sorted(keys)
    assert tick(p, 10.0, paths) == []            # each asked exactly once


def test_nothing_while_disconnected_and_pending_ones_kept():
    p = PunchPolicy()
    p.peer_changed(A, True, CANDS, None)
    assert tick(p, 0.0, {A: RELAYED, B: RELAYED}, connected=False) == []
    assert tick(p, 5.0, {A: RELAYED, B: RELAYED}) == [A, B]


# ---- candidates ------------------------------------------------------------------------------------
def test_candidates_reflexive_first_with_the_nat_kind_then_local_without_duplicates():
    refl = (("203.0.113.7", 51820),)
    iface = (("192.168.1.2", 51820), ("203.0.113.7", 51820))
    assert local_candidates(refl, iface, NC.EIM) == [("203.0.113.7", 51820, "stun-eim"),
                                                     ("192.168.1.2", 51820, "local")]
    assert local_candidates(refl, (), NC.EDM) == [("203.0.113.7", 51820, "stun-edm")]
    assert local_candidates(refl, (), None) == [("203.0.113.7", 51820, "stun")]


def test_candidates_capped_at_16():
    iface = tuple((f"10.0.0.{i}", 1) for i in range(40))
    assert len(local_candidates((("203.0.113.7", 1),), iface, None)) == 16


def test_candidate_report_only_when_changed_and_connected():
    r = CandidateReport()
    c1 = [("203.0.113.7", 1, "stun")]
    assert not r.due(c1, connected=False)
    assert r.due(c1, connected=True)
    assert r.due(c1, connected=True)             # not taken by the server: still due
    r.accepted(c1)
    assert not r.due(list(c1), connected=True)
    c2 = c1 + [("10.0.0.1", 1, "local")]
    assert r.due(c2, connected=True)

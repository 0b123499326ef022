"""`meshwg ping`'s bookkeeping (meshwg/disco/user_ping.py) on explicit time: targets, pong matching, timeouts, the
bound on pings in flight."""

from __future__ import annotations

import itertools
import math
import os

import pytest

from meshwg.disco import user_ping as UP
from meshwg.disco.peer_paths import Candidate

A, B = b"A" * 32, b"B" * 32
D1, D2 = (("198.51.100.1", 41641), None), (("10.0.0.2", 41641), None)


def counter_bytes():
    n = itertools.count(1)
    return lambda k: next(n).to_bytes(k, "big")


def test_every_candidate_and_the_relay_are_targets():
    cands = [Candidate(("198.51.100.1", 41641), "stun"), Candidate(("10.0.0.2", 41641), "local", via=3)]
    assert UP.ping_targets(cands) == [(("198.51.100.1", 41641), None), (("10.0.0.2", 41641), 3), UP.RELAY]
    assert UP.ping_targets([]) == [UP.RELAY]


def test_first_pong_answers_with_its_path_and_rtt_then_the_others_match_nothing():
    up = UP.UserPings(counter_bytes())
    pairs = dict((t, x) for x, t in up.start(1, A, [D1, D2, UP.RELAY], 10.0, 5.0))
    assert len(pairs) == 3 and len(set(pairs.values())) == 3 and all(len(x) == 12 for x in pairs.values())
    done = up.answer(A, pairs[UP.RELAY], UP.RELAY, 10.004)
    assert done == UP.UserPingDone(1, A, UP.RELAY, pytest.approx(0.004))
    assert up.answer(A, pairs[D1], D1, 10.005) is None       # second answer: the ping is over
    assert len(up) == 0 and up.deadline() == math.inf


def test_direct_answer_names_the_address():
    up = UP.UserPings(counter_bytes())
    pairs = dict((t, x) for x, t in up.start(7, A, [D1, UP.RELAY], 0.0, 5.0))
    done = up.answer(A, pairs[D1], D1, 0.0013)
    assert done.path == ("198.51.100.1", 41641) and done.rtt == pytest.approx(0.0013) and done.ref == 7


def test_a_pong_by_another_path_or_from_another_peer_or_with_a_guessed_txid_matches_nothing():
    up = UP.UserPings(lambda n: os.urandom(n))
    pairs = dict((t, x) for x, t in up.start(1, A, [D1, D2, UP.RELAY], 0.0, 5.0))
    assert up.answer(A, pairs[D1], D2, 0.1) is None           # D1's txid coming back from D2
    assert up.answer(A, pairs[D1], UP.RELAY, 0.1) is None     # ... or through the relay
    assert up.answer(A, pairs[D1], (D1[0], 2), 0.1) is None   # ... or on another socket
    assert up.answer(B, pairs[D1], D1, 0.1) is None           # another peer answering A's ping
    assert up.answer(A, b"\0" * 12, UP.RELAY, 0.1) is None    # a guessed txid
    assert len(up) == 1
    assert up.answer(A, pairs[D2], D2, 0.2).path == D2[0]     # the real answer still counts


def test_txids_are_the_random_sources():
    seen = []

    def rb(n):
        b = os.urandom(n)
        seen.append(b)
        return b
    up = UP.UserPings(rb)
    assert [x for x, _ in up.start(1, A, [D1, UP.RELAY], 0.0, 5.0)] == seen


def test_no_answer_times_out_at_the_deadline():
    up = UP.UserPings(counter_bytes())
    pairs = dict((t, x) for x, t in up.start(3, A, [D1, UP.RELAY], 100.0, 2.0))
    assert up.deadline() == 102.0
    assert up.expire(101.99) == []
    assert up.expire(102.0) == [UP.UserPingDone(3, A, None, None)]
    assert up.answer(A, pairs[D1], D1, 102.01) is None        # a late pong answers nothing
    assert len(up) == 0


def test_at_most_eight_in_flight_and_misuse_raises():
    up = UP.UserPings(counter_bytes())
    for ref in range(8):
        up.start(ref, A, [UP.RELAY], 0.0, 5.0)
    assert up.full()
    with pytest.raises(ValueError):
        up.start(99, A, [UP.RELAY], 0.0, 5.0)
    up.expire(5.0)
    assert not up.full()
    up.start(1, A, [UP.RELAY], 6.0, 5.0)
    with pytest.raises(ValueError):
        up.start(1, A, [UP.RELAY], 6.0, 5.0)                  # a ref in flight
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            up.start(2, A, [UP.RELAY], 6.0, bad)

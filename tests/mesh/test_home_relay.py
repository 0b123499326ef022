"""Home relay choice on explicit time and latencies (issue 14.3, meshwg.mesh.relay_policy.HomePolicy)."""

from __future__ import annotations

from meshwg.mesh.relay_policy import HomePolicy


def measured(rtts: dict, now: float = 0.0) -> HomePolicy:
    p = HomePolicy(list(rtts))
    for r in p.probes_due(now):
        p.probed(r, now)
    for r, rtt in rtts.items():
        if rtt is not None:
            p.answered(r, rtt)
    return p


def test_the_nearest_relay_becomes_home():
    p = measured({"main": 0.080, "eu": 0.010, "us": 0.040})
    assert p.choose(0.1) == "eu" and p.home == "eu"
    assert p.choose(0.2) is None


def test_a_relay_only_a_little_nearer_does_not_take_home():
    p = measured({"main": 0.010, "eu": 0.009})
    assert p.choose(0.1) is None and p.home == "main"
    p = measured({"main": 0.050, "eu": 0.020})
    assert p.choose(0.1) == "eu"
    p = measured({"main": 0.010, "eu": 0.006})   # 40% nearer but only 4 ms: stays
    assert p.choose(0.1) is None


def test_home_waits_for_its_own_first_answer_before_moving_to_a_farther_relay():
    p = measured({"main": None, "eu": 0.030})
    assert p.choose(0.5) is None and p.home == "main"
    assert p.choose(1.7) == "eu"   # main left its probe unanswered for more than 1.6 s


def test_a_home_relay_that_stops_answering_loses_home_within_2s_to_the_next_nearest():
    p = measured({"main": 0.040, "eu": 0.010, "us": 0.020})
    assert p.choose(0.1) == "eu"
    p.traffic(0.1)
    t, moved_at = 0.1, None
    while t < 10 and moved_at is None:  # eu dies at 0.1: its probes go unanswered; the others keep answering
        for r in p.probes_due(t):
            p.probed(r, t)
            if r != "eu":
                p.answered(r, {"main": 0.040, "us": 0.020}[r])
        if p.choose(t) is not None:
            moved_at = t
        t = round(t + 0.05, 2)
    assert p.home == "us" and moved_at is not None and moved_at - 0.1 <= 2.0


def test_nothing_answering_moves_nothing():
    p = measured({"main": 0.040, "eu": 0.010})
    assert p.choose(0.1) == "eu"
    for t in (0.5, 1.0, 5.0, 30.0):
        for r in p.probes_due(t):
            p.probed(r, t)
    assert p.choose(30.0) is None and p.home == "eu"


def test_home_is_probed_every_half_second_while_traffic_flows_else_every_25s():
    p = measured({"main": 0.01, "eu": 0.05})
    assert p.probes_due(0.4) == []
    assert p.next_deadline(0.0) == 10.0   # idle: the others' 10 s, home's 25 s
    p.traffic(0.0)
    assert p.next_deadline(0.0) == 0.5 and p.probes_due(0.5) == ["main"]
    assert p.probes_due(10.0) == ["main", "eu"]


def test_one_slow_answer_does_not_move_home():
    p = measured({"main": 0.004, "eu": 0.003})
    assert p.choose(0.1) is None
    p.answered("main", 0.050)   # a slow moment on a loaded host
    assert p.choose(0.2) is None and p.home == "main"


def test_a_home_relay_down_with_no_other_answering_leaves_no_deadline_in_the_past():
    # Review (issue 14.3): the home's "down at" deadline stayed in the past once it had passed while nothing else
    # answered (own UDP cut: the node stays), so the relay shell's loop, which sleeps until next_deadline, spun.
    p = HomePolicy(["main", "eu"])
    for r in p.probes_due(0.0):
        p.probed(r, 0.0)
    for now in (1.6, 2.0, 5.0, 9.9):
        assert p.choose(now) is None          # nothing answers: stay
        assert p.next_deadline(now) > now     # a wake-up later, not a busy loop now
        for r in p.probes_due(now):
            p.probed(r, now)

"""The relay transport policy on explicit time: UDP and TCP raced, whichever works carries the sends, UDP
preferred and taken back when it answers, TCP retried with backoff, a relay restart.

A small driver plays the shell: it ticks the policy at its deadlines and records what it was told to do.
"""

from __future__ import annotations

import math

import pytest

from meshwg.mesh import relay_policy as P


class Shell:
    """Stands in for meshwg.io.agent.relay_shell: a session timed as RelaySession is (an unanswered first hello
    retried every 2 s, a ready session re-helloed every 25 s and at its expiry), a relay that answers UDP
    hellos at once while `udp_works`, and a log of the policy's actions with their times."""

    def __init__(self, has_tcp: bool | int = True):
        self.p = P.RelayPolicy()
        self.now = 0.0
        self.log: list[tuple[float, object]] = []
        self.has_tcp = has_tcp
        self.udp_works = False
        self.configure()

    @property
    def session_hello_at(self) -> float:
        if not self.token:
            return self.last_hello + 2.0
        return min(self.last_hello + 25.0, self.ready_until)

    def configure(self):
        # A new session says hello at once (the shell does that itself).
        self.token, self.ready_until = False, 0.0
        self.p.configured(self.now, self.has_tcp)
        self.p.udp_hello_sent(self.now)
        self.log.append((self.now, "hello"))
        self.hello_went_out()

    def hello_went_out(self):
        self.last_hello = self.now
        if self.udp_works:
            self.udp_answers()  # the HELLO_OK comes back (at once, on this time scale)

    def run_until(self, t: float):
        """Tick at every deadline up to t (at most 10,000 ticks: a policy that spins fails here)."""
        for _ in range(10_000):
            d = self.p.next_deadline(self.now, self.session_hello_at)
            if d > t:
                self.now = t
                return
            self.now = max(self.now, d)
            for a in self.p.tick(self.now, self.session_hello_at):
                self.log.append((self.now, a))
                if isinstance(a, P.HelloUdp):
                    self.hello_went_out()
        raise AssertionError("the policy asks to be ticked without end")

    def udp_answers(self, ttl: float = 90.0):
        """A HELLO_OK over UDP; from now on every UDP hello is answered."""
        self.udp_works, self.token, self.ready_until = True, True, self.now + ttl
        self.p.udp_ready(self.now, self.ready_until)

    def opens(self):
        return [(t, a) for t, a in self.log if isinstance(a, P.OpenTcp)]

    def closes(self):
        return [(t, a) for t, a in self.log if isinstance(a, P.CloseTcp)]

    def hellos(self):
        return [t for t, a in self.log if a == "hello" or isinstance(a, P.HelloUdp)]


def on_tcp() -> tuple[Shell, P.OpenTcp]:
    """UDP blocked: the TCP relay opened at ~0.3 s and ready at 0.4 s."""
    sh = Shell()
    sh.run_until(0.4)
    [(_, op)] = sh.opens()
    sh.p.tcp_ready(0.4, op.attempt)
    return sh, op


def test_udp_works_no_tcp_ever_opened():
    sh = Shell()
    sh.now = 0.02
    sh.udp_answers()
    assert sh.p.transport(sh.now) == P.UDP
    sh.run_until(300.0)
    assert sh.opens() == []
    assert sh.p.transport(sh.now) == P.UDP
    # the session's periodic re-hellos keep going (every 25 s here), nothing more often
    assert sh.hellos()[:3] == [0.0, 25.0, 50.0]


def test_no_answer_before_the_session_is_ready_sends_nothing_anywhere():
    sh = Shell()
    assert sh.p.transport(0.0) is None
    sh.run_until(0.29)
    assert sh.opens() == [] and sh.p.transport(sh.now) is None


def test_udp_blocked_tcp_opened_at_a_third_of_a_second_and_carries_the_sends():
    sh = Shell()
    sh.run_until(1.0)
    [(t, op)] = sh.opens()
    assert 0.25 <= t <= 0.35                          # the issue: TCP after ~0.3 s without a UDP answer
    assert sh.p.transport(sh.now) is None             # connecting: sends wait
    sh.p.tcp_ready(0.36, op.attempt)
    assert sh.p.transport(0.36) == P.TCP
    sh.run_until(120.0)
    assert len(sh.opens()) == 1 and sh.closes() == []
    # UDP is still tried, but only now and then while TCP carries the traffic: the 2 s retries stop
    later = [t for t in sh.hellos() if t > 0.36]
    assert later and all(b - a >= 19.9 for a, b in zip([0.0] + later, later))
    assert sh.p.transport(sh.now) == P.TCP


def test_without_tcp_addresses_nothing_is_opened():
    sh = Shell(has_tcp=False)
    sh.run_until(30.0)
    assert sh.opens() == []
    assert sh.hellos() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0]


def test_udp_comes_back_while_on_tcp_sends_move_back_and_tcp_closes_after_a_grace():
    sh, op = on_tcp()
    sh.run_until(30.0)
    assert sh.p.transport(sh.now) == P.TCP
    sh.udp_answers()                                  # the 20 s UDP retry got its HELLO_OK
    assert sh.p.transport(sh.now) == P.UDP            # at once
    sh.run_until(30.5)
    assert sh.closes() == []                          # in-flight TCP deliveries are still read
    sh.run_until(40.0)
    [(t, close)] = sh.closes()
    assert 30.5 < t <= 35.0 and close.attempt == op.attempt
    sh.p.tcp_lost(t + 0.01, op.attempt, 0.5)          # the closed connection reports its end: ignored
    sh.run_until(300.0)
    assert len(sh.opens()) == 1 and sh.p.transport(sh.now) == P.UDP


def test_udp_lapsing_again_during_the_grace_keeps_tcp():
    sh, op = on_tcp()
    sh.run_until(20.0)
    sh.udp_answers(ttl=0.5)                           # a session that lapses at once (say, an expiry)
    sh.run_until(25.0)
    assert sh.closes() == [] and sh.p.transport(sh.now) == P.TCP


def test_slow_udp_answer_after_tcp_opened_udp_takes_the_binding_back():
    """UDP answered while TCP was connecting; TCP's HELLO then rebound us at the relay: a UDP hello at once
    takes the binding back, sends stay on UDP, and TCP closes after the grace."""
    sh = Shell()
    sh.run_until(0.35)
    [(_, op)] = sh.opens()
    sh.now = 0.4
    sh.udp_answers()
    n = len(sh.hellos())
    sh.now = 0.45
    sh.p.tcp_ready(0.45, op.attempt)
    assert sh.p.transport(0.45) == P.UDP
    sh.run_until(0.45)
    assert len(sh.hellos()) == n + 1 and sh.hellos()[-1] == 0.45
    sh.run_until(10.0)
    assert len(sh.closes()) == 1 and sh.closes()[0][0] <= 5.0


def test_tcp_fails_too_retried_with_growing_backoff():
    sh = Shell()
    for _ in range(8):
        sh.run_until(sh.now + 60.0 if not sh.opens() else sh.now)
        t, op = sh.opens()[-1]
        sh.now = t + 0.05
        sh.p.tcp_failed(sh.now, op.attempt, 0.5)      # rand01 0.5: no jitter
        sh.run_until(sh.now + 60.0)
        if len(sh.opens()) > 8:
            break
    starts = [t for t, _ in sh.opens()]
    gaps = [b - (a + 0.05) for a, b in zip(starts, starts[1:])]
    assert gaps[0] == pytest.approx(0.5, abs=0.01)
    assert all(b >= a - 1e-9 for a, b in zip(gaps, gaps[1:]))  # growing ...
    assert gaps[3] >= 3.0                                    # ... exponentially ...
    assert max(gaps) <= 12.0                                 # ... up to ~10 s (a relay back soon is used soon)
    assert sh.p.transport(sh.now) is None


def test_tcp_backoff_is_jittered():
    a, b = P.RelayPolicy(), P.RelayPolicy()
    for p, r in ((a, 0.0), (b, 0.99)):
        p.configured(0.0, True)
        p.udp_hello_sent(0.0)
        [op] = [x for x in p.tick(0.3, math.inf) if isinstance(x, P.OpenTcp)]
        p.tcp_failed(1.0, op.attempt, r)
    assert a.next_deadline(1.0, math.inf) < b.next_deadline(1.0, math.inf)


def test_udp_answer_stops_tcp_retries():
    sh = Shell()
    sh.run_until(0.5)
    [(t, op)] = sh.opens()
    sh.p.tcp_failed(0.6, op.attempt, 0.5)
    sh.now = 0.7
    sh.udp_answers()
    sh.run_until(120.0)
    assert len(sh.opens()) == 1 and sh.p.transport(sh.now) == P.UDP


def test_tcp_lost_while_udp_silent_reconnects():
    sh, op = on_tcp()
    sh.run_until(100.0)
    sh.p.tcp_lost(100.0, op.attempt, 0.5)             # after a long session: a fresh backoff
    assert sh.p.transport(100.0) is None
    sh.run_until(102.0)
    [_, (t, op2)] = sh.opens()
    assert 100.0 < t <= 101.0 and op2.attempt != op.attempt
    sh.p.tcp_ready(t + 0.01, op.attempt)              # a stale attempt's outcome changes nothing
    assert sh.p.transport(t + 0.01) is None
    sh.p.tcp_ready(t + 0.02, op2.attempt)
    assert sh.p.transport(t + 0.02) == P.TCP


def test_relay_restart_on_tcp():
    """The relay restarts: the TCP connection drops, reconnecting fails while it is down (backing off), the
    control channel's return starts a new session (configured), and the race starts over at once."""
    sh, op = on_tcp()
    sh.run_until(50.0)
    sh.p.tcp_lost(50.0, op.attempt, 0.5)
    for _ in range(4):                                # the relay is down: each attempt fails
        sh.run_until(sh.now + 30.0)
        t, opn = sh.opens()[-1]
        sh.now = t + 0.01
        sh.p.tcp_failed(sh.now, opn.attempt, 0.5)
    assert len(sh.opens()) == 5
    backoff_until = sh.p.next_deadline(sh.now, math.inf)
    assert backoff_until >= sh.now + 3.0
    sh.now += 0.1
    sh.configure()                                    # the server is back
    assert sh.p.transport(sh.now) is None             # the old sessions are gone: sends wait
    restart = sh.now
    sh.run_until(restart + 0.35)
    assert len(sh.opens()) == 6                       # not held back by the old backoff
    t, opn = sh.opens()[-1]
    assert restart + 0.25 <= t <= restart + 0.35
    sh.p.tcp_ready(t + 0.01, opn.attempt)
    assert sh.p.transport(t + 0.01) == P.TCP


def test_relay_restart_on_udp():
    sh = Shell()
    sh.now = 0.01
    sh.udp_answers()
    sh.run_until(40.0)
    sh.udp_works = False                              # the restarted relay answers a moment later
    sh.configure()                                    # a new session: UDP not ready until its HELLO_OK
    assert sh.p.transport(40.0) is None
    sh.now = 40.01
    sh.udp_answers()
    sh.run_until(200.0)
    assert sh.opens() == [] and sh.p.transport(sh.now) == P.UDP


def test_udp_expiry_without_answer_races_tcp():
    """A UDP session whose re-hellos go unanswered (UDP blocked mid-way) races TCP as soon as it lapses."""
    sh = Shell()
    sh.now = 0.01
    sh.udp_answers(ttl=90.0)
    sh.udp_works = False                              # from now on UDP is dropped: re-hellos go unanswered
    sh.run_until(89.0)
    assert sh.opens() == [] and sh.hellos() == [0.0, 25.0, 50.0, 75.0]
    sh.run_until(91.0)
    assert sh.hellos()[-1] == pytest.approx(90.01)     # at the expiry
    [(t, _)] = sh.opens()
    assert 90.25 <= t <= 90.35


def test_peer_fallback_hellos_at_most_once_a_second():
    p = P.RelayPolicy()
    p.configured(0.0, False)
    asked = [t / 10 for t in range(0, 35) if p.peer_fell_back(t / 10)]
    assert asked == [0.0, 1.0, 2.0, 3.0]


# ---- several TCP relay addresses (issue 15: e.g. 7301 and 443, which port-based firewalls let out) --------------

def test_second_tcp_address_tried_a_quarter_second_after_a_silent_first_and_the_winner_kept():
    """A firewall that drops SYNs to 7301: 443 is tried 0.25 s later, not after a connect timeout."""
    sh = Shell(has_tcp=2)
    sh.run_until(0.6)
    (t1, first), (t2, second) = sh.opens()
    assert (first.index, second.index) == (0, 1)
    assert 0.25 <= t1 <= 0.35 and 0.2 <= t2 - t1 <= 0.3   # literals: not a connect timeout (seconds)
    sh.p.tcp_ready(0.62, second.attempt)
    assert sh.p.transport(0.62) == P.TCP and sh.p.tcp_current(second.attempt)
    sh.run_until(0.63)
    [(_, close)] = sh.closes()
    assert close == P.CloseTcp(first.attempt, superseded=True)   # the silent attempt is given up
    sh.p.tcp_failed(5.3, first.attempt, 0.5)                        # its late timeout changes nothing
    assert sh.p.transport(5.3) == P.TCP and len(sh.opens()) == 2


def test_refused_tcp_address_moves_to_the_next_at_once_and_a_round_starts_with_what_worked():
    sh = Shell(has_tcp=3)
    sh.run_until(0.31)
    [(t1, a)] = sh.opens()
    sh.p.tcp_failed(t1 + 0.01, a.attempt, 0.5)                      # connection refused
    sh.run_until(t1 + 0.011)
    (_, b) = sh.opens()[1]
    assert b.index == 1 and sh.opens()[1][0] == t1 + 0.01           # at once, not 0.25 s later
    sh.p.tcp_ready(t1 + 0.02, b.attempt)
    sh.p.tcp_lost(t1 + 20.0, b.attempt, 0.0)                        # the session ends, UDP still silent
    sh.run_until(t1 + 22.0)
    assert sh.opens()[2][1].index == 1                              # the address that worked first


def test_every_tcp_address_failing_backs_off_then_retries_the_round():
    sh = Shell(has_tcp=2)
    sh.run_until(0.31)
    [(t1, a)] = sh.opens()
    sh.p.tcp_failed(t1 + 0.01, a.attempt, 0.5)
    sh.run_until(t1 + 0.02)
    [_, (_, b)] = sh.opens()
    sh.p.tcp_failed(t1 + 0.03, b.attempt, 0.5)
    sh.run_until(t1 + 0.2)
    assert len(sh.opens()) == 2                                     # both failed: no spinning
    sh.run_until(t1 + 5.0)
    (t3, c) = sh.opens()[2]
    assert t3 - (t1 + 0.03) >= 0.2 and c.index == 0                 # after the backoff, from the first again


def test_udp_answer_during_a_round_stops_trying_further_addresses():
    sh = Shell(has_tcp=3)
    sh.run_until(0.31)
    [(t1, a)] = sh.opens()
    sh.udp_answers()
    sh.p.tcp_failed(t1 + 0.1, a.attempt, 0.5)
    sh.run_until(60.0)
    assert len(sh.opens()) == 1 and sh.p.transport(sh.now) == P.UDP

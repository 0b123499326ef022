"""Discovery bounds that a hostile or chatty peer runs into (issue 18): pongs per peer, and the sender's
clock in both directions. Bounds are literals (the design's numbers), never the constants under test."""

from __future__ import annotations

import random

from nacl.public import PrivateKey

from meshwg.disco.messages import DiscoCodec, Ping, Pong
from meshwg.disco.peer_paths import PeerPaths, SendPong

WALL = 1_700_000_000.0
SRC = ("203.0.113.9", 41641)


def _rb(seed=1):
    r = random.Random(seed)
    return lambda n: r.getrandbits(8 * n).to_bytes(n, "big")


def _pongs(pp: PeerPaths, now: float) -> int:
    return sum(isinstance(a, SendPong) for a in pp.poll(now, WALL + now, None))


def test_pongs_to_one_peer_are_limited():
    """A peer pinging us 1,000 times a second for 10 s (each ping sealed and fresh, so each passed the
    codec) gets at most 20 pongs a second after a burst of 20: we are no reflector for it."""
    pp = PeerPaths(b"k" * 32, _rb())
    pp.set_candidates("directory", [SRC], 0.0)
    per_second = [0] * 10
    for i in range(10_000):
        now = i / 1000
        pp.on_ping(i.to_bytes(12, "big"), SRC, None, now)
        per_second[int(now)] += _pongs(pp, now)
    assert per_second[0] <= 20 + 20
    assert all(n <= 21 for n in per_second[1:]), per_second   # 20 a second (+1: a refill at the boundary)
    assert sum(per_second) <= 20 + 10 * 20
    assert per_second[0] >= 20 and min(per_second[1:]) >= 19   # the honest share is still answered
    assert pp.counters["limit_pong_rate"] >= 10_000 - (20 + 10 * 20)


def test_a_slow_pinger_gets_every_pong():
    pp = PeerPaths(b"k" * 32, _rb())
    pp.set_candidates("directory", [SRC], 0.0)
    got = 0
    for i in range(600):   # 10 a second for a minute: half the budget
        pp.on_ping(i.to_bytes(12, "big"), SRC, None, i / 10)
        got += _pongs(pp, i / 10)
    assert got == 600


def _pair():
    a = DiscoCodec(bytes(PrivateKey(_rb(1)(32))), _rb(3))
    b = DiscoCodec(bytes(PrivateKey(_rb(2)(32))), _rb(4))
    a.add_peer(b.public_key)
    b.add_peer(a.public_key)
    return a, b


def test_far_future_timestamps_are_refused():
    """The sender's wall clock may be off by up to 120 s either way (messages.py's contract); a message
    stamped an hour (or a day) ahead is refused like one an hour old, and counted as stale. Accepting
    it would let a captured message outlive the replay cache, which remembers it only 120 s past its stamp."""
    a, b = _pair()
    for ahead in (3600.0, 86_400.0, 121.0):
        msg = a.seal(b.public_key, Ping(b"f" * 12, a.public_key), WALL + ahead)
        before = b.drops["disco_stale"]
        assert b.open_untrusted(msg, WALL) is None, ahead
        assert b.drops["disco_stale"] == before + 1
    # within the window either way it is accepted
    for skew in (-119.0, -60.0, 60.0, 119.0):
        msg = a.seal(b.public_key, Pong(b"p" * 12, SRC), WALL + skew)
        assert b.open_untrusted(msg, WALL) == (a.public_key, Pong(b"p" * 12, SRC)), skew
    assert sum(b.drops.values()) == 3


def test_a_future_message_cannot_be_replayed_once_its_window_passes():
    """A ping stamped 100 s ahead is accepted once; replayed any time later it is refused (while the
    cache holds it as a replay, after that as stale), never accepted twice."""
    a, b = _pair()
    msg = a.seal(b.public_key, Ping(b"r" * 12, a.public_key), WALL + 100)
    assert b.open_untrusted(msg, WALL) is not None
    for later in (1.0, 100.0, 219.0, 221.0, 400.0, 3600.0):
        assert b.open_untrusted(msg, WALL + later) is None, later
    assert b.drops["disco_replay"] + b.drops["disco_stale"] == 6

"""The replay window against a naive model (issue 18 item 3: mutants of replay.py that the vector tests let
through). The model is the specification itself: a counter is accepted once, if it is below the limit and
no more than 8128 behind the highest accepted (RFC 6479 as wireguard-go replay/replay.go: window (128 - 1) x 64)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshwg.wg.replay import ReplayWindow

WINDOW = 8128
BLOCK = 64
RING = 128 * BLOCK  # the ring of 128 blocks of 64 bits


class NaiveWindow:
    def __init__(self, limit: int):
        self.limit = limit
        self.seen: set[int] = set()
        self.last = 0

    def validate(self, counter: int) -> bool:
        if counter >= self.limit or counter in self.seen or self.last - counter > WINDOW:
            return False
        self.seen.add(counter)
        self.last = max(self.last, counter)
        return True


# Steps relative to the highest counter so far: small moves either way, moves across the window's edge,
# jumps of whole rings (the block a counter lands in was last used a ring ago) and very long jumps.
step = st.one_of(
    st.integers(-70, 70),
    st.integers(-WINDOW - 70, -WINDOW + 70),
    st.builds(lambda k, j: k * BLOCK + j, st.integers(1, 130), st.integers(-2, 2)),
    st.builds(lambda k, j: k * RING + j, st.integers(1, 3), st.integers(-65, 65)),
    st.integers(2**20, 2**40),
)


@settings(max_examples=300)
@given(st.lists(st.one_of(step.map(lambda d: ("move", d)), st.integers(0, 10**6).map(lambda i: ("replay", i))),
                min_size=1, max_size=60))
def test_replay_window_matches_the_naive_model(steps):
    window, model = ReplayWindow(), NaiveWindow(2**64 - 2**13 - 1)
    for kind, x in steps:
        if kind == "move":
            counter = max(0, model.last + x)
        elif model.seen:  # a counter already accepted, sent again
            counter = sorted(model.seen)[x % len(model.seen)]
        else:
            counter = x
        assert window.validate(counter) is model.validate(counter), (counter, model.last)


def test_a_step_into_the_next_block_keeps_the_recent_blocks():
    w = ReplayWindow()
    for c in (640, 600, 10 * 64 - 1):  # block 10, 9, 9
        assert w.validate(c)
    assert w.validate(11 * 64)  # one block on: only block 11's slot is cleared
    for c in (640, 600, 10 * 64 - 1):
        assert not w.validate(c), c


def test_the_oldest_counter_in_the_window_stays_seen():
    # 0 is exactly 8128 behind 8128: still inside the window, in the slot a ring jump would reuse next.
    w = ReplayWindow()
    assert w.validate(0)
    assert w.validate(WINDOW)
    assert not w.validate(0)
    assert w.validate(WINDOW + 1) and not w.validate(0)


def test_a_jump_of_exactly_one_ring_clears_the_reused_block():
    # Counter 5 and counter 5 + 128*64 share a slot of the ring; the jump must clear it, not see a replay.
    w = ReplayWindow()
    assert w.validate(5)
    assert w.validate(5 + RING)
    assert not w.validate(5 + RING)
    w = ReplayWindow()
    assert w.validate(BLOCK + 3)  # block 1
    assert w.validate(BLOCK + 3 + RING)  # block 129, the same slot
    assert w.validate(BLOCK + 2 + RING) and w.validate(BLOCK + 4 + RING)


def test_every_block_between_is_cleared_on_a_forward_jump():
    w = ReplayWindow()
    for c in range(0, RING, 7):
        assert w.validate(c)
    # Jump so that every slot but one is reused: each counter a ring later is fresh.
    top = RING + RING - 1
    assert w.validate(top)
    for c in range(top - WINDOW, top, 7):
        assert w.validate(c), c
        assert not w.validate(c), c

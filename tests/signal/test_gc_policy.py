"""The server's garbage-collection policy (signal_server/gc_policy.py, issue 14 item 4): what survived a full
collection is frozen (later full collections skip it), and unfrozen once enough sessions ended, so their cycles are
collected after all."""

from __future__ import annotations

import gc
import weakref

import pytest

from signal_server import gc_policy


@pytest.fixture
def fresh():
    p = gc_policy.FreezePolicy()
    gc.callbacks.append(p._callback)
    yield p
    gc.callbacks.remove(p._callback)
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_survivors_of_a_full_collection_are_frozen(fresh):
    gc.collect()
    fresh.tick(1000)
    assert gc.get_freeze_count() > 0
    assert fresh.live_at_freeze == 1000


def test_ended_sessions_are_unfrozen_and_their_cycles_collected(fresh):
    c = _Cycle()
    ref = weakref.ref(c)
    gc.collect()
    fresh.tick(1000)
    del c
    gc.collect()
    assert ref() is not None  # frozen: not collected yet
    fresh.tick(1000)
    for _ in range(249):  # fewer than a quarter of the 1,000 alive at the freeze (and fewer than 256)
        fresh.session_ended()
    assert gc.get_freeze_count() > 0
    for _ in range(7):
        fresh.session_ended()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None

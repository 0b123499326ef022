"""RelayShell with relays in regions (issue 14.3) whose relays all stop answering (the node's own UDP is cut): the
home stays, and the shell's loop sleeps until its next deadline instead of spinning (review finding: the home's
"down at" time stayed the loop's deadline once past, a busy loop for as long as nothing answered)."""

from __future__ import annotations

import os
import time

import trio

from meshwg.control.events import RelayInfo
from meshwg.io.agent.relay_shell import RelayShell


async def test_the_shell_loop_does_not_spin_while_no_relay_answers():
    sent = []
    sh = RelayShell(os.urandom(32), udp_send=lambda data, addr: sent.append(addr) or True,
                    deliver=lambda src, pkt: None, after_rx=None, clock=time.monotonic, random_bytes=os.urandom)
    sh.configure_regions([RelayInfo("main", os.urandom(32), (("192.0.2.1", 3478),), ()),
                          RelayInfo("eu", os.urandom(32), (("192.0.2.2", 3478),), ())], os.urandom(72))
    rounds = []
    probe = sh._probe
    sh._probe = lambda now: (rounds.append(now), probe(now))
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(sh.run)
            await trio.sleep(2.6)   # the home (main) is down after 1.6 s without an answer; eu never answers
            n.cancel_scope.cancel()
    assert sh.home_region == "main"
    late = [t for t in rounds if t >= rounds[0] + 1.8]
    # Its deadlines: a HELLO retry every 2 s, the home's PING every 0.5 s: a few wake-ups, not thousands.
    assert len(late) < 50, len(late)

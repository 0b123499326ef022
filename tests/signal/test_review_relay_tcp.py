"""Review (hostile relay client) of the TCP relay's compiled path: one connection's flood of frames for RelayCore
must not starve the other connections' frames for RelayCore (the C worker's queue to Python is shared)."""

from __future__ import annotations

import pytest
import trio
from sig_helpers import start_server
from test_relay_tcp_fast import close_all, count, nodes, warm_up

from meshwg.io.dataplane.fastio import fastio
from meshwg.signaling import relay_wire as W

pytestmark = pytest.mark.skipif(fastio is None, reason="needs _fastio")


async def test_one_connections_junk_flood_does_not_starve_another_connections_hello(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    (a, b, c), conns = await nodes(h, "ttu")
    await warm_up([a, b], c)
    junk = b"\x00\x00" * 32768   # 32768 empty frames: each one left for RelayCore (drop_bad_frame)
    stop = trio.Event()

    async def flood():
        while not stop.is_set():
            await a.stream.send_all(junk)

    async with trio.open_nursery() as n:
        n.start_soon(flood)
        with trio.fail_after(10):
            while count(h, "drop_relay_queue_full") == 0:   # the shared queue is full now
                await trio.sleep(0.01)
        answered = 0
        for _ in range(5):   # b's re-HELLOs (RelayCore answers them) while a floods
            await b.hello()
            answered += 1
        stop.set()
    assert answered == 5
    await close_all(h, conns, (a, b))

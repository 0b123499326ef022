"""Fan-out of a directory change (issue 14 item 4) without a task wake per session: the flusher writes an idle
session's update to its socket itself (at 3,500 nodes the wakes, GC included, were two thirds of the server's CPU);
a session whose socket does not take it all is left to its writer (send timeout, slow-client close)."""

from __future__ import annotations

import msgpack
import trio
from sig_helpers import new_key, start_server

from meshwg.control import ControlConnection
from meshwg.signaling import protocol as P

N = 20


async def _mesh(h, n: int) -> list:
    return [await ControlConnection.open(h.invite(), new_key(), candidates=[("10.9.0.%d" % (i + 1), 5000, "local")])
            for i in range(n)]


async def _sees(conn, port: int) -> None:
    """Reads `conn` until a directory update lists a candidate on `port`."""
    while True:
        data = await conn.stream.receive_some(1 << 20)
        assert data
        for m in conn.chan.feed_untrusted(data):
            if m["type"] == P.T_DIR_UPDATE:
                for raw in m["upsert"]:
                    e = msgpack.unpackb(raw, raw=False)
                    if any(c[1] == port for c in e["cand"]):
                        return


async def test_one_change_reaches_idle_sessions_without_waking_their_writers(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, idle_timeout=60.0)  # these connections send no heartbeat
    conns = await _mesh(h, N)
    c = h.server.counters
    await trio.sleep(0.3)  # the joins' updates are out
    for x in conns:  # read what the joins sent (decrypted: the channel's nonces follow every message)
        with trio.move_on_after(0.05):
            while True:
                x.chan.feed_untrusted(await x.stream.receive_some(1 << 20))
    direct0 = c["control_updates_direct"]
    await conns[0].report_candidates([("192.0.2.1", 4242, "local")])
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            for x in conns[1:]:
                n.start_soon(_sees, x, 4242)
    assert c["control_updates_direct"] - direct0 >= N - 1
    for x in conns:
        await x.aclose()
    h.admin.close()


async def test_a_session_that_does_not_read_is_still_closed_as_slow(nursery, tmp_path):
    """The direct write never waits: what the socket does not take goes to the writer, whose send timeout
    closes a node that stopped reading (its update is not dropped, nor held beyond one message)."""
    h = await start_server(nursery, tmp_path, send_timeout=0.5, idle_timeout=60.0)
    slow = await ControlConnection.open(h.invite(), new_key())
    slow.stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    movers = await _mesh(h, 8)
    slow_key = next(k for k, s in h.server.sessions.items() if s.node_id == slow.welcome.node_id)
    port = 1000
    with trio.fail_after(30):
        while slow_key in h.server.sessions:
            for m in movers:  # 16 candidates each: about 600 bytes per entry, rewritten every round
                port += 1
                await m.report_candidates([("192.0.2.%d" % (i + 1), port, "local") for i in range(16)])
            for m in movers:  # the movers read theirs
                with trio.move_on_after(0):
                    m.chan.feed_untrusted(await m.stream.receive_some(1 << 20))
            await trio.sleep(0.01)
    assert h.server.counters["control_closed_slow_client"] >= 1
    s = h.server.sessions[next(iter(k for k in h.server.sessions))]
    assert len(s.backlog) < 1 << 20
    h.admin.close()

"""The signal server's UDP relay on its batched, compiled path (issue 16), on loopback: a batch mixing valid
SENDs, a token stolen by another source, junk and traffic over the per-node limit is counted reason by reason
and only the valid SENDs arrive; sessions the core ends stop at once; --relay-node-rate cuts a node to about it."""

from __future__ import annotations

import os

import trio
from relay_node import UdpRelayNode as Node
from sig_helpers import new_key, start_server, wait_until  # noqa: F401

from meshwg.control import ControlConnection
from meshwg.io.dataplane.fastio import fastio
from meshwg.token_bucket import TokenBucket
from meshwg.signaling import relay_wire as W
from signal_server import cli


async def pair(h):
    nodes, conns = [], []
    for _ in range(2):
        sk = new_key()
        conns.append(await ControlConnection.open(h.invite(), sk))
        nodes.append(await Node(sk, h.server.server_pk, h.udp).start())
    return nodes, conns


async def test_a_mixed_batch_is_counted_by_reason_and_only_valid_sends_arrive(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    relay = h.server.relay
    (a, b), conns = await pair(h)
    await a.send(b.pub, b"warm-up")  # the session's first SEND: confirmed in the core, then in the table
    assert await b.received() == [b"warm-up"]
    assert h.server.relay_udp.fast is not None and relay.fast_updates == []
    # The next SENDs: 10 pass, the rest are over (a refill of 0.001/s: no 11th however slow the run)
    relay.pkt_limit.rate, relay.pkt_limit.burst = 0.001, 10.0
    thief = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await thief.bind(("127.0.0.1", 0))
    h.server.relay_udp.fold_counters()   # the warm-up counted now: the periodic fold (0.5 s) may not have run yet
    before = dict(relay.counters)
    valid = [b"\x04" + bytes([i]) * 99 for i in range(10)]
    for i, p in enumerate(valid):
        await a.send(b.pub, p)
        if i == 2:
            await thief.sendto(a.rs.encode_send(b.pub, b"stolen"), h.udp)  # A's token, another source
            await a.sock.sendto(W.MAGIC + bytes([W.T_SEND]) + b"junk", h.udp)
            await a.sock.sendto(W.MAGIC + bytes([9]) + b"junk", h.udp)
    for _ in range(5):
        await a.send(b.pub, b"over the limit")
    assert await b.received() == valid
    h.server.relay_udp.fold_counters()
    delta = {k: relay.counters[k] - before.get(k, 0) for k in relay.counters}
    assert delta.get("forwarded_packets") == 10
    assert delta.get("refused_no_session") == 1 and delta.get("drop_bad_send") == 1
    assert delta.get("drop_bad_frame") == 1
    assert delta.get("drop_relay_node_limit") == 5 and delta.get("drop_rate_limited") == 5
    thief.close()
    for c in conns:
        await c.aclose()
    h.admin.close()


async def test_a_session_the_core_ends_is_not_forwarded_to_or_from_any_more(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    relay = h.server.relay
    (a, b), conns = await pair(h)
    await a.send(b.pub, b"one")
    await b.send(a.pub, b"back")
    assert await b.received() == [b"one"] and await a.received() == [b"back"]
    relay.drop_key(b.pub)  # as a node's removal or expiry does
    await a.send(b.pub, b"to b")
    await b.send(a.pub, b"from b")
    assert await b.received() == [] and await a.received() == []
    assert relay.counters["drop_peer_absent"] == 1 and relay.counters["refused_no_session"] == 1
    for c in conns:
        await c.aclose()
    h.admin.close()


async def test_the_relay_node_rate_flag_cuts_a_node_to_about_its_rate(nursery, tmp_path):
    """--relay-node-rate 2 (Mbit/s: 250 kB/s, burst 2 s): ~1.2 MB offered in 1 s arrives as ~750 kB."""
    args = cli.build_parser().parse_args(["relay", "--db", str(tmp_path / "x.db"), "--relay-node-rate", "2"])
    cfg = cli.server_config(args, False)
    assert cfg.relay_node_rate == 2.0
    h = await start_server(nursery, tmp_path, relay_node_rate=cfg.relay_node_rate)
    (a, b), conns = await pair(h)
    packet = b"\x04" + os.urandom(1199)
    got = 0

    async def count():
        nonlocal got
        got += len(await b.received(quiet=0.5))

    async with trio.open_nursery() as n:
        n.start_soon(count)
        t_end = trio.current_time() + 1.0
        while trio.current_time() < t_end:
            for _ in range(10):
                await a.send(b.pub, packet)
            await trio.sleep(0.01)
    delivered = got * len(packet)
    assert 500_000 <= delivered <= 900_000, delivered  # 500 kB burst + 250 kB/s for 1 s
    assert h.server.relay.counters["drop_relay_node_limit"] > 0
    for c in conns:
        await c.aclose()
    h.admin.close()


async def test_sends_the_core_forwards_itself_spend_the_same_per_node_budget(nursery, tmp_path):
    """One budget per node whichever path its SENDs take: 6 SENDs forwarded in C, then (the destination gone
    from the compiled table, as a scoped address or a full table leaves it) the core forwards the rest, out of
    the 4 left of a burst of 10, not out of a fresh one."""
    h = await start_server(nursery, tmp_path)
    relay, fast = h.server.relay, h.server.relay_udp.fast
    (a, b), conns = await pair(h)
    await a.send(b.pub, b"warm-up")
    assert await b.received() == [b"warm-up"]
    relay.pkt_limit.rate, relay.pkt_limit.burst = 0.01, 10.0
    for i in range(6):
        await a.send(b.pub, b"c%d" % i)
    assert len(await b.received()) == 6
    fastio.relay_remove(fast.table, b.pub)  # B's RECVs now come from the core's own forwarding
    for i in range(10):
        await a.send(b.pub, b"p%d" % i)
    got = await b.received()
    assert len(got) == 4, len(got)
    for c in conns:
        await c.aclose()
    h.admin.close()


async def test_traffic_split_across_both_paths_stays_within_one_total_limit(nursery, tmp_path):
    """One total budget whichever path the SENDs take: a total burst of 1000 bytes, 600 of it forwarded in C,
    then (the destination gone from the compiled table) the core forwards only the 400 left, not 1000 more."""
    h = await start_server(nursery, tmp_path)
    relay, fast = h.server.relay, h.server.relay_udp.fast
    (a, b), conns = await pair(h)
    await a.send(b.pub, b"warm-up")
    assert await b.received() == [b"warm-up"]
    relay.total_limit = TokenBucket(0.01, 1000.0)
    for i in range(6):
        await a.send(b.pub, b"c" * 100)
    assert len(await b.received()) == 6
    fastio.relay_remove(fast.table, b.pub)  # B's RECVs now come from the core's own forwarding
    for i in range(10):
        await a.send(b.pub, b"p" * 100)
    got = await b.received()
    assert len(got) == 4, len(got)
    assert relay.counters["drop_relay_total_limit"] == 6
    for c in conns:
        await c.aclose()
    h.admin.close()


async def test_metrics_count_what_the_c_thread_forwarded_up_to_the_moment_they_are_read(nursery, tmp_path):
    """/metrics (and status, which reads them) fold the forwarding thread's counters when read, not only every
    FOLD_INTERVAL (0.5 s): seen as "the server forwarded more than the capture saw" in the port-restricted lab,
    whose counter read before its capture missed packets the C thread had forwarded but not yet folded."""
    from signal_server.metrics import parse_text

    h = await start_server(nursery, tmp_path)
    (a, b), conns = await pair(h)
    await a.send(b.pub, b"warm-up")
    assert await b.received() == [b"warm-up"]
    fast = h.server.relay_udp.fast
    fold = fast.fold_counters
    fold()
    before = parse_text(h.server.render_metrics())["meshwg_signal_forwarded_packets_total"]
    fast.fold_counters = lambda: None   # no periodic or per-batch fold while the packets go through
    for i in range(5):
        await a.send(b.pub, bytes([4, i]) * 50)
    assert len(await b.received()) == 5
    fast.fold_counters = fold           # no checkpoint from here: only the read itself can fold
    after = parse_text(h.server.render_metrics())["meshwg_signal_forwarded_packets_total"]
    assert after - before == 5
    for c in conns:
        await c.aclose()
    h.admin.close()

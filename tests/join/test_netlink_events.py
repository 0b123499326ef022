"""Local address changes from the kernel's netlink events (issue 15: not `ip` every 10 s): a burst of address and
link events gives one re-read, 0.2 s after the burst (meshwg.mesh.debounce), on trio's mock clock; messages are
fed through a socketpair in the kernel's format. The real kernel's events: tests/join/test_local_addr_events_lab.py."""

from __future__ import annotations

import socket
import struct

import trio

from meshwg.io.agent import local_links
from meshwg.io.oscfg import netlink_events as NE
from meshwg.mesh.debounce import Debounce

RTM_NEWROUTE = 24


def nlmsg(kind: int, payload: bytes = b"\0" * 8) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0) + payload


def test_debounce_coalesces_a_burst_into_one_action_after_it_goes_quiet():
    d = Debounce()
    for t in (0.0, 0.05, 0.1, 0.15):            # link down, address gone, link up, address added
        d.event(t)
        assert not d.due(t)
    assert not d.due(0.34)
    assert d.due(0.35) and not d.due(0.36)       # once, 0.2 s after the last event
    assert d.deadline() == float("inf")


def test_debounce_acts_within_half_a_second_of_a_burst_that_never_ends():
    d = Debounce()
    fired = []
    t = 0.0
    while t < 2.0:                               # an event every 0.1 s: never quiet for 0.2 s
        d.event(t)
        if d.due(t):
            fired.append(round(t, 2))
        t += 0.1
    assert fired and fired[0] <= 0.5 and len(fired) >= 3


def test_only_address_and_link_events_count_and_malformed_ones_never_raise():
    assert NE.concerns(nlmsg(NE.RTM_NEWADDR)) and NE.concerns(nlmsg(NE.RTM_DELLINK))
    assert NE.concerns(nlmsg(RTM_NEWROUTE) + nlmsg(NE.RTM_DELADDR))
    assert not NE.concerns(nlmsg(RTM_NEWROUTE))
    assert not NE.concerns(b"\xff" * 7) and not NE.concerns(struct.pack("=IHHII", 9999, 20, 0, 0, 0))


async def test_a_burst_of_events_gives_one_callback_a_fifth_of_a_second_later(autojump_clock):
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    calls: list[float] = []
    with ours, kernel:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(NE.watch, ours, lambda: calls.append(trio.current_time()))
            await trio.sleep(1.0)
            t0 = trio.current_time()
            for kind in (NE.RTM_DELLINK, NE.RTM_DELADDR, NE.RTM_NEWLINK, NE.RTM_NEWADDR, NE.RTM_NEWADDR):
                kernel.send(nlmsg(kind))
                await trio.sleep(0.03)
            await trio.sleep(2.0)
            assert len(calls) == 1, calls                        # one re-read for the whole burst
            assert 0.2 <= calls[0] - t0 <= 0.5
            kernel.send(nlmsg(RTM_NEWROUTE))                     # not an address or link event
            kernel.send(b"\x01\x02")                             # garbage
            await trio.sleep(2.0)
            assert len(calls) == 1
            kernel.send(nlmsg(NE.RTM_NEWADDR))                   # a later change: one more
            await trio.sleep(1.0)
            assert len(calls) == 2
            nursery.cancel_scope.cancel()


async def test_watch_changes_rereads_on_events_and_slowly_without_them(autojump_clock):
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    reads: list[float] = []

    async def reread():
        reads.append(trio.current_time())

    with kernel:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(local_links.watch_changes, reread, lambda: ours)
            await trio.sleep(5.0)
            kernel.send(nlmsg(NE.RTM_NEWADDR))
            await trio.sleep(1.0)
            assert len(reads) == 1 and 5.0 <= reads[0] <= 6.0   # at the event, not at a 10 s poll
            await trio.sleep(120.0)
            assert 2 <= len(reads) <= 4                          # the safety net: once a minute
            nursery.cancel_scope.cancel()
    assert ours.fileno() == -1                                   # the socket closed with the task


async def test_without_netlink_the_addresses_are_polled_every_ten_seconds(autojump_clock):
    reads: list[float] = []

    async def reread():
        reads.append(trio.current_time())

    with trio.move_on_after(35.0):
        await local_links.watch_changes(reread, lambda: None)
    assert len(reads) == 3


def rtmsg(family: int, dst: bytes, dst_len: int, table: int = 254) -> bytes:
    """An RTM_NEWROUTE payload as the kernel writes it: struct rtmsg, then RTA_DST (1) and RTA_TABLE (15)."""
    body = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, min(table, 255), 3, 0, 1, 0)
    attrs = b""
    for kind, value in ((1, dst), (15, struct.pack("=I", table))):
        attrs += struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)
    return body + attrs


def test_only_the_main_tables_default_routes_count_among_route_events():
    v4_default = nlmsg(RTM_NEWROUTE, rtmsg(socket.AF_INET, bytes(4), 0))
    v6_default = nlmsg(25, rtmsg(socket.AF_INET6, bytes(16), 0))               # RTM_DELROUTE
    assert NE.classify(v4_default) == (True, True) and NE.classify(v6_default) == (True, True)
    # An exit node's default route in its own table, the agent's routes to peers: no network switch.
    assert NE.classify(nlmsg(RTM_NEWROUTE, rtmsg(socket.AF_INET, bytes(4), 0, table=51820))) == (False, False)
    assert NE.classify(nlmsg(RTM_NEWROUTE, rtmsg(socket.AF_INET, bytes([100, 64, 0, 7]), 32))) == (False, False)
    assert NE.classify(nlmsg(NE.RTM_NEWADDR) + v4_default) == (True, True)
    assert NE.classify(nlmsg(NE.RTM_NEWADDR)) == (True, False)
    assert NE.classify(nlmsg(RTM_NEWROUTE, rtmsg(socket.AF_INET, bytes(4), 0)[:10])) == (False, False)  # cut short


async def test_a_default_route_event_rereads_then_says_so(autojump_clock):
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    calls: list[tuple[str, float]] = []

    async def reread():
        calls.append(("reread", trio.current_time()))

    async def routed():
        calls.append(("routed", trio.current_time()))

    with kernel:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(local_links.watch_changes, reread, lambda: ours, routed)
            await trio.sleep(5.0)
            kernel.send(nlmsg(RTM_NEWROUTE, rtmsg(socket.AF_INET, bytes(4), 0)))   # a metric swap: del + add
            kernel.send(nlmsg(25, rtmsg(socket.AF_INET, bytes(4), 0)))
            await trio.sleep(1.0)
            assert [c[0] for c in calls] == ["reread", "routed"] and 5.2 <= calls[0][1] <= 5.5   # once, debounced
            kernel.send(nlmsg(NE.RTM_NEWADDR))                                        # no route: a re-read only
            await trio.sleep(1.0)
            assert [c[0] for c in calls] == ["reread", "routed", "reread"]
            nursery.cancel_scope.cancel()

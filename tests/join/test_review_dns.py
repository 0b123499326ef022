"""Review (hostile network) of the node's DNS server: who may ask, and what one source can hold."""

from __future__ import annotations

import socket

import trio
from dns_helpers import free_port, serve, table, tcp_ask
from dnslib import DNSRecord

from meshwg.io.agent import dns_server as S
from meshwg.mesh import dns_names as D


def test_lan_source_routed_to_the_mesh_address_is_not_answered():
    """The server binds the mesh address only, but Linux (weak host model) delivers a LAN host's packet routed to
    that address through the node's LAN address: it must not learn the mesh's names, nor use the node as a
    reflector towards a spoofed outside address."""
    r = D.Resolver(table())
    q = DNSRecord.question("beta.mesh.internal").pack()
    assert S.answer_untrusted(r, q, "192.168.1.50", 0.0) is None
    assert S.answer_untrusted(r, q, "203.0.113.9", 0.0) is None
    assert r.counters["dns_drop_outside"] == 2 and r.counters["dns_queries"] == 0
    # a mesh member and the host itself (loopback) are answered
    assert DNSRecord.parse(S.answer_untrusted(r, q, "100.64.0.9", 0.0)).rr
    assert DNSRecord.parse(S.answer_untrusted(r, q, "127.0.0.1", 0.0)).rr


def test_outside_flood_does_not_fill_the_rate_table():
    """Dropped before the per-source buckets: a spoofed flood of outside sources charges nothing."""
    r = D.Resolver(table())
    for i in range(5000):
        r.admit(f"198.18.{i // 256}.{i % 256}", 0.0)
    assert len(r.limiter._buckets) == 0
    assert r.admit("100.64.0.9", 0.0) is not None


async def test_one_source_cannot_hold_every_tcp_connection():
    """One source opening many idle TCP connections must not lock every other client out of TCP DNS."""
    port = free_port()
    dns = S.DnsServer(port=port)
    hogs = []
    async with trio.open_nursery() as nursery:
        await serve(nursery, dns, table())
        for _ in range(40):
            s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            await s.bind(("127.0.0.5", 0))
            await s.connect(("127.0.0.1", port))
            hogs.append(s)
        with trio.fail_after(5):
            while dns._tcp_conns + dns.counters["dns_drop_tcp_conns"] < 40:
                await trio.sleep(0.01)
        reply = await tcp_ask("beta.mesh.internal", port, src="127.0.0.6")
        assert reply is not None and [str(x.rdata) for x in reply.rr] == ["100.64.0.2"]
        for s in hogs:
            s.close()
        nursery.cancel_scope.cancel()


async def test_tcp_trickle_does_not_hold_a_connection(monkeypatch):
    """A client that sends one byte now and then (slowloris) is closed a bounded time after it connected, not
    kept as long as it keeps trickling."""
    monkeypatch.setattr(S, "TCP_IDLE", 1.0)
    port = free_port()
    dns = S.DnsServer(port=port)
    async with trio.open_nursery() as nursery:
        await serve(nursery, dns, table())
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        closed_at = None
        start = trio.current_time()
        with trio.fail_after(6):
            await stream.send_all(b"\x00\x40")   # a 64-byte query announced, never completed
            while closed_at is None:
                await trio.sleep(0.3)
                try:
                    await stream.send_all(b"\x00")
                    with trio.move_on_after(0.01):
                        if await stream.receive_some(10) == b"":
                            closed_at = trio.current_time()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed_at = trio.current_time()
        assert closed_at - start < 2.5
        await stream.aclose()
        nursery.cancel_scope.cancel()

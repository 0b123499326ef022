"""meshwg.io.agent.dns_server (issue 15, names): the codec never raises on junk (dropped, counted), and the trio
server answers over UDP and TCP on loopback, rebinds when its addresses change, and relays a plain peer's other
queries to an upstream."""

from __future__ import annotations

import socket

import trio
from dns_helpers import free_port, serve, table, tcp_ask, udp_ask, wait_bound
from dnslib import RCODE, RR, A, DNSRecord
from hypothesis import given, settings, strategies as st

from meshwg.io.agent import dns_server as S
from meshwg.mesh import dns_names as D


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    r = D.Resolver(table())
    out = S.answer_untrusted(r, data, "100.64.0.9", 0.0)
    assert out is None or out == S.FORWARD or isinstance(out, bytes)


def test_junk_dropped_and_counted():
    r = D.Resolver(table())
    junk = [b"", b"\x00" * 5, b"\xff" * 40,
            b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c",     # a compression pointer loop
            b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fab"]       # a label past the end
    assert all(S.answer_untrusted(r, j, "100.64.0.9", 0.0) is None for j in junk)
    assert r.counters["dns_drop_malformed"] == len(junk)
    response = DNSRecord.question("beta.mesh.internal").reply().pack()     # a response: never answered (loops)
    assert S.answer_untrusted(r, response, "100.64.0.9", 0.0) is None and r.counters["dns_drop_response"] == 1
    assert S.answer_untrusted(r, b"x", "not an ip", 0.0) is None and r.counters["dns_drop_source"] == 1


def test_odd_queries():
    r = D.Resolver(table())
    two = DNSRecord.question("beta.mesh.internal")
    two.add_question(*DNSRecord.question("gamma.mesh.internal").questions)
    assert RCODE[DNSRecord.parse(S.answer_untrusted(r, two.pack(), "100.64.0.9", 0.0)).header.rcode] == "FORMERR"
    notify = DNSRecord.question("beta.mesh.internal")
    notify.header.opcode = 4
    assert RCODE[DNSRecord.parse(S.answer_untrusted(r, notify.pack(), "100.64.0.9", 0.0)).header.rcode] == "NOTIMP"
    chaos = DNSRecord.question("version.bind", "TXT", "CH")
    assert RCODE[DNSRecord.parse(S.answer_untrusted(r, chaos.pack(), "100.64.0.9", 0.0)).header.rcode] == "REFUSED"


def test_large_answers_truncated_for_udp():
    big = DNSRecord.question("beta.mesh.internal").reply()
    for _ in range(40):
        big.add_answer(RR("beta.mesh.internal", rdata=A("100.64.0.2")))
    out = DNSRecord.parse(S.truncated(big.pack()))
    assert out.header.tc == 1 and not out.rr and len(S.truncated(big.pack())) <= 512


async def test_serves_udp_and_tcp_and_rebinds():
    port = free_port()
    dns = S.DnsServer(port=port)
    async with trio.open_nursery() as nursery:
        await serve(nursery, dns, table())
        assert [str(x.rdata) for x in (await udp_ask("beta.mesh.internal", port)).rr] == ["100.64.0.2"]
        # two queries pipelined on one connection: both answered
        assert [str(x.rdata) for x in (await tcp_ask("Beta.Mesh.Internal", port, count=2)).rr] == ["100.64.0.2"]
        assert RCODE[(await udp_ask("example.com", port)).header.rcode] == "REFUSED"
        dns.update(table(), ("127.0.0.2",))   # our mesh address changed: served there, not on the old one
        await wait_bound(dns, ("127.0.0.2",))
        assert [str(x.rdata) for x in (await udp_ask("beta.mesh.internal", port, dst="127.0.0.2")).rr]
        dns.update(D.NameTable(), ("127.0.0.2",))   # names off: nothing bound
        await wait_bound(dns, ())
        assert dns.status()["counters"]["dns_queries"] == 5
        nursery.cancel_scope.cancel()


async def test_plain_peer_queries_outside_the_domain_relayed_upstream():
    port, up_port = free_port(), free_port()
    upstream = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await upstream.bind(("127.0.0.2", up_port))

    async def fake_upstream():
        with upstream:
            while True:
                data, src = await upstream.recvfrom(4096)
                q = DNSRecord.parse(data)
                reply = q.reply()
                reply.add_answer(RR(q.q.qname, rdata=A("192.0.2.80")))
                await upstream.sendto(reply.pack(), src)

    dns = S.DnsServer(port=port, upstreams=("127.0.0.2",))
    dns.upstream_port = up_port
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_upstream)
        await serve(nursery, dns, table(plain=("127.0.0.3",)))
        reply = await udp_ask("www.example.com", port, src="127.0.0.3")
        assert [str(x.rdata) for x in reply.rr] == ["192.0.2.80"]
        assert RCODE[(await udp_ask("www.example.com", port, src="127.0.0.4")).header.rcode] == "REFUSED"
        assert dns.resolver.counters["dns_forwarded"] == 1
        nursery.cancel_scope.cancel()

"""meshwg.io.agent.dns_server (issue 15, names): the codec never raises on junk (dropped, counted), and the trio
server answers over UDP and TCP on loopback, rebinds when its addresses change, and relays a plain peer's other
queries to an upstream."""

from __future__ import annotations

import ipaddress
import socket

import trio
from dnslib import RCODE, RR, A, DNSRecord
from hypothesis import given, settings, strategies as st

from meshwg.io.agent import dns_server as S
from meshwg.mesh import dns_names as D


def table(plain=()) -> D.NameTable:
    t = D.NameTable(domain="mesh.internal", prefixes=(ipaddress.ip_network("100.64.0.0/10"),))
    t.add("beta", "100.64.0.2", "fd7a::2")
    for ip in plain:
        t.add(f"plain{ip.split('.')[-1]}", ip, "", plain=True)
    return t


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


def free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 and 127.0.0.2, as the server binds both there (a UDP-only pick
    was sometimes a TCP port in use: the server then never bound, seen under load)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                for host in ("127.0.0.1", "127.0.0.2"):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        if (host, kind) == ("127.0.0.1", socket.SOCK_STREAM):
                            continue
                        with socket.socket(socket.AF_INET, kind) as other:
                            other.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


async def udp_ask(name, port, src="127.0.0.1", dst="127.0.0.1", qtype="A"):
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.bind((src, 0))
        q = DNSRecord.question(name, qtype)
        await s.sendto(q.pack(), (dst, port))
        with trio.fail_after(5):
            data = await s.recv(4096)
    return DNSRecord.parse(data)


def _messages(buf: bytes) -> list[bytes]:
    out = []
    while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
        n = int.from_bytes(buf[:2], "big")
        out.append(buf[2:2 + n])
        buf = buf[2 + n:]
    return out


async def tcp_ask(name, port):
    """Two queries pipelined on one connection: both answered."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        q = DNSRecord.question(name).pack()
        await stream.send_all((len(q).to_bytes(2, "big") + q) * 2)
        buf = b""
        with trio.fail_after(5):
            while len(_messages(buf)) < 2:
                buf += await stream.receive_some(4096)
    return DNSRecord.parse(_messages(buf)[1])


async def test_serves_udp_and_tcp_and_rebinds():
    port = free_port()
    dns = S.DnsServer(port=port)
    async with trio.open_nursery() as nursery:
        await nursery.start(dns.run)
        dns.update(table(), ("127.0.0.1",))
        with trio.fail_after(5):
            while dns.bound != ("127.0.0.1",):
                await trio.sleep(0.01)
        assert [str(x.rdata) for x in (await udp_ask("beta.mesh.internal", port)).rr] == ["100.64.0.2"]
        assert [str(x.rdata) for x in (await tcp_ask("Beta.Mesh.Internal", port)).rr] == ["100.64.0.2"]
        assert RCODE[(await udp_ask("example.com", port)).header.rcode] == "REFUSED"
        dns.update(table(), ("127.0.0.2",))   # our mesh address changed: served there, not on the old one
        with trio.fail_after(5):
            while dns.bound != ("127.0.0.2",):
                await trio.sleep(0.01)
        assert [str(x.rdata) for x in (await udp_ask("beta.mesh.internal", port, dst="127.0.0.2")).rr]
        dns.update(D.NameTable(), ("127.0.0.2",))   # names off: nothing bound
        with trio.fail_after(5):
            while dns.bound:
                await trio.sleep(0.01)
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
        await nursery.start(dns.run)
        dns.update(table(plain=("127.0.0.3",)), ("127.0.0.1",))
        with trio.fail_after(5):
            while not dns.bound:
                await trio.sleep(0.01)
        reply = await udp_ask("www.example.com", port, src="127.0.0.3")
        assert [str(x.rdata) for x in reply.rr] == ["192.0.2.80"]
        assert RCODE[(await udp_ask("www.example.com", port, src="127.0.0.4")).header.rcode] == "REFUSED"
        assert dns.resolver.counters["dns_forwarded"] == 1
        nursery.cancel_scope.cancel()

"""What the node's DNS server tests share (test_dns_server, test_review_dns): a name table, a port the server can
bind, a running server, and queries over UDP and TCP on loopback."""

from __future__ import annotations

import ipaddress
import socket

import trio
from dnslib import DNSRecord

from meshwg.io.agent import dns_server as S
from meshwg.mesh import dns_names as D


def table(plain=()) -> D.NameTable:
    """beta at 100.64.0.2 / fd7a::2, and a plain peer plainN at each address of `plain`."""
    t = D.NameTable(domain="mesh.internal", prefixes=(ipaddress.ip_network("100.64.0.0/10"),))
    t.add("beta", "100.64.0.2", "fd7a::2")
    for ip in plain:
        t.add(f"plain{ip.split('.')[-1]}", ip, "", plain=True)
    return t


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


async def wait_bound(dns: S.DnsServer, addrs=None) -> None:
    """Until the server is bound to exactly `addrs` (None: to anything; (): to nothing)."""
    with trio.fail_after(5):
        while (dns.bound != addrs) if addrs is not None else not dns.bound:
            await trio.sleep(0.01)


async def serve(nursery, dns: S.DnsServer, names: D.NameTable, addrs=("127.0.0.1",)) -> None:
    """Runs `dns` in the nursery, serving `names` on `addrs`, and waits until it is bound there."""
    await nursery.start(dns.run)
    dns.update(names, addrs)
    await wait_bound(dns, tuple(addrs))


async def udp_ask(name, port, src="127.0.0.1", dst="127.0.0.1", qtype="A"):
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.bind((src, 0))
        q = DNSRecord.question(name, qtype)
        await s.sendto(q.pack(), (dst, port))
        with trio.fail_after(5):
            data = await s.recv(4096)
    return DNSRecord.parse(data)


def messages(buf: bytes) -> list[bytes]:
    """The complete length-prefixed DNS messages at the start of a TCP stream's bytes."""
    out = []
    while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
        n = int.from_bytes(buf[:2], "big")
        out.append(buf[2:2 + n])
        buf = buf[2 + n:]
    return out


async def tcp_ask(name, port, src="127.0.0.1", count=1):
    """`count` queries for `name` pipelined on one connection from `src`: the last answer, or None when the
    server closed the connection first."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((src, 0))
    await sock.connect(("127.0.0.1", port))
    async with trio.SocketStream(sock) as stream:
        q = DNSRecord.question(name).pack()
        await stream.send_all((len(q).to_bytes(2, "big") + q) * count)
        buf = b""
        with trio.fail_after(5):
            while len(messages(buf)) < count:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return None
                buf += chunk
    return DNSRecord.parse(messages(buf)[count - 1])

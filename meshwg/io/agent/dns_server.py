"""The node's DNS server (issue 15, names): UDP and TCP port 53 on its mesh addresses. Every decision is
meshwg.mesh.dns_names.Resolver's; this shell parses and builds the wire format (answer_untrusted), binds, reads,
writes and relays plain peers' other queries.

The wire format is dnslib's: a well-kept, pure-Python codec with no dependencies, so the parsing of hostile bytes
is not ours to get wrong (its DNSError, and anything else it raises on junk, is a dropped, counted query).

    dns = DnsServer(upstreams=("192.0.2.53",))     # where plain peers' non-mesh queries go (the host's nameservers)
    nursery.start_soon(dns.run)
    dns.update(table, ("100.64.0.1", "fd7a::1"))    # after each directory change: the names, the addresses to bind

Bound on the mesh addresses only (IP_FREEBIND: the address may come a moment later, or be tentative in IPv6 DAD),
so nothing outside the tunnel and this host reaches it through a routed address. A bind that fails is logged and
tried again at the next update; the agent runs on without names.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import socket

import trio
from dnslib import AAAA, PTR, QTYPE, RR, SOA, A, DNSLabel, DNSRecord

from meshwg.mesh import dns_names as D

log = logging.getLogger("meshwg.dns")

PORT = 53
MAX_QUERY = 4096            # UDP read size; a query is far smaller (a larger datagram is truncated junk)
TCP_MAX_CONNS = 32          # open TCP connections at once (a client needs one at a time)...
TCP_MAX_PER_SOURCE = 4      # ...of them from one address (one source cannot lock the others out)
TCP_IDLE = 10.0             # a TCP connection without a complete query this long is closed (a trickle of
                            # partial bytes does not extend it)
FORWARD_TIMEOUT = 2.0       # per upstream, for a plain peer's forwarded query
FORWARD_MAX_INFLIGHT = 64   # forwarded queries waiting at once; more are dropped (and counted)
_FREEBIND = {socket.AF_INET: (socket.IPPROTO_IP, 15), socket.AF_INET6: (socket.IPPROTO_IPV6, 78)}  # IP(V6)_FREEBIND


_RDATA = {D.T_A: A, D.T_AAAA: AAAA, D.T_PTR: PTR}
FORWARD = D.FORWARD


def answer_untrusted(resolver: D.Resolver, data: bytes, source, now: float):
    """The answer's bytes to a query from `source`, FORWARD (relay `data` upstream), or None: dropped and counted
    (over the source's rate, not DNS, a response)."""
    src = resolver.admit(source, now)
    if src is None:
        return None
    try:
        query = DNSRecord.parse(data)
    except Exception:   # DNSError mostly, but dnslib raises other types on some junk: all mean "malformed"
        resolver.counters["dns_drop_malformed"] += 1
        return None
    if query.header.qr:   # a response (or a reflection of one): answering it could loop two servers
        resolver.counters["dns_drop_response"] += 1
        return None
    q = query.q
    out = resolver.decide(src, opcode=query.header.opcode, questions=len(query.questions),
                          labels=tuple(q.qname.label), qtype=q.qtype, qclass=q.qclass)
    if out == D.FORWARD:
        return FORWARD
    reply = query.reply(ra=0)
    reply.header.rcode = out.rcode
    domain = resolver.table.domain
    for qtype, value in out.records:
        rr = _soa(domain) if qtype == D.T_SOA else RR(q.qname, qtype, rdata=_RDATA[qtype](value), ttl=D.TTL)
        reply.add_answer(rr)
    if out.soa and domain:
        reply.add_auth(_soa(domain))
    return reply.pack()


def _soa(domain: str) -> RR:
    return RR(DNSLabel(domain), QTYPE.SOA, ttl=D.NEGATIVE_TTL,
              rdata=SOA(f"ns.{domain}", f"hostmaster.{domain}", (1, 3600, 600, 86400, D.NEGATIVE_TTL)))


def truncated(answer: bytes) -> bytes:
    """An answer that fits a UDP datagram without EDNS: as it is, or its header and question with TC set."""
    if len(answer) <= D.MAX_UDP_ANSWER:
        return answer
    rec = DNSRecord.parse(answer)
    short = DNSRecord(rec.header, q=rec.q)
    short.header.tc = 1
    return short.pack()


class DnsServer:
    def __init__(self, *, port: int = PORT, upstreams=(), clock=None) -> None:
        self.port = port
        self.upstreams = tuple(upstreams)
        self.upstream_port = PORT
        self.resolver = D.Resolver(forward=bool(self.upstreams))
        self.counters: collections.Counter = collections.Counter()
        self.addresses: tuple = ()      # what we are asked to bind
        self.bound: tuple = ()          # what is bound now
        self._clock = clock or trio.current_time
        self._rebind = trio.Event()
        self._tcp_conns = 0
        self._tcp_by_source: collections.Counter = collections.Counter()
        self._inflight = 0
        self._nursery = None

    def update(self, table: D.NameTable, addresses) -> None:
        """The names to answer (from now on) and the mesh addresses to serve on (rebinds when they change)."""
        self.resolver.table = table
        addresses = tuple(a for a in addresses if a) if table.domain else ()
        if addresses != self.addresses:
            self.addresses = addresses
            self._rebind.set()

    def status(self) -> dict:
        return {"domain": self.resolver.table.domain or None, "bound": list(self.bound),
                "counters": dict(self.resolver.counters + self.counters)}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._rebind = trio.Event()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._cancel_on_rebind, scope)
                    self._nursery = nursery
                    self.bound = ()
                    for addr in self.addresses:
                        await self._serve_address(nursery, addr)
            self.bound = ()
            await self._rebind.wait()    # a failed bind waits for the next update too (no spinning)

    async def _cancel_on_rebind(self, scope: trio.CancelScope) -> None:
        await self._rebind.wait()
        scope.cancel()

    async def _serve_address(self, nursery, addr: str) -> None:
        udp = None
        try:
            udp = await self._bind(addr, socket.SOCK_DGRAM)
            tcp = await self._bind(addr, socket.SOCK_STREAM)
        except OSError as exc:
            if udp is not None:
                udp.close()
            self.counters["dns_bind_failed"] += 1
            log.warning("no DNS on %s port %d: %s", addr, self.port, exc)
            return
        tcp.listen(16)
        nursery.start_soon(self._udp_loop, udp)
        nursery.start_soon(trio.serve_listeners, self._tcp_conn, [trio.SocketListener(tcp)])
        self.bound += (addr,)
        log.info("answering DNS for *.%s on %s port %d", self.resolver.table.domain, addr, self.port)

    async def _bind(self, addr: str, kind: int):
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = trio.socket.socket(fam, kind)
        try:
            sock.setsockopt(*_FREEBIND[fam], 1)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((addr, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    # ---- UDP ---------------------------------------------------------------------------------------
    async def _udp_loop(self, sock) -> None:
        with sock:
            while True:
                try:
                    data, src = await sock.recvfrom(MAX_QUERY)
                except OSError as exc:   # ICMP errors surface here on Linux: nothing to do with the next query
                    self.counters["dns_udp_recv_error"] += 1
                    if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        log.debug("DNS receive: %s", exc)
                    continue
                verdict = answer_untrusted(self.resolver, data, src[0], self._clock())
                if verdict is FORWARD:
                    self._start_forward(data, lambda answer, src=src: self._udp_reply(sock, answer, src))
                elif verdict is not None:
                    await self._udp_reply(sock, truncated(verdict), src)

    async def _udp_reply(self, sock, answer: bytes, src) -> None:
        try:
            await sock.sendto(answer, src)
        except OSError:
            self.counters["dns_udp_send_error"] += 1

    # ---- TCP ---------------------------------------------------------------------------------------
    async def _tcp_conn(self, stream) -> None:
        src = self._tcp_admit(stream)
        if src is None:
            await stream.aclose()
            return
        self._tcp_conns += 1
        self._tcp_by_source[src] += 1
        try:
            buf = b""
            deadline = trio.current_time() + TCP_IDLE   # moved on by a complete query only, not by partial bytes
            while True:
                with trio.move_on_at(deadline):
                    data = await stream.receive_some(MAX_QUERY)
                    if not data:
                        return
                    buf += data
                    while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                        n = int.from_bytes(buf[:2], "big")
                        query, buf = buf[2:2 + n], buf[2 + n:]
                        await self._tcp_answer(stream, query, src)
                        deadline = trio.current_time() + TCP_IDLE
                    if len(buf) > MAX_QUERY:   # no query is this long: junk, or someone holding memory
                        self.counters["dns_drop_malformed"] += 1
                        return
                    continue
                return   # idle
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.counters["dns_tcp_error"] += 1
        finally:
            self._tcp_conns -= 1
            self._tcp_by_source[src] -= 1
            if self._tcp_by_source[src] <= 0:
                del self._tcp_by_source[src]
            await stream.aclose()

    def _tcp_admit(self, stream) -> str | None:
        """The peer's address when it may hold a connection now; None (counted): outside the mesh, no room."""
        try:
            src = stream.socket.getpeername()[0]
            inside = self.resolver.inside(ipaddress.ip_address(src))
        except (OSError, ValueError):
            self.counters["dns_tcp_error"] += 1
            return None
        if not inside:
            self.resolver.counters["dns_drop_outside"] += 1
            return None
        if self._tcp_conns >= TCP_MAX_CONNS or self._tcp_by_source[src] >= TCP_MAX_PER_SOURCE:
            self.counters["dns_drop_tcp_conns"] += 1
            return None
        return src

    async def _tcp_answer(self, stream, query: bytes, src: str) -> None:
        verdict = answer_untrusted(self.resolver, query, src, self._clock())
        if verdict is FORWARD:
            verdict = await self._forward(query)
        if verdict is not None:
            await stream.send_all(len(verdict).to_bytes(2, "big") + verdict)

    # ---- a plain peer's query for a name outside the mesh --------------------------------------------
    def _start_forward(self, query: bytes, reply) -> None:
        if self._inflight >= FORWARD_MAX_INFLIGHT:
            self.counters["dns_drop_forward_busy"] += 1
            return
        self._inflight += 1

        async def go():
            try:
                answer = await self._forward(query)
                if answer is not None:
                    await reply(answer)
            finally:
                self._inflight -= 1

        self._nursery.start_soon(go)   # the binding's nursery: a rebind cancels what it was forwarding

    async def _forward(self, query: bytes) -> bytes | None:
        """The first upstream's answer with the query's id (the bytes as they came), None when none answers."""
        for up in self.upstreams:
            fam = socket.AF_INET6 if ":" in up else socket.AF_INET
            with trio.socket.socket(fam, socket.SOCK_DGRAM) as sock, trio.move_on_after(FORWARD_TIMEOUT):
                try:
                    await sock.connect((up, self.upstream_port))   # connected: only that server's datagrams come back
                    await sock.send(query)
                    while True:
                        answer = await sock.recv(65535)
                        if answer[:2] == query[:2] and len(answer) >= 12:
                            return answer
                except OSError:
                    self.counters["dns_forward_error"] += 1
                    continue
            self.counters["dns_forward_timeout"] += 1
        return None

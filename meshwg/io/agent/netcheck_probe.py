"""Trio shell of the RFC 5780 NAT probe (meshwg.disco.netcheck.NatProbe): two fresh UDP sockets, one server.

Used by `meshwg netcheck` (standalone, or next to a running agent whose report lacks filtering).
Fresh sockets, not the agent's shared one: the filtering tests must run from a socket that never
talked to the server's other address, and NAT filtering is a property of the NAT, not of one socket.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import trio

from meshwg.signaling.invite import join_hostport
from meshwg.disco import netcheck as NC

DEFAULT_TIMEOUT = 1.0


def _fmt(addr) -> str | None:
    return None if addr is None else join_hostport(addr[0], addr[1])


def _family(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def _local_ip_towards(server) -> str | None:
    """The source IP the kernel picks for server (a connected UDP socket sends nothing)."""
    try:
        with socket.socket(_family(server[0]), socket.SOCK_DGRAM) as s:
            s.connect(tuple(server))
            return s.getsockname()[0]
    except OSError:
        return None


def pick_server(servers) -> tuple[tuple, list[tuple]] | None:
    """(the server to probe, the other addresses of its family): IPv4 first, it is what NATs filter."""
    addrs = []
    for s in servers:
        try:
            addrs.append((str(ipaddress.ip_address(s[0])), int(s[1])))
        except (ValueError, TypeError, IndexError):
            continue
    addrs.sort(key=lambda a: ":" in a[0])
    if not addrs:
        return None
    first = addrs[0]
    return first, [a for a in addrs[1:] if (":" in a[0]) == (":" in first[0])]


async def probe(server, *, extra_servers=(), timeout: float = DEFAULT_TIMEOUT, bind_host: str | None = None,
                random_bytes=os.urandom) -> dict:
    """Run NatProbe against server=(ip, port); a JSON-able report (see `report_dict`)."""
    server = (str(server[0]), int(server[1]))
    fam = _family(server[0])
    socks = [trio.socket.socket(fam, trio.socket.SOCK_DGRAM) for _ in (NC.MAP_SOCK, NC.FILTER_SOCK)]
    send_errors = 0
    try:
        for s in socks:
            await s.bind((bind_host or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), 0))
        local_port = socks[NC.MAP_SOCK].getsockname()[1]
        nat = NC.NatProbe(server, trio.current_time(), random_bytes, timeout=timeout,
                          extra_servers=extra_servers, local_port=local_port)
        send_ch, recv_ch = trio.open_memory_channel(64)

        async def reader(i: int) -> None:
            while True:
                try:
                    data, src = await socks[i].recvfrom(2048)
                except OSError:   # e.g. ICMP port unreachable reported on the socket: keep listening
                    continue
                await send_ch.send((i, data, src[:2]))

        async with trio.open_nursery() as nursery:
            for i in range(len(socks)):
                nursery.start_soon(reader, i)
            while True:
                for i, data, dest in nat.datagrams_to_send():
                    try:
                        await socks[i].sendto(data, dest)
                    except OSError:
                        send_errors += 1
                if nat.done:
                    break
                got = None
                with trio.move_on_at(nat.get_timer()):
                    got = await recv_ch.receive()
                # One clock, trio's (get_timer's deadlines are move_on_at's), read once per input.
                now = trio.current_time()
                if got is not None:
                    nat.receive_datagram(*got, now)
                nat.handle_timer(now)
            nursery.cancel_scope.cancel()
    finally:
        for s in socks:
            s.close()
    out = report_dict(nat, _local_ip_towards(server))
    out["send_errors"] = send_errors
    return out


def report_dict(nat: NC.NatProbe, local_ip: str | None = None) -> dict:
    rep = nat.report()
    first = nat.test("map")
    mapped = first.answer.mapped if first and first.answer else None
    return {
        "server": _fmt(nat.server), "other_address": _fmt(nat.other),
        "udp": rep.udp, "mapping": rep.mapping, "filtering": rep.filtering, "hard": rep.hard,
        "reflexive": [_fmt(a) for a in rep.reflexive], "preserves_port": rep.preserves_port,
        "behind_nat": None if mapped is None or local_ip is None else mapped[0] != local_ip,
        "stun_rtt_ms": None if not first or first.rtt is None else round(first.rtt * 1000, 3),
        "summary": rep.summary(),
        "tests": [{"name": t.name, "to": _fmt(t.dest), "change": t.change, "answered": t.answered,
                   "from": _fmt(t.source), "mapped": _fmt(t.answer.mapped) if t.answer else None,
                   "rtt_ms": None if t.rtt is None else round(t.rtt * 1000, 3), "sent": t.sent}
                  for t in nat.tests],
    }


async def probe_servers(servers, *, timeout: float = DEFAULT_TIMEOUT) -> dict | None:
    """Probe the first usable of the built-in server's STUN addresses (the others help mapping)."""
    picked = pick_server(servers)
    if picked is None:
        return None
    server, extra = picked
    return await probe(server, extra_servers=extra, timeout=timeout)


def merge(report: dict, nat: dict) -> dict:
    """Put a probe's verdicts into an agent netcheck report: filtering comes only from the probe; its
    mapping (RFC 5780, tells address- from address-and-port-dependent) wins when it reached a verdict;
    reflexive addresses stay the agent's (the shared socket's are the ones peers use)."""
    report["nat_probe"] = nat
    if nat["filtering"] != NC.UNKNOWN:
        report["filtering"] = nat["filtering"]
    else:
        report.setdefault("filtering", NC.UNKNOWN)
    if nat["mapping"] not in (NC.UNKNOWN, NC.NO_UDP):
        if report.get("mapping") not in (None, NC.UNKNOWN, NC.NO_UDP, nat["mapping"]):
            report["mapping_shared_socket"] = report["mapping"]
        report["mapping"], report["hard"] = nat["mapping"], nat["hard"]
    if not report.get("reflexive"):
        report["reflexive"] = nat["reflexive"]
    report["udp"] = bool(report.get("udp")) or nat["udp"]
    return report


def global_ipv6_addresses() -> list[str]:
    try:
        with open("/proc/net/if_inet6") as f:
            return NC.global_ipv6_untrusted(f.read())
    except OSError:   # no IPv6 in this kernel
        return []


def ipv6_server(servers) -> tuple | None:
    for s in servers:
        try:
            if ipaddress.ip_address(s[0]).version == 6:
                return str(ipaddress.ip_address(s[0])), int(s[1])
        except (ValueError, TypeError, IndexError):
            continue
    return None


async def probe_ipv6(servers, *, timeout: float = DEFAULT_TIMEOUT, addresses=None) -> dict:
    """IPv6 reachability: does the host have a global address, does a STUN Binding over IPv6 to the server
    answer, and what the server sees (the reflexive address). `addresses`: the host's global ones (tests)."""
    addrs = global_ipv6_addresses() if addresses is None else list(addresses)
    server = ipv6_server(servers)
    out = {"addresses": addrs, "server": _fmt(server), "udp": None, "reflexive": None}
    if server is None:
        return out
    try:
        nat = await probe(server, timeout=timeout)
    except OSError:   # no IPv6 socket at all
        out["udp"] = False
        return out
    out["udp"] = nat["udp"]
    out["reflexive"] = nat["reflexive"][0] if nat["reflexive"] else None
    return out

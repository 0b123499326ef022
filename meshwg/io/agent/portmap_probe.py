"""Trio shell of the port-mapping probe (meshwg.disco.portmap): NAT-PMP, PCP and UPnP IGD at once, time-boxed.

NAT-PMP and PCP go to the default gateway's UDP 5351 (each from its own socket, so their answers cannot be
confused), SSDP to the multicast group; a gateway that answers SSDP gets one HTTP GET of its description
(only from the address that answered). Everything ends when all three have answered or `timeout` passes.
"""

from __future__ import annotations

import socket

import trio

from meshwg.disco import portmap as PM

DEFAULT_TIMEOUT = 1.0
RETRANSMIT = 0.25                # RFC 6886 3.1: 250 ms, doubling


def default_gateway() -> str | None:
    try:
        with open("/proc/net/route") as f:
            return PM.default_gateway_untrusted(f.read())
    except OSError:
        return None


def _local_ip_towards(ip: str, port: int) -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, port))
            return s.getsockname()[0]
    except OSError:
        return None


async def probe(*, gateway: str | None = None, timeout: float = DEFAULT_TIMEOUT, natpmp_port: int = PM.NATPMP_PORT,
                ssdp_dest: tuple = PM.SSDP_ADDR) -> dict:
    """Which port-mapping protocols the gateway answers; a JSON-able dict (PortMapFindings.as_dict)."""
    gateway = gateway or default_gateway()
    found = PM.PortMapFindings()
    socks = []

    def udp() -> trio.socket.SocketType:
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(s)
        return s

    def finished() -> bool:
        pcp_done = found.pcp is not None or found.pcp_seen_natpmp_reply
        return found.upnp is not None and (gateway is None or (found.natpmp is not None and pcp_done))

    async def repeat(sock, data: bytes, dest, done) -> None:
        delay = RETRANSMIT
        while not done():
            try:
                await sock.sendto(data, dest)
            except OSError:
                found._drop("send_error")
                return
            await trio.sleep(delay)
            delay *= 2

    async def read(sock, handle) -> None:
        while True:
            try:
                data, src = await sock.recvfrom(PM.MAX_DATAGRAM + 1)
            except OSError:   # ICMP unreachable reported on the socket: keep listening until the deadline
                continue
            handle(data, src[0])
            if finished():
                nursery.cancel_scope.cancel()

    async def fetch(src_ip: str, location: str) -> None:
        target = PM.description_target(location, src_ip)
        try:
            stream = await trio.open_tcp_stream(target[0], target[1])
            async with stream:
                await stream.send_all(PM.description_request(*target))
                body = b""
                while len(body) < PM.MAX_DESCRIPTION and (chunk := await stream.receive_some(16384)):
                    body += chunk
        except (OSError, trio.BrokenResourceError):
            found._drop("upnp_fetch")
            return
        found.on_description(body, src_ip)
        if finished():
            nursery.cancel_scope.cancel()

    def on_ssdp(data: bytes, src_ip: str) -> None:
        ans = found.on_ssdp(data, src_ip)
        if ans is not None:
            nursery.start_soon(fetch, src_ip, ans.location)

    try:
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                ssdp = udp()
                ssdp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
                await ssdp.bind(("0.0.0.0", 0))
                nursery.start_soon(read, ssdp, on_ssdp)
                nursery.start_soon(repeat, ssdp, PM.ssdp_search(), ssdp_dest, lambda: bool(found.ssdp))
                client_ip = gateway and _local_ip_towards(gateway, natpmp_port)
                if gateway and client_ip:
                    natpmp, pcp = udp(), udp()
                    for s in (natpmp, pcp):
                        await s.bind(("0.0.0.0", 0))
                    nursery.start_soon(read, natpmp, lambda d, ip: found.on_natpmp(d, ip, gateway))
                    nursery.start_soon(read, pcp, lambda d, ip: found.on_pcp(d, ip, gateway))
                    nursery.start_soon(repeat, natpmp, PM.natpmp_external_request(), (gateway, natpmp_port),
                                       lambda: found.natpmp is not None)
                    nursery.start_soon(repeat, pcp, PM.pcp_announce_request(client_ip), (gateway, natpmp_port),
                                       lambda: found.pcp is not None or found.pcp_seen_natpmp_reply)
    finally:
        for s in socks:
            s.close()
    return found.as_dict(gateway)

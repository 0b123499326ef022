"""Port-mapping protocols seen from the LAN: NAT-PMP (RFC 6886), PCP (RFC 6887), UPnP IGD (SSDP + description).

Pure: the wire formats and what the answers mean, for `meshwg netcheck`'s "port mapping" line (which of the
three the gateway answers, like tailscale netcheck's PortMapping). The shell (meshwg.io.agent.portmap_probe)
sends the requests and feeds every datagram and the description body to `PortMapFindings`; anything
malformed or unasked-for is dropped and counted, never raised. No mapping is ever created: NAT-PMP asks
for the external address, PCP sends an ANNOUNCE, UPnP only reads the device description.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field
from urllib.parse import urlsplit

NATPMP_PORT = 5351                 # NAT-PMP and PCP share the gateway's port (RFC 6887 19.1)
SSDP_ADDR = ("239.255.255.250", 1900)
NATPMP_VERSION, PCP_VERSION = 0, 2
NATPMP_OP_EXTERNAL = 0
PCP_OP_ANNOUNCE = 0
RESPONSE_BIT = 0x80
MAX_DATAGRAM = 1100                # PCP messages are at most 1100 bytes (RFC 6887 7); SSDP answers are small
MAX_DESCRIPTION = 65536            # a gateway's description is a few KiB; more is junk
MAX_SSDP_RESPONDERS = 8            # descriptions fetched at most: a LAN has a gateway or two, not a flood of them

IGD_ST = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
_WAN_SERVICE = re.compile(rb"urn:schemas-upnp-org:service:WAN(?:IP|PPP)Connection:\d")


def natpmp_external_request() -> bytes:
    """RFC 6886 3.2: version 0, opcode 0 (what is the external address)."""
    return bytes((NATPMP_VERSION, NATPMP_OP_EXTERNAL))


def pcp_announce_request(client_ip: str) -> bytes:
    """RFC 6887 14.1: ANNOUNCE, lifetime 0; the client address as IPv4-mapped IPv6 (7.1) - the server
    checks it against the packet's source (ADDRESS_MISMATCH otherwise)."""
    ip = ipaddress.ip_address(client_ip)
    packed = (ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip).packed
    return struct.pack("!BBHI", PCP_VERSION, PCP_OP_ANNOUNCE, 0, 0) + packed


def ssdp_search(st: str = IGD_ST, mx: int = 1) -> bytes:
    """UPnP Device Architecture 1.x 1.3.2: an M-SEARCH for gateways."""
    return ("M-SEARCH * HTTP/1.1\r\n"
            f"HOST: {SSDP_ADDR[0]}:{SSDP_ADDR[1]}\r\n"
            'MAN: "ssdp:discover"\r\n'
            f"MX: {mx}\r\n"
            f"ST: {st}\r\n\r\n").encode()


@dataclass(frozen=True)
class NatPmpAnswer:
    result: int
    epoch: int
    external_ip: str | None        # only on success


def parse_natpmp_untrusted(data: bytes) -> NatPmpAnswer | None:
    """An external-address response (RFC 6886 3.2): 12 bytes on success, 8 with an error code (e.g.
    1 = unsupported version). None: not a NAT-PMP answer to that request."""
    if not 8 <= len(data) <= MAX_DATAGRAM or data[0] != NATPMP_VERSION or data[1] != RESPONSE_BIT | NATPMP_OP_EXTERNAL:
        return None
    result, epoch = struct.unpack_from("!HI", data, 2)
    ext = None
    if result == 0:
        if len(data) < 12:
            return None
        ext = str(ipaddress.IPv4Address(data[8:12]))
    return NatPmpAnswer(result, epoch, ext)


@dataclass(frozen=True)
class PcpAnswer:
    result: int
    epoch: int


def parse_pcp_untrusted(data: bytes) -> PcpAnswer | None:
    """An ANNOUNCE response (RFC 6887 7.2): version 2, R bit + opcode 0, 24-byte header. A NAT-PMP-only
    gateway answers a PCP request with version 0 (RFC 6887 9): that is not PCP."""
    if not 24 <= len(data) <= MAX_DATAGRAM or len(data) % 4 or data[0] != PCP_VERSION \
            or data[1] != RESPONSE_BIT | PCP_OP_ANNOUNCE:
        return None
    result, _lifetime, epoch = struct.unpack_from("!xBII", data, 2)
    return PcpAnswer(result, epoch)


@dataclass(frozen=True)
class SsdpAnswer:
    location: str
    st: str
    server: str


def parse_ssdp_untrusted(data: bytes) -> SsdpAnswer | None:
    """An M-SEARCH response: "HTTP/1.1 200 OK" and headers, LOCATION required."""
    if len(data) > MAX_DATAGRAM:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    status = lines[0].split()
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    location = headers.get("location", "")
    if not location:
        return None
    return SsdpAnswer(location, headers.get("st", ""), headers.get("server", "")[:200])


# Where a LAN's UPnP device may be: RFC 1918, link-local, loopback (not the shared 100.64/10 of CGNAT and the mesh).
_LAN = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                                                "127.0.0.0/8"))


def _on_lan(ip) -> bool:
    """An SSDP answer from anything else came from outside the LAN (the socket listens on every address)."""
    return any(ip in n for n in _LAN)


def description_target(location: str, responder_ip: str) -> tuple[str, int, str] | None:
    """(host, port, path) to GET the description from, only when LOCATION names the device that answered, on the
    LAN, over plain HTTP: a packet must not make us connect elsewhere."""
    try:
        u = urlsplit(location)
        port = u.port or 80
        host = u.hostname or ""
        ip = ipaddress.ip_address(host)
        same = ip == ipaddress.ip_address(responder_ip) and _on_lan(ip)
    except ValueError:
        return None
    if u.scheme != "http" or not same or not 0 < port < 65536:
        return None
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if any(c in path for c in "\r\n "):
        return None
    return host, port, path


def description_request(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()


def is_igd_description_untrusted(response: bytes) -> bool:
    """An HTTP 200 whose body names a WANIPConnection or WANPPPConnection service: a gateway that can map
    ports (what UPnP clients look for). No XML parser: a substring test on bounded bytes cannot be fooled
    into expanding entities."""
    head, sep, body = response[:MAX_DESCRIPTION].partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    return bool(sep) and len(status) >= 2 and status[1] == b"200" and _WAN_SERVICE.search(body) is not None


@dataclass
class PortMapFindings:
    """What the gateway answered; feed it datagrams and description responses, read `protocols()`."""

    natpmp: NatPmpAnswer | None = None
    pcp: PcpAnswer | None = None
    pcp_seen_natpmp_reply: bool = False   # the PCP probe got a NAT-PMP "unsupported version": no PCP there
    ssdp: dict = field(default_factory=dict)       # responder ip -> SsdpAnswer
    upnp: str | None = None                        # the responder whose description is a gateway's
    drops: dict = field(default_factory=dict)      # reason -> count

    def _drop(self, why: str) -> None:
        self.drops[why] = self.drops.get(why, 0) + 1

    def on_natpmp(self, data: bytes, src_ip: str, gateway: str) -> None:
        ans = parse_natpmp_untrusted(data) if src_ip == gateway else None
        if ans is None:
            self._drop("natpmp")
        elif self.natpmp is None:
            self.natpmp = ans

    def on_pcp(self, data: bytes, src_ip: str, gateway: str) -> None:
        ans = parse_pcp_untrusted(data) if src_ip == gateway else None
        if ans is not None:
            if self.pcp is None:
                self.pcp = ans
        elif src_ip == gateway and len(data) >= 2 and data[0] == NATPMP_VERSION and data[1] == RESPONSE_BIT:
            self.pcp_seen_natpmp_reply = True
        else:
            self._drop("pcp")

    def on_ssdp(self, data: bytes, src_ip: str) -> SsdpAnswer | None:
        """The answer when it is new and worth fetching the description of."""
        ans = parse_ssdp_untrusted(data)
        if ans is None or description_target(ans.location, src_ip) is None:
            self._drop("ssdp")
            return None
        if src_ip in self.ssdp:
            return None
        if len(self.ssdp) >= MAX_SSDP_RESPONDERS:
            self._drop("ssdp_too_many")
            return None
        self.ssdp[src_ip] = ans
        return ans

    def on_description(self, response: bytes, src_ip: str) -> None:
        if is_igd_description_untrusted(response):
            self.upnp = self.upnp or src_ip
        else:
            self._drop("upnp_description")

    def protocols(self) -> list[str]:
        """The protocols that would map a port for us, in tailscale's order."""
        out = []
        if self.upnp is not None:
            out.append("UPnP")
        if self.pcp is not None and self.pcp.result == 0:
            out.append("PCP")
        if self.natpmp is not None and self.natpmp.result == 0:
            out.append("NAT-PMP")
        return out

    def as_dict(self, gateway: str | None) -> dict:
        return {"gateway": gateway, "protocols": self.protocols(),
                "natpmp": None if self.natpmp is None else {"result": self.natpmp.result,
                                                            "external_ip": self.natpmp.external_ip},
                "pcp": None if self.pcp is None else {"result": self.pcp.result},
                "upnp": None if self.upnp is None else {"device": self.upnp, "server": self.ssdp[self.upnp].server,
                                                        "location": self.ssdp[self.upnp].location},
                "ssdp_answers": len(self.ssdp), "drops": dict(self.drops)}


NATPMP_RESULTS = {1: "unsupported version", 2: "not authorized", 3: "network failure", 4: "out of resources",
                  5: "unsupported opcode"}


def portmap_text(report: dict | None) -> str:
    """What `meshwg netcheck` prints after "port mapping:", from PortMapFindings.as_dict (None: no answer in time).
    A gateway that answered but refused (e.g. NAT-PMP "network failure": its own outside address is private)
    is named, since that is why mapping would not work."""
    if report is None:
        return "unknown (no answer in time)"
    text = ", ".join(report["protocols"]) or "none"
    notes = [f"gateway {report['gateway']}"] if report.get("gateway") else []
    for name, key in (("NAT-PMP", "natpmp"), ("PCP", "pcp")):
        ans = report.get(key)
        if ans and ans["result"]:
            notes.append(f"{name} refused: {NATPMP_RESULTS.get(ans['result'], 'result')} ({ans['result']})")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def default_gateway_untrusted(proc_net_route: str) -> str | None:
    """The IPv4 default gateway from /proc/net/route's text (little-endian hex), None when there is none."""
    for line in proc_net_route.splitlines()[1:]:
        f = line.split()
        try:
            if len(f) >= 4 and f[1] == "00000000" and int(f[3], 16) & 0x2:   # RTF_GATEWAY
                return str(ipaddress.IPv4Address(struct.pack("<I", int(f[2], 16))))
        except (ValueError, struct.error):
            continue
    return None

"""The WireGuard UAPI text protocol (https://www.wireguard.com/xplatform/), as a pure codec.

Semantics follow wireguard-go `device/uapi.go` (the reference server) so that the stock `wg` tool
behaves the same against us. Nothing here touches a socket; the UAPI server shell does:

    framer = RequestFramer()
    framer.feed(data_from_socket)                 # bytes; any chunking
    while (req := framer.next_request()) is not None:
        if req.op == "get":
            reply = format_get_response(snapshot_of_device())          # ends "errno=0\\n\\n"
        else:  # "set"
            try:
                ops = parse_set_request_untrusted(req.lines, own_public_key=core.public_key)
                apply(ops)                                            # the device's job
                reply = format_errno(0)
            except UapiError as err:
                reply = format_errno(err.errno)                       # "errno=-22\\n\\n"
    # framer.next_request() raises UapiError(fatal=True) for an unknown operation or a line that
    # is too long: write nothing more and close the connection (wireguard-go does the same).

`parse_set_request_untrusted(lines)` takes the lines *after* "set=1" up to (not including) the
empty line, without newlines, and returns a `SetRequest`:

  device keys (they come before the first public_key):
    private_key     bytes | None   None = not in the request; 32 zero bytes = remove the key
    listen_port     int | None
    fwmark          int | None     0 = off
    replace_peers   bool           remove every peer before applying `peers`
  peers: list[PeerUpdate], in request order (a key may appear twice: apply in order):
    public_key      bytes
    remove          bool           remove the peer; ignore every other field
    update_only     bool           only touch an existing peer; if absent, ignore the whole entry
    preshared_key   bytes | None   None = unchanged; 32 zero bytes = no PSK
    endpoint        (ip_str, port) | None      IPv6 without brackets, e.g. ("2001:db8::1", 51820)
    persistent_keepalive_interval  int | None  0 = off
    replace_allowed_ips  bool      clear the peer's allowed IPs before `allowed_ips`
    allowed_ips     list[AllowedIPChange(network, remove)]  in order; `allowed_ip=-prefix` removes
    protocol_version int | None    only 1 is valid
  Peers equal to our own public key are dropped, as wg-go ignores lines for itself: pass the
  device's current key as own_public_key; a private_key line in the request replaces it.

Errors raise UapiError(errno) with wireguard-go's codes: a line without "=" is -EPROTO (-71);
any bad key, value or unknown key is -EINVAL (-22) (wg-go also uses -EINVAL for a bad
protocol_version). Nothing else is raised for any input.

`format_get_response(DeviceSnapshot)` prints wg-go's order: private_key, listen_port, fwmark
(each only if set), then per peer public_key, preshared_key (zeros if none), protocol_version=1,
endpoint (if known), last_handshake_time_sec/_nsec, tx_bytes, rx_bytes,
persistent_keepalive_interval, one allowed_ip per prefix; then "errno=0" and an empty line.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Union

from meshwg.config import keys

EIO = -5
EINVAL = -22
EPROTO = -71
EADDRINUSE = -98

MAX_LINE = 64 * 1024  # wg-go's bufio.Scanner token limit; longer lines end the connection

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_UINT_RE = re.compile(r"[0-9]+")


class UapiError(Exception):
    """A request the device must refuse; reply `errno=<errno>`. fatal: close the connection instead."""

    def __init__(self, errno: int, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.errno = errno
        self.fatal = fatal


@dataclass(frozen=True)
class AllowedIPChange:
    network: IPNetwork
    remove: bool = False


@dataclass
class PeerUpdate:
    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None
    persistent_keepalive_interval: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[AllowedIPChange] = field(default_factory=list)
    protocol_version: int | None = None


@dataclass
class SetRequest:
    private_key: bytes | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerUpdate] = field(default_factory=list)


@dataclass
class PeerSnapshot:
    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: tuple[str, int] | None = None
    last_handshake_time_sec: int = 0
    last_handshake_time_nsec: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    persistent_keepalive_interval: int = 0
    allowed_ips: list[IPNetwork] = field(default_factory=list)


@dataclass
class DeviceSnapshot:
    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerSnapshot] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    op: str  # "get" or "set"
    lines: tuple[str, ...] = ()  # for "set": the lines between "set=1" and the empty line


# ---------------------------------------------------------------- value parsers


def _invalid(message: str) -> UapiError:
    return UapiError(EINVAL, message)


def parse_uint(value: str, lo: int, hi: int, what: str) -> int:
    """A decimal in lo..hi, like Go's strconv.ParseUint: ASCII digits only, no sign, no spaces.
    Raises ValueError (UAPI turns it into -EINVAL; wgquick keeps it, so its messages are wg-quick's)."""
    if not _UINT_RE.fullmatch(value):
        raise ValueError(f"{what} is not a number: {value[:80]!r}")
    if len(value) > 20:  # also keeps int() below Python's digit limit
        raise ValueError(f"{what} out of range ({value[:20]}..., want {lo}..{hi})")
    number = int(value)
    if not lo <= number <= hi:
        raise ValueError(f"{what} out of range ({number}, want {lo}..{hi})")
    return number


def _uint(value: str, bits: int, what: str) -> int:
    try:
        return parse_uint(value, 0, (1 << bits) - 1, what)
    except ValueError as err:
        raise _invalid(str(err)) from None


def _hex_key(value: str, what: str) -> bytes:
    try:
        return keys.key_from_hex(value)
    except keys.KeyFormatError as err:
        raise _invalid(f"{what}: {err}") from None


def _true(value: str, what: str) -> bool:
    if value != "true":
        raise _invalid(f"{what}: only 'true' is valid, got {value[:80]!r}")
    return True


def parse_prefix(value: str) -> IPNetwork:
    """Go's netip.ParsePrefix: IP/len with explicit length; host bits are masked off."""
    addr, slash, plen = value.partition("/")
    if not slash or not _UINT_RE.fullmatch(plen) or len(plen) > 3 or "%" in addr or (len(plen) > 1 and plen[0] == "0"):
        raise _invalid(f"allowed_ip: bad prefix {value[:80]!r}")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise _invalid(f"allowed_ip: bad address {value[:80]!r}") from None
    if int(plen) > ip.max_prefixlen:
        raise _invalid(f"allowed_ip: prefix length too long {value[:80]!r}")
    return ipaddress.ip_network(f"{ip}/{plen}", strict=False)


def parse_endpoint(value: str) -> tuple[str, int]:
    """Go's netip.ParseAddrPort: `1.2.3.4:port` or `[v6]:port`, IP literals only."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise _invalid(f"endpoint: bad value {value[:80]!r}")
        port_text = rest[1:]
        version = 6
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise _invalid(f"endpoint: bad value {value[:80]!r}")
        version = 4
    if "%" in host:
        raise _invalid(f"endpoint: scoped addresses are not supported {value[:80]!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _invalid(f"endpoint: bad address {value[:80]!r}") from None
    if ip.version != version:
        raise _invalid(f"endpoint: IPv6 needs brackets, IPv4 must not have them {value[:80]!r}")
    return str(ip), _uint(port_text, 16, "endpoint port")


# ---------------------------------------------------------------- set


def parse_set_request_untrusted(lines: Iterable[str], *, own_public_key: bytes | None = None) -> SetRequest:
    """Parse the body of a `set=1` request; raises only UapiError (see the module docstring)."""
    request = SetRequest()
    peer: PeerUpdate | None = None
    for line in lines:
        if not isinstance(line, str):
            raise UapiError(EPROTO, "line is not text")
        key, eq, value = line.partition("=")
        if not eq:
            raise UapiError(EPROTO, f"failed to parse line {line[:80]!r}")
        if key == "public_key":
            peer = PeerUpdate(public_key=_hex_key(value, "public_key"))
            if own_public_key is None or peer.public_key != own_public_key:
                request.peers.append(peer)
            continue
        if peer is None:
            _device_line(request, key, value)
            if key == "private_key":
                # wg-go compares peers with the identity as changed by this very request
                own_public_key = keys.public_key(request.private_key) if keys.nonzero(request.private_key) else None
        else:
            _peer_line(peer, key, value)
    return request


def _device_line(request: SetRequest, key: str, value: str) -> None:
    if key == "private_key":
        request.private_key = _hex_key(value, "private_key")
    elif key == "listen_port":
        request.listen_port = _uint(value, 16, "listen_port")
    elif key == "fwmark":
        request.fwmark = _uint(value, 32, "fwmark")
    elif key == "replace_peers":
        request.replace_peers = _true(value, "replace_peers")
    else:
        raise _invalid(f"invalid UAPI device key: {key[:80]!r}")


def _peer_line(peer: PeerUpdate, key: str, value: str) -> None:
    if key == "update_only":
        peer.update_only = _true(value, "update_only")
    elif key == "remove":
        peer.remove = _true(value, "remove")
    elif key == "preshared_key":
        peer.preshared_key = _hex_key(value, "preshared_key")
    elif key == "endpoint":
        peer.endpoint = parse_endpoint(value)
    elif key == "persistent_keepalive_interval":
        peer.persistent_keepalive_interval = _uint(value, 16, "persistent_keepalive_interval")
    elif key == "replace_allowed_ips":
        _true(value, "replace_allowed_ips")
        peer.replace_allowed_ips = True
        peer.allowed_ips.clear()  # wg-go clears everything added so far, including earlier lines
    elif key == "allowed_ip":
        remove = value.startswith("-")
        peer.allowed_ips.append(AllowedIPChange(parse_prefix(value[1:] if remove else value), remove))
    elif key == "protocol_version":
        if value != "1":
            raise _invalid(f"invalid protocol version: {value[:80]!r}")
        peer.protocol_version = 1
    else:
        raise _invalid(f"invalid UAPI peer key: {key[:80]!r}")


def format_set_request(request: SetRequest) -> str:
    """The text of a SetRequest, "set=1\\n" ... "\\n" (what `wg set` sends); parses back equal."""
    lines = ["set=1"]
    if request.private_key is not None:
        lines.append(f"private_key={request.private_key.hex()}")
    if request.listen_port is not None:
        lines.append(f"listen_port={request.listen_port}")
    if request.fwmark is not None:
        lines.append(f"fwmark={request.fwmark}")
    if request.replace_peers:
        lines.append("replace_peers=true")
    for peer in request.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.remove:
            lines.append("remove=true")
        if peer.update_only:
            lines.append("update_only=true")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={peer.preshared_key.hex()}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        if peer.persistent_keepalive_interval is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive_interval}")
        if peer.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={'-' if c.remove else ''}{format_prefix(c.network)}" for c in peer.allowed_ips)
        if peer.protocol_version is not None:
            lines.append(f"protocol_version={peer.protocol_version}")
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------- get


def format_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> str:
    """Go's netip.Addr.String(): RFC 5952, IPv4-mapped IPv6 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint[0], endpoint[1]
    text = format_ip(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def format_prefix(network: IPNetwork) -> str:
    return f"{format_ip(network.network_address)}/{network.prefixlen}"


def format_get_response(device: DeviceSnapshot) -> str:
    """The full reply to `get=1`, ending with "errno=0\\n\\n"."""
    lines = []
    if device.private_key is not None and device.private_key != keys.ZERO_KEY:
        lines.append(f"private_key={device.private_key.hex()}")
    if device.listen_port:
        lines.append(f"listen_port={device.listen_port}")
    if device.fwmark:
        lines.append(f"fwmark={device.fwmark}")
    for peer in device.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={(peer.preshared_key or keys.ZERO_KEY).hex()}")
        lines.append("protocol_version=1")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        lines.append(f"last_handshake_time_sec={peer.last_handshake_time_sec}")
        lines.append(f"last_handshake_time_nsec={peer.last_handshake_time_nsec}")
        lines.append(f"tx_bytes={peer.tx_bytes}")
        lines.append(f"rx_bytes={peer.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive_interval}")
        lines.extend(f"allowed_ip={format_prefix(net)}" for net in peer.allowed_ips)
    lines.append("errno=0")
    return "\n".join(lines) + "\n\n"


def handshake_time(wall: float | None) -> tuple[int, int]:
    """(sec, nsec) for last_handshake_time_*; None (never) is (0, 0)."""
    if wall is None:
        return 0, 0
    sec = math.floor(wall)
    nsec = min(int(round((wall - sec) * 1e9)), 999_999_999)  # split first: wall * 1e9 loses precision
    return sec, nsec


def format_errno(errno: int) -> str:
    return f"errno={errno}\n\n"


# ---------------------------------------------------------------- framing


class RequestFramer:
    """Splits a UAPI byte stream into Requests; pure (feed bytes in, take requests out).

    Like wg-go: an operation line other than "get=1"/"set=1", a "get=1" not followed by an empty
    line, non-UTF-8 text or a line over MAX_LINE raise UapiError(fatal=True): close the connection.
    """

    def __init__(self, max_line: int = MAX_LINE):
        self._buf = bytearray()
        self._max_line = max_line
        self._op: str | None = None
        self._lines: list[str] = []

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_request(self) -> Request | None:
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self._max_line:
                    raise UapiError(EIO, "line too long", fatal=True)
                return None
            if end > self._max_line:
                raise UapiError(EIO, "line too long", fatal=True)
            raw = bytes(self._buf[:end])
            del self._buf[: end + 1]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UapiError(EPROTO, "request is not UTF-8", fatal=True) from None
            if self._op is None:
                if line not in ("get=1", "set=1"):
                    raise UapiError(EPROTO, f"invalid UAPI operation {line[:80]!r}", fatal=True)
                self._op = line[:3]
                self._lines = []
                continue
            if line == "":
                request = Request(self._op, tuple(self._lines))
                self._op, self._lines = None, []
                return request
            if self._op == "get":
                raise UapiError(EINVAL, "trailing data after get=1", fatal=True)
            self._lines.append(line)

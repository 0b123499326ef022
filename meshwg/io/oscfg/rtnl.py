"""Just enough rtnetlink to read the kernel's routes and hear when they change.

Changes still go through `ip` (meshwg.io.agent.mesh_shell.ip_batch); this module only reads: a dump of
every IPv4/IPv6 route (one socket round trip, no subprocess) and a socket subscribed to route and
link events. Parsing never raises: a malformed message ends the parse of its buffer.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from meshwg.io.oscfg.route_plan import KernelRoute

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 16, 17, 24, 25, 26
RTA_DST, RTA_OIF, RTA_METRICS, RTA_MULTIPATH, RTA_TABLE = 1, 4, 8, 9, 15
RTAX_MTU = 2   # inside RTA_METRICS: the route's `mtu`
RTM_F_CLONED = 0x200
# Legacy group bits for bind(): RTMGRP_LINK, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE.
GROUPS = 0x1 | 0x40 | 0x400

_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")
_RTNH = struct.Struct("=HBBi")


def _align(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes):
    """(type, payload) for each netlink message in data; stops at the first malformed header."""
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            return
        yield kind, data[off + _NLMSG.size:off + length]
        off += _align(length)


def _attrs(data: bytes, off: int) -> dict[int, bytes]:
    out = {}
    while off + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, off)
        if length < _RTA.size or off + length > len(data):
            break
        out[kind & 0x3FFF] = data[off + _RTA.size:off + length]
        off += _align(length)
    return out


def _nexthop_devs(data: bytes) -> set[int]:
    devs, off = set(), 0
    while off + _RTNH.size <= len(data):
        length, _flags, _hops, ifindex = _RTNH.unpack_from(data, off)
        if length < _RTNH.size:
            break
        devs.add(ifindex)
        off += _align(length)
    return devs


def _metric_mtu(data: bytes) -> int:
    """The RTAX_MTU of a route's RTA_METRICS (0: none, or malformed)."""
    value = _attrs(data, 0).get(RTAX_MTU, b"")
    return struct.unpack("=I", value)[0] if len(value) == 4 else 0


def parse_route(payload: bytes) -> KernelRoute | None:
    """One RTM_NEWROUTE/RTM_DELROUTE payload as a KernelRoute; None for other families,
    cached clones and malformed payloads."""
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, _src_len, _tos, table, _proto, _scope, _type, flags = _RTMSG.unpack_from(payload)
    if family not in (socket.AF_INET, socket.AF_INET6) or flags & RTM_F_CLONED:
        return None
    attrs = _attrs(payload, _RTMSG.size)
    size = 4 if family == socket.AF_INET else 16
    dst = attrs.get(RTA_DST, bytes(size))
    if len(dst) != size or dst_len > size * 8:
        return None
    if RTA_TABLE in attrs and len(attrs[RTA_TABLE]) == 4:
        table = struct.unpack("=I", attrs[RTA_TABLE])[0]
    devs = set()
    if RTA_OIF in attrs and len(attrs[RTA_OIF]) == 4:
        devs.add(struct.unpack("=i", attrs[RTA_OIF])[0])
    if RTA_MULTIPATH in attrs:
        devs |= _nexthop_devs(attrs[RTA_MULTIPATH])
    addr = ipaddress.ip_address(dst)
    net = ipaddress.ip_network(f"{addr}/{dst_len}", strict=False)
    mtu = _metric_mtu(attrs[RTA_METRICS]) if RTA_METRICS in attrs else 0
    return KernelRoute(str(net), frozenset(devs), table, mtu)


def parse_dump(data: bytes) -> tuple[list[KernelRoute], bool, int]:
    """(routes, done, errno) of one recv() of a route dump; errno is 0 unless the kernel refused."""
    routes = []
    for kind, payload in messages(data):
        if kind == NLMSG_DONE:
            return routes, True, 0
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EPROTO
            return routes, True, code
        if kind == RTM_NEWROUTE:
            route = parse_route(payload)
            if route is not None:
                routes.append(route)
    return routes, False, 0


def concerns(data: bytes, prefixes: set[str], ifindex: int) -> bool:
    """Do these route/link events touch one of `prefixes` or the interface `ifindex`?"""
    for kind, payload in messages(data):
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            route = parse_route(payload)
            if route is not None and (route.prefix in prefixes or ifindex in route.devs):
                return True
        elif kind in (RTM_NEWLINK, RTM_DELLINK) and len(payload) >= _IFINFO.size:
            if _IFINFO.unpack_from(payload)[2] == ifindex:
                return True  # e.g. set down and up again: IPv4 drops its routes without an event
    return False


def dump_request(seq: int) -> bytes:
    """RTM_GETROUTE dump of every family (AF_UNSPEC); parse_route keeps IPv4 and IPv6."""
    body = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
    return _NLMSG.pack(_NLMSG.size + len(body), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def dump_routes(timeout: float = 5.0) -> list[KernelRoute]:
    """Every IPv4/IPv6 route in the kernel (blocking; run it in a thread). Raises OSError."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(dump_request(1))
        routes: list[KernelRoute] = []
        while True:
            more, done, code = parse_dump(sock.recv(1 << 16))
            routes += more
            if code:
                raise OSError(code, f"route dump: {errno.errorcode.get(code, code)}")
            if done:
                return routes


def event_socket() -> socket.socket:
    """A non-blocking socket receiving route and link events."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, GROUPS))
    except BaseException:
        sock.close()
        raise
    return sock

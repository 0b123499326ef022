"""The kernel's address and link events (rtnetlink, read from a raw AF_NETLINK socket): a trio task that calls
back, debounced (meshwg.mesh.debounce), when an interface or an address came or went, or a default route of the
main table did (a network switch that changes no address: two links up, their metrics swapped). The events only
say that something changed; what changed is read again by the caller (meshwg.io.agent.local_links)."""

from __future__ import annotations

import logging
import socket

import trio

from meshwg.io.oscfg.route_plan import MAIN_TABLE
from meshwg.io.oscfg.rtnl import RTM_DELLINK, RTM_DELROUTE, RTM_NEWLINK, RTM_NEWROUTE, messages, parse_route
from meshwg.mesh.debounce import Debounce

log = logging.getLogger(__name__)

RTM_NEWADDR, RTM_DELADDR = 20, 21
# Legacy group bits for bind(): RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR.
RTMGRP_LINK = 0x1
# RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE: of their events only the main table's default routes count (default_route).
RTMGRP_ROUTES = 0x40 | 0x400
GROUPS = RTMGRP_LINK | 0x10 | 0x100 | RTMGRP_ROUTES
KINDS = frozenset((RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR))
DEFAULTS = frozenset(("0.0.0.0/0", "::/0"))


def open_socket(groups: int = GROUPS) -> socket.socket | None:
    """A non-blocking socket subscribed to address and link events (`groups`: RTMGRP_* bits); None (logged) where
    netlink is unavailable."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
    except (OSError, AttributeError) as exc:   # AttributeError: a platform without AF_NETLINK
        log.info("no netlink address events (%s)", exc)
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, groups))
    except OSError as exc:
        sock.close()
        log.info("no netlink address events (%s)", exc)
        return None
    return sock


def default_route(kind: int, payload: bytes) -> bool:
    """Is this a main-table default route added, changed or removed? (Other routes, ours among them, churn for
    reasons that are no network switch.)"""
    if kind not in (RTM_NEWROUTE, RTM_DELROUTE):
        return False
    route = parse_route(payload)
    return route is not None and route.prefix in DEFAULTS and route.table == MAIN_TABLE


def classify(data: bytes) -> tuple[bool, bool]:
    """(an address, link or default-route event, a default-route event) in this buffer. Malformed messages end
    the parse, never raise."""
    hit = routed = False
    for kind, payload in messages(data):
        if default_route(kind, payload):
            hit = routed = True
        elif kind in KINDS:
            hit = True
    return hit, routed


def concerns(data: bytes) -> bool:
    """Does this buffer hold an address, link or default-route event?"""
    return classify(data)[0]


def drain_events(sock) -> tuple[bool, bool]:
    """Read every queued message: (one of them concerns us, one is a default-route event); both True when events
    were lost."""
    hit = routed = False
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return hit, routed
        except OSError:
            return True, True  # ENOBUFS: the kernel dropped events; re-read to be sure
        if not data:
            return hit, routed
        h, r = classify(data)
        hit, routed = hit or h, routed or r


def drain(sock) -> bool:
    """Read every queued message; True when one of them is an address, link or default-route event (or events
    were lost)."""
    return drain_events(sock)[0]


async def watch(sock, on_change, debounce: Debounce | None = None, on_default_route=None) -> None:
    """Call on_change() once per burst of address/link/default-route events (debounced on trio's clock), after
    on_default_route() when the burst held a default-route event. Runs until cancelled."""
    debounce = debounce or Debounce()
    routed = False
    while True:
        with trio.move_on_at(debounce.deadline()):
            await trio.lowlevel.wait_readable(sock)
        hit, r = drain_events(sock)
        routed = routed or r
        if hit:
            debounce.event(trio.current_time())
        if debounce.due(trio.current_time()):
            if routed and on_default_route is not None:
                on_default_route()
            routed = False
            on_change()

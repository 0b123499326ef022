"""The kernel's address and link events (rtnetlink, read from a raw AF_NETLINK socket): a trio task that calls
back, debounced (meshwg.mesh.debounce), when an interface or an address came or went. The events only say that
something changed; what changed is read again by the caller (meshwg.io.agent.local_links)."""

from __future__ import annotations

import logging
import socket

import trio

from meshwg.io.oscfg.rtnl import RTM_DELLINK, RTM_NEWLINK, messages
from meshwg.mesh.debounce import Debounce

log = logging.getLogger(__name__)

RTM_NEWADDR, RTM_DELADDR = 20, 21
# Legacy group bits for bind(): RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR.
RTMGRP_LINK = 0x1
GROUPS = RTMGRP_LINK | 0x10 | 0x100
KINDS = frozenset((RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR))


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


def concerns(data: bytes) -> bool:
    """Does this buffer hold an address or link event? (Malformed messages end the parse, never raise.)"""
    return any(kind in KINDS for kind, _ in messages(data))


def drain(sock) -> bool:
    """Read every queued message; True when one of them is an address or link event (or events were lost)."""
    hit = False
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return hit
        except OSError:
            return True  # ENOBUFS: the kernel dropped events; re-read to be sure
        if not data:
            return hit
        hit = hit or concerns(data)


async def watch(sock, on_change, debounce: Debounce | None = None) -> None:
    """Call on_change() once per burst of address/link events (debounced on trio's clock). Runs until cancelled."""
    debounce = debounce or Debounce()
    while True:
        with trio.move_on_at(debounce.deadline()):
            await trio.lowlevel.wait_readable(sock)
        if drain(sock):
            debounce.event(trio.current_time())
        if debounce.due(trio.current_time()):
            on_change()

"""The host's interfaces as `ip -j -d address show` prints them, with the tun/tap devices /sys names; which of
their addresses are candidates is decided in meshwg.mesh.local_candidates. When to read them again: on the
kernel's address, link and default-route events (meshwg.io.oscfg.netlink_events, debounced), with a slow
periodic read as a safety net (a frequent one where netlink is unavailable)."""

from __future__ import annotations

import json
import logging
import errno
import os
import socket
import subprocess
from contextlib import nullcontext

import trio

from meshwg.io.oscfg import netlink_events as NE
from meshwg.mesh import local_candidates as LC

log = logging.getLogger(__name__)
SYS_NET = "/sys/class/net"
FALLBACK_INTERVAL = 60.0   # with netlink events: re-read this often anyway (an event the kernel dropped)
POLL_INTERVAL = 10.0       # without them: re-read this often


def read_links() -> list:
    """The links with their addresses and linkinfo (-d: the interface kind); [] when `ip` fails."""
    proc = subprocess.run(["ip", "-j", "-d", "address", "show"], capture_output=True, text=True)
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        log.warning("ip -j -d address show: unreadable output")
        return []
    return links if isinstance(links, list) else []


def tun_names(sys_net: str = SYS_NET) -> frozenset:
    """Interfaces with a tun_flags file: tun/tap devices, even where `ip -d` prints no linkinfo for them."""
    try:
        names = os.listdir(sys_net)
    except OSError:
        return frozenset()
    return frozenset(n for n in names if os.path.exists(os.path.join(sys_net, n, "tun_flags")))


def local_addresses(exclude) -> tuple[list[str], list[str]]:
    """(candidate ips, every interface's CIDRs) of the host, `exclude` (our own interface) left out."""
    links = read_links()
    return LC.candidate_ips(links, exclude, tun_names=tun_names()), LC.interface_cidrs(links, exclude)


def address_is_local(ip: str) -> bool:
    """Is `ip` still one of this host's addresses? (Only a bind refused with EADDRNOTAVAIL says no.)"""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True


async def watch_changes(on_change, open_events=NE.open_socket, on_default_route=None) -> None:
    """await on_change() after each burst of address, link or default-route events, and when none came for a while;
    then await on_default_route() when the burst changed a default route (a switch that may change no address)."""
    sock = open_events()
    period = POLL_INTERVAL if sock is None else FALLBACK_INTERVAL
    news = [trio.Event()]
    routed = [False]

    def route_news() -> None:
        routed[0] = True

    with sock if sock is not None else nullcontext():
        async with trio.open_nursery() as nursery:
            if sock is not None:
                nursery.start_soon(NE.watch, sock, lambda: news[0].set(), None, route_news)
            while True:
                with trio.move_on_after(period):
                    await news[0].wait()
                news[0] = trio.Event()
                was_routed, routed[0] = routed[0], False
                await on_change()
                if was_routed and on_default_route is not None:
                    await on_default_route()

"""The host's interfaces as `ip -j -d address show` prints them, with the tun/tap devices /sys names; which of
their addresses are candidates is decided in meshwg.mesh.local_candidates."""

from __future__ import annotations

import json
import logging
import os
import subprocess

from meshwg.mesh import local_candidates as LC

log = logging.getLogger(__name__)
SYS_NET = "/sys/class/net"


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

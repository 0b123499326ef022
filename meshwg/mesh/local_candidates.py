"""Which of the host's interface addresses we offer peers as "local" candidates. Pure: the shell parses
`ip -j -d address show` (a list of links, each with its `addr_info` and `linkinfo`) and hands it in.

Left out, whatever their addresses: other VPNs (wireguard; tun/tap, which is how tailscale, OpenVPN, ZeroTier,
wireguard-go and other meshwg agents run), tunnels (vxlan, geneve, ipip, gre, sit, ...), container bridges
(docker0, br-*, virbr*, cni*, podman*, ...) and veth ends plugged into a bridge. A peer cannot reach us there,
and another agent's mesh address on the same host looked "direct" to us: two agents on one host picked
each other's mesh addresses and flapped paths. Kept: physical and wifi interfaces, vlan, bond, macvlan,
a standalone veth (a container's or a lab namespace's "eth0"), ppp, and a bridge a user set up (br0).

Independently of the interface, an address inside the mesh's own prefixes is never a candidate
(outside_networks; the agent core applies it with the welcome's prefixes, which arrive after the first read).
"""

from __future__ import annotations

import ipaddress
import re

from meshwg.disco.peer_paths import in_networks, parse_network

# linkinfo.info_kind values of VPN and tunnel interfaces.
VPN_KINDS = frozenset({"wireguard", "tun"})
TUNNEL_KINDS = frozenset({"vxlan", "geneve", "ipip", "gre", "gretap", "ip6gre", "ip6gretap", "erspan", "ip6erspan",
                          "sit", "ip6tnl", "vti", "vti6", "xfrm", "bareudp", "l2tp_eth", "gtp", "amt"})
# Bridges container and VM managers create (docker, podman, libvirt, CNI plugins, LXC/LXD, kube-router).
CONTAINER_BRIDGE = re.compile(r"(docker\d*|br-[0-9a-f]+|virbr\d*.*|cni.*|podman.*|lxcbr\d*|lxdbr\d*|kube-bridge"
                              r"|cbr\d*)")


def link_kind(link: dict, tun_names=()) -> str:
    """"vpn", "tunnel", "container" (left out) or "host" (kept). `tun_names`: interfaces the shell found with a
    /sys/class/net/NAME/tun_flags (a tun/tap device even when `ip` prints no linkinfo)."""
    name = link.get("ifname") or ""
    info = link.get("linkinfo") if isinstance(link.get("linkinfo"), dict) else {}
    kind = info.get("info_kind")
    if kind in VPN_KINDS or name in tun_names:
        return "vpn"
    if kind in TUNNEL_KINDS:
        return "tunnel"
    if kind == "bridge" and CONTAINER_BRIDGE.fullmatch(name):
        return "container"
    if kind == "veth" and info.get("info_slave_kind"):
        return "container"   # a bridge's port: the other end is in a container (or a VM's namespace)
    return "host"


def _usable(link: dict, exclude) -> bool:
    return (isinstance(link, dict) and link.get("ifname") not in exclude
            and "LOOPBACK" not in (link.get("flags") or []) and link.get("operstate") != "DOWN")


def link_cidrs(link: dict) -> list[str]:
    """The link's global unicast addresses with their prefix length ("192.168.1.5/24"); malformed ones skipped."""
    out = []
    for a in link.get("addr_info") or []:
        if not isinstance(a, dict) or a.get("scope") != "global" or a.get("tentative") or a.get("dadfailed"):
            continue
        try:
            ip = ipaddress.ip_address(str(a.get("local")))
        except ValueError:
            continue
        plen = a.get("prefixlen", ip.max_prefixlen)
        out.append(f"{ip}/{plen}")
    return out


def interface_cidrs(links, exclude=()) -> list[str]:
    """Global addresses of every up, non-loopback interface but `exclude` (all kinds: the networks our LAN and
    containers use, which peers' routes must not cover)."""
    return [c for link in links if _usable(link, exclude) for c in link_cidrs(link)]


def candidate_ips(links, exclude=(), mesh_prefixes=(), tun_names=()) -> list[str]:
    """The addresses (no prefix length) we offer peers as local candidates, in the links' order."""
    ips = [c.split("/")[0] for link in links
           if _usable(link, exclude) and link_kind(link, tun_names) == "host" for c in link_cidrs(link)]
    return list(outside_networks(ips, mesh_prefixes))


def outside_networks(ips, prefixes) -> tuple:
    """`ips` (address texts) without those inside `prefixes` (prefix texts or ip_networks, either family)."""
    nets = [p if isinstance(p, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else parse_network(p)
            for p in prefixes]
    nets = [n for n in nets if n is not None]
    out = []
    for text in ips:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not in_networks(ip, nets):
            out.append(text)
    return tuple(out)

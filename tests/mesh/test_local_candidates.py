"""Which interface addresses become our "local" candidates (meshwg/mesh/local_candidates.py, pure), read from a
canned `ip -j -d address show` of a host with eth0, wlan0, docker0, br-1234abcd5678, a veth in docker0, wg0,
tailscale0 (tun), meshwg1 (another agent's tun, in the mesh prefix), flannel.1 (vxlan), eth0.100 (vlan) and
br0 holding eth1; and that the agent core never offers an address inside the mesh's prefixes, even one it
read before the welcome named them (two agents on one host took each other's mesh addresses for direct paths).
"""

from __future__ import annotations

import copy
import json
import pathlib
import random

from nacl.public import PrivateKey

from meshwg.control.events import Connected, Welcome
from meshwg.mesh import agent_core as A
from meshwg.mesh.local_candidates import candidate_ips, interface_cidrs, link_kind, outside_networks
from meshwg.mesh.node import MeshNode
from meshwg.wg.device import WireGuardCore

HOST = json.loads((pathlib.Path(__file__).parent / "data" / "ip_addr_host.json").read_text())
MESH = ("100.64.0.0/10", "fd00::/48")


def by_name(name: str) -> dict:
    return copy.deepcopy(next(link for link in HOST if link["ifname"] == name))


def test_only_physical_wifi_vlan_and_a_user_bridge_are_candidates():
    assert candidate_ips(HOST, {"meshwg0"}, MESH) == ["192.168.1.20", "2001:db8:1::20", "10.0.0.7", "192.168.100.2",
                                                      "192.168.50.2", "2001:db8:50::2"]


def test_kinds():
    kinds = {link["ifname"]: link_kind(link) for link in HOST}
    assert kinds == {"lo": "host", "eth0": "host", "wlan0": "host", "docker0": "container",
                     "br-1234abcd5678": "container", "veth9f3c2e1": "container", "wg0": "vpn", "tailscale0": "vpn",
                     "meshwg1": "vpn", "eth0.100": "host", "flannel.1": "tunnel", "eth1": "host", "br0": "host"}


def test_tun_known_only_from_sys_is_left_out():
    """An older `ip` (or kernel) prints no linkinfo for a tun device: /sys/class/net/NAME/tun_flags says it."""
    tun = by_name("tailscale0")
    del tun["linkinfo"]
    assert candidate_ips([tun]) == ["100.101.102.103", "fd7a:115c:a1e0::1"]   # no hint: taken for a host NIC
    assert candidate_ips([tun], tun_names={"tailscale0"}) == []


def test_container_bridge_names_and_a_user_bridge():
    for name in ("docker0", "docker1", "br-0f1e2d3c4b5a", "virbr0", "virbr1-nic", "cni0", "cni-podman0", "podman1",
                 "lxcbr0", "lxdbr0"):
        link = by_name("br0") | {"ifname": name}
        assert candidate_ips([link]) == [], name
    for name in ("br0", "br1", "lan", "bridge0", "brlan"):
        assert candidate_ips([by_name("br0") | {"ifname": name}]) == ["192.168.50.2", "2001:db8:50::2"], name


def test_tunnel_kinds_are_left_out():
    for kind in ("vxlan", "geneve", "ipip", "gre", "gretap", "ip6gre", "sit", "ip6tnl", "vti", "wireguard", "tun"):
        link = by_name("eth0")
        link["linkinfo"] = {"info_kind": kind}
        assert candidate_ips([link]) == [], kind


def test_kept_kinds():
    """A standalone veth is a container's (or a lab namespace's) own eth0; bond, macvlan, vlan, dummy stay."""
    for kind in ("veth", "bond", "macvlan", "ipvlan", "vlan", "dummy", "team"):
        link = by_name("wlan0")
        link["linkinfo"] = {"info_kind": kind}
        assert candidate_ips([link]) == ["10.0.0.7"], kind


def test_mesh_prefixes_are_dropped_on_any_interface_in_both_families():
    eth = by_name("eth0")
    eth["addr_info"] += [{"family": "inet", "local": "100.64.3.4", "prefixlen": 10, "scope": "global"},
                         {"family": "inet6", "local": "fd00::9", "prefixlen": 64, "scope": "global"}]
    assert candidate_ips([eth], (), MESH) == ["192.168.1.20", "2001:db8:1::20"]
    # without the mesh's prefixes (before a welcome) they are still there: the core filters again later
    assert candidate_ips([eth]) == ["192.168.1.20", "2001:db8:1::20", "100.64.3.4", "fd00::9"]


def test_a_cgnat_address_on_a_physical_interface_stays_outside_the_mesh_prefix():
    """The ISP's carrier-grade NAT hands the WAN interface a 100.64.0.0/10 address: a real path, unless the mesh
    uses that range; on a wireguard/tun interface it is another mesh VPN's and never a candidate."""
    wan = by_name("eth0")
    wan["addr_info"] = [{"family": "inet", "local": "100.72.1.2", "prefixlen": 24, "scope": "global"}]
    assert candidate_ips([wan], (), ("10.77.0.0/16",)) == ["100.72.1.2"]
    assert candidate_ips([wan | {"linkinfo": {"info_kind": "wireguard"}}], (), ("10.77.0.0/16",)) == []


def test_networks_still_cover_every_interface():
    """The LAN networks peers' routes must not cover include containers' and other VPNs' (unchanged)."""
    assert interface_cidrs(HOST, {"meshwg1"}) == [
        "192.168.1.20/24", "2001:db8:1::20/64", "10.0.0.7/24", "172.17.0.1/16", "172.18.0.1/16", "10.200.0.1/30",
        "10.8.0.2/24", "100.101.102.103/32", "fd7a:115c:a1e0::1/128", "192.168.100.2/24", "10.244.0.0/32",
        "192.168.50.2/24", "2001:db8:50::2/64"]


def test_down_loopback_excluded_and_malformed_input_never_raises():
    down = by_name("eth0") | {"operstate": "DOWN"}
    junk = [None, 7, {"ifname": "x", "addr_info": [None, {"scope": "global", "local": "not-an-ip"},
                                                    {"scope": "global"}]},
            {"ifname": "y", "linkinfo": "bridge", "addr_info": "nope"}]
    assert candidate_ips([down, by_name("lo"), *junk], (), MESH) == []
    assert candidate_ips([by_name("eth0")], {"eth0"}) == []
    assert outside_networks(["192.0.2.1", "bogus", "100.64.0.1"], ["100.64.0.0/10", "", "junk"]) == ("192.0.2.1",)


# ---- the agent core: the mesh prefixes come with the welcome ---------------------------------------
WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), ())


def local(acts) -> list:
    regs = [a for a in acts if isinstance(a, (A.RegisterCandidates, A.ReportCandidates))]
    return [tuple(c[:2]) for c in regs[-1].candidates if c[2] == "local"] if regs else None


def test_core_drops_mesh_addresses_read_before_the_welcome():
    """Another agent's mesh address read at start (before any welcome) goes once the welcome names the prefixes."""
    core = new_core()
    acts = core.apply([A.LocalAddresses(("192.168.1.5", "100.64.0.2", "fd00::2"), 5000)], 0.0)
    assert local(acts) == [("192.168.1.5", 5000), ("100.64.0.2", 5000), ("fd00::2", 5000)]
    acts = core.apply([Connected(WELCOME)], 1.0)
    assert local(acts) == [("192.168.1.5", 5000)]
    assert core.node.iface_endpoints == (("192.168.1.5", 5000),)


def test_core_drops_mesh_addresses_read_after_the_welcome():
    core = new_core()
    core.apply([Connected(WELCOME)], 0.0)
    core.apply([A.LocalAddresses(("192.168.1.5", "100.64.0.2", "2001:db8::5", "fd00::2"), 5000)], 1.0)
    assert core.node.iface_endpoints == (("192.168.1.5", 5000), ("2001:db8::5", 5000))

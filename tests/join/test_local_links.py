"""The agent's read of the host's interfaces (meshwg/io/agent/local_links.py) on a real kernel: in a namespace of
its own with a veth eth0, a user's bridge br0, docker0 with a container's veth in it, a tun device named like
tailscale's and a vxlan, only eth0's and br0's addresses are candidates; every interface's networks still are
LAN networks. And the /sys tun_flags hint."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import require_real_components
from meshwg.io.agent import local_links
from scenarios.netns import Netns, veth, wait_for

# Holds tailscale0 open (a tun with no reader has no carrier and is DOWN, which the old read left out too).
HOLD_TUN = ("import fcntl, struct, time; f = open('/dev/net/tun', 'rb'); "
            "fcntl.ioctl(f, 0x400454ca, struct.pack('16sH', b'tailscale0', 0x1001)); time.sleep(60)")
READ = ("import json, sys; from meshwg.io.agent.local_links import local_addresses; "
        "print(json.dumps(local_addresses({'meshwg0'})))")


def test_only_host_interfaces_are_candidates_in_a_namespace():
    require_real_components("ip")
    host, other = Netns("mlc"), Netns("mlo")
    try:
        veth(host, "eth0", ["192.168.7.2/24", "2001:db8:7::2/64"], other, "eth0", ["192.168.7.1/24"])
        run = host.run
        run("ip", "link", "add", "br0", "type", "bridge")
        run("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
        run("ip", "link", "set", "eth1", "master", "br0")
        run("ip", "link", "add", "docker0", "type", "bridge")
        run("ip", "link", "add", "vethc0", "type", "veth", "peer", "name", "vethc1")
        run("ip", "link", "set", "vethc0", "master", "docker0")
        run("ip", "tuntap", "add", "dev", "tailscale0", "mode", "tun")
        run("ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", "dev", "eth0")
        for dev, addr in (("br0", "192.168.50.2/24"), ("docker0", "172.17.0.1/16"), ("vethc0", "10.200.0.1/30"),
                          ("tailscale0", "100.101.102.103/32"), ("vx0", "10.244.0.0/32")):
            run("ip", "addr", "add", addr, "dev", dev)
        for dev in ("eth1", "eth1p", "br0", "docker0", "vethc0", "vethc1", "tailscale0", "vx0"):
            run("ip", "link", "set", dev, "up")
        host.popen(sys.executable, "-c", HOLD_TUN)
        up = ("eth0", "br0", "docker0", "vethc0", "tailscale0", "vx0")
        wait_for(lambda: all(json.loads(run("ip", "-j", "link", "show", d))[0]["operstate"] != "DOWN" for d in up),
                 timeout=10, what="every interface up")
        out = subprocess.run(host.argv(sys.executable, "-c", READ), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        ips, cidrs = json.loads(out.stdout)
        assert sorted(ips) == ["192.168.50.2", "192.168.7.2", "2001:db8:7::2"]
        assert sorted(cidrs) == ["10.200.0.1/30", "10.244.0.0/32", "100.101.102.103/32", "172.17.0.1/16",
                                 "192.168.50.2/24", "192.168.7.2/24", "2001:db8:7::2/64"]
    finally:
        host.close()
        other.close()


def test_tun_names_from_sys(tmp_path):
    for name, tun in (("eth0", False), ("tun0", True), ("tailscale0", True), ("docker0", False)):
        (tmp_path / name).mkdir()
        if tun:
            (tmp_path / name / "tun_flags").write_text("0x1001\n")
    assert local_links.tun_names(str(tmp_path)) == {"tun0", "tailscale0"}
    assert local_links.tun_names(str(tmp_path / "missing")) == frozenset()

"""Names in real namespaces (issue 15): two `meshwg join` agents; alpha asks beta's mesh address for
beta.<domain> over the tunnel (UDP and TCP) and gets beta's mesh address; alpha runs with --accept-dns, so
`getent hosts beta.<domain>` works inside its namespace through the per-namespace /etc/netns/<ns>/resolv.conf that
`ip netns exec` mounts over /etc/resolv.conf (the host's own resolver is never touched), and the file is as it was
once the agent stops."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from conftest import require_real_components
from joinnet import BridgeNet, ENV, PY, REPO
from scenarios.netns import wait_for

pytestmark = pytest.mark.netns

ORIGINAL = "nameserver 192.0.2.53\nsearch example.org\n"   # a documentation address: nothing answers there
QUERY = r"""
import socket, sys
from dnslib import DNSRecord
name, server, proto = sys.argv[1], sys.argv[2], sys.argv[3]
q = DNSRecord.question(name).pack()
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
if proto == "udp":
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(q, (server, 53)); data = s.recv(4096)
else:
    s = socket.create_connection((server, 53), timeout=2); s.sendall(len(q).to_bytes(2, "big") + q)
    data = b""
    while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
        data += s.recv(4096)
    data = data[2:]
r = DNSRecord.parse(data)
print(" ".join(str(x.rdata) for x in r.rr) or "rcode=%d" % r.header.rcode)
"""


def ask(node, name: str, server: str, proto: str = "udp") -> str:
    res = subprocess.run(node.ns.argv(PY, "-c", QUERY, name, server, proto), capture_output=True, text=True,
                         env=ENV, cwd=REPO, timeout=10)
    return res.stdout.strip() if res.returncode == 0 else ""


def test_names_answered_over_the_mesh_and_accept_dns_in_the_namespace():
    require_real_components("ip", "ping", "getent")
    net = BridgeNet(83)
    etc = None
    try:
        invite = net.start_server("--dns-domain", "Mesh.Test")
        a, b = net.node("alpha"), net.node("beta")
        etc = f"/etc/netns/{a.ns.name}"
        os.makedirs(etc, exist_ok=True)
        with open(f"{etc}/resolv.conf", "w") as f:
            f.write(ORIGINAL)
        a.start(invite, "--accept-dns")
        b.start(invite)
        ip_b = wait_for(b.mesh_ip, timeout=20, what="beta's address")
        ip_a = wait_for(a.mesh_ip, timeout=20, what="alpha's address")
        wait_for(lambda: a.peer("beta") and b.peer("alpha"), timeout=20, what="the two see each other")
        wait_for(lambda: ask(a, "beta.mesh.test", ip_b) == ip_b, timeout=20, what="beta answers alpha's query")
        assert ask(a, "BETA.Mesh.Test", ip_b, "tcp") == ip_b
        assert ask(a, "alpha.mesh.test", ip_b) == ip_a
        assert ask(a, "nobody.mesh.test", ip_b) == "rcode=3"     # NXDOMAIN
        assert ask(a, "example.com", ip_b) == "rcode=5"          # REFUSED: no open resolver
        # --accept-dns: alpha's resolver asks alpha first, for beta's name
        text = wait_for(lambda: a.ns.run("cat", "/etc/resolv.conf") if "mesh.test" in
                        a.ns.run("cat", "/etc/resolv.conf") else None, timeout=20, what="alpha's resolv.conf")
        assert f"nameserver {ip_a}" in text and "search mesh.test example.org" in text
        out = wait_for(lambda: a.ns.run("getent", "hosts", "beta.mesh.test", check=False).strip(), timeout=10,
                       what="getent hosts beta.mesh.test")
        addrs_b = {x.split("/")[0] for x in (b.status() or {})["addresses"]}   # glibc may list the IPv6 first
        assert out.split()[0] in addrs_b and out.split()[1] == "beta.mesh.test"
        assert ip_b in a.ns.run("getent", "ahosts", "beta", check=False).split()   # the short name, via search
        assert (a.status() or {})["dns"]["domain"] == "mesh.test"
        a.stop()
        with open(f"{etc}/resolv.conf") as f:
            assert f.read() == ORIGINAL
    except BaseException:
        net.print_logs()
        raise
    finally:
        net.close()
        if etc is not None:
            shutil.rmtree(etc, ignore_errors=True)

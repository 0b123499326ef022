"""Access control end to end (issue 13): `meshwg-signal serve --policy` and three `meshwg join` nodes on a bridge.

alpha may reach beta on tcp/5001 and icmp; nobody else may reach anyone. Then: alpha pings beta and completes a
TCP transfer; beta's new flows to alpha are dropped by alpha's filter (and counted), although beta sees alpha;
gamma and the others never hear of each other (no peer, no tunnel) either way. A policy change applies within 1 s:
beta's pings to alpha pass, and alpha's established TCP connection to beta stops once tcp/5001 is taken away.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import require_real_components
from joinnet import ENV, PY, REPO, BridgeNet
from scenarios.netns import wait_for

pytestmark = pytest.mark.netns

OPEN = '[[rule]]\nfrom = ["*"]\nto = ["*"]\nports = ["icmp"]\n'            # valid before any node has joined
ALPHA_TO_BETA = '[[rule]]\nfrom = ["alpha"]\nto = ["beta"]\nports = ["tcp:5001", "icmp"]\n'
BETA_PINGS_ALPHA = '[[rule]]\nfrom = ["beta"]\nto = ["alpha"]\nports = ["icmp"]\n'
ALPHA_PINGS_BETA = '[[rule]]\nfrom = ["alpha"]\nto = ["beta"]\nports = ["icmp"]\n'

# beta: an echo server on tcp/5001. alpha: a client that checks a 1 MB round trip, then one more after each line
# on its stdin, printing ok or timeout (1 s), so the same connection is tried before and after a change.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5001)); s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    while (d := c.recv(65536)):
        c.sendall(d)
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5001), timeout=3)
blob = bytes(range(256)) * 4096
c.sendall(blob); got = b""
while len(got) < len(blob):
    got += c.recv(65536)
print("transfer", got == blob, flush=True)
for line in sys.stdin:
    c.settimeout(1.0)
    try:
        c.sendall(b"x" * 100); print("ok" if c.recv(100) else "closed", flush=True)
    except OSError:
        print("timeout", flush=True)
"""


def write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)   # the server sees one whole file


def names(node) -> set:
    return {p["name"] for p in (node.status() or {}).get("peers", [])}


def counter(node, key: str) -> int:
    res = subprocess.run(node.ns.argv(PY, "-m", "meshwg", "status", "-d", "--json", "-i", node.iface),
                         capture_output=True, text=True, env=ENV, cwd=REPO, timeout=20)
    import json
    return json.loads(res.stdout)["counters"].get(key, 0)


def ping_within(node, ip: str, seconds: float) -> float | None:
    """Seconds from now until a ping sent then is answered, if one sent within `seconds` is."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        sent = time.monotonic() - t0
        if node.ping(ip, wait=0.3):
            return sent
    return None


def test_three_nodes_under_a_policy():
    require_real_components("ip", "ping")
    net = BridgeNet(79)
    server = client = None
    try:
        policy = os.path.join(net.dir, "policy.toml")
        write(policy, OPEN)
        invite = net.start_server("--policy", policy)
        a, b, g = net.node("alpha"), net.node("beta"), net.node("gamma")
        for n in (a, b, g):
            n.start(invite)
        ip = {n.name: wait_for(n.mesh_ip, timeout=15, what=f"{n.name}'s address") for n in (a, b, g)}
        wait_for(lambda: names(a) == {"beta", "gamma"}, timeout=15, what="everyone sees everyone under OPEN")

        write(policy, ALPHA_TO_BETA)
        wait_for(lambda: names(g) == set() and names(a) == {"beta"} and names(b) == {"alpha"}, timeout=10,
                 what="gamma hidden, alpha and beta see each other")
        wait_for(lambda: (b.peer("alpha") or {}).get("accepts") == "tcp/5001 icmp", timeout=5, what="beta's filter")
        assert (a.peer("beta") or {}).get("accepts") == "replies only"
        wait_for(lambda: a.ping(ip["beta"]), timeout=10, what="alpha pings beta")

        server = b.ns.popen(PY, "-c", SERVER, ip["beta"], stdout=subprocess.PIPE, text=True, env=ENV)
        assert server.stdout.readline().strip() == "listening"
        client = a.ns.popen(PY, "-c", CLIENT, ip["beta"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=ENV)
        assert client.stdout.readline().strip() == "transfer True"

        before = counter(a, "core.drop_acl_not_allowed")
        assert not b.ping(ip["alpha"], count=2)                     # beta sees alpha, alpha's filter drops it
        assert counter(a, "core.drop_acl_not_allowed") >= before + 2
        res = subprocess.run(b.ns.argv(PY, "-c", f"import socket; socket.create_connection(('{ip['alpha']}', 22), 2)"),
                             capture_output=True, timeout=20)
        assert res.returncode != 0
        for x, y in ((g, "alpha"), (g, "beta"), (a, "gamma"), (b, "gamma")):
            assert not x.ping(ip[y]), f"{x.name} reached {y}"

        write(policy, ALPHA_TO_BETA + BETA_PINGS_ALPHA)
        sent = ping_within(b, ip["alpha"], 5.0)
        assert sent is not None and sent < 1.0, f"beta's first answered ping to alpha was sent {sent} s after"

        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "ok"             # the established connection, still allowed
        t0 = time.monotonic()
        write(policy, ALPHA_PINGS_BETA + BETA_PINGS_ALPHA)          # tcp/5001 taken away
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))       # the change is in force 1 s later
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "timeout"        # beta's filter drops alpha's segments now
        assert a.ping(ip["beta"])
    except BaseException:
        net.print_logs()
        raise
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=5)
        net.close()


# Four nodes (issue 13's lab): alpha -> beta and delta -> gamma are the allowed pairs (tcp/5001 and icmp); delta may
# send beta udp/9 only, so the two hold a tunnel and every other flow between them is denied, both ways.
FOUR = ('[[rule]]\nfrom = ["alpha"]\nto = ["beta"]\nports = ["tcp:5001", "icmp"]\n'
        '[[rule]]\nfrom = ["delta"]\nto = ["gamma"]\nports = ["tcp:5001", "icmp"]\n'
        '[[rule]]\nfrom = ["delta"]\nto = ["beta"]\nports = ["udp:9"]\n')
NO_DELTA_GAMMA = ('[[rule]]\nfrom = ["alpha"]\nto = ["beta"]\nports = ["tcp:5001", "icmp"]\n'
                  '[[rule]]\nfrom = ["delta"]\nto = ["beta"]\nports = ["udp:9"]\n')

# An ICMP echo with a forged IPv4 source written into the sender's mesh interface (IPPROTO_RAW: the header is ours).
FORGE = """
import socket, struct, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def csum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for seq in range(n):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4d57, seq) + b"forged!!" * 4
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0x1000 + seq, 0, 64, 1, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    sock.sendto(ip + icmp, (dst, 0))
print("sent", n, flush=True)
"""


def rx_packets(node) -> int:
    """What the node's mesh interface delivered to its kernel (the TUN's rx counter)."""
    return int(node.ns.run("cat", f"/sys/class/net/{node.iface}/statistics/rx_packets").strip())


def transfer(src, dst_node, ip: str) -> None:
    """A 1 MB echo round trip from `src` to `dst_node` over tcp/5001."""
    server = dst_node.ns.popen(PY, "-c", SERVER, ip, stdout=subprocess.PIPE, text=True, env=ENV)
    client = None
    try:
        assert server.stdout.readline().strip() == "listening"
        client = src.ns.popen(PY, "-c", CLIENT, ip, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
        assert client.stdout.readline().strip() == "transfer True", f"{src.name} -> {dst_node.name}"
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=5)


def lost_within(node, ip: str, seconds: float) -> float | None:
    """Seconds from now until a ping sent then goes unanswered, if one sent within `seconds` does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        sent = time.monotonic() - t0
        if not node.ping(ip, wait=0.3):
            return sent
    return None


def test_four_nodes_allowed_pairs_denied_pairs_and_a_forged_source():
    require_real_components("ip", "ping")
    net = BridgeNet(80)
    try:
        policy = os.path.join(net.dir, "policy.toml")
        write(policy, OPEN)
        invite = net.start_server("--policy", policy)
        a, b, g, d = (net.node(n) for n in ("alpha", "beta", "gamma", "delta"))
        for n in (a, b, g, d):
            n.start(invite)
        ip = {n.name: wait_for(n.mesh_ip, timeout=15, what=f"{n.name}'s address") for n in (a, b, g, d)}
        wait_for(lambda: names(a) == {"beta", "gamma", "delta"}, timeout=15, what="everyone sees everyone")

        write(policy, FOUR)
        wait_for(lambda: (names(a), names(b), names(g), names(d)) == ({"beta"}, {"alpha", "delta"}, {"delta"},
                                                                      {"beta", "gamma"}), timeout=10,
                 what="each node sees only the peers it may reach or be reached by")
        # item 4: both directions in one line, each side's view the mirror of the other's
        wait_for(lambda: (a.peer("beta") or {}).get("sends") == "tcp/5001 icmp", timeout=5, what="alpha's offers")
        assert (a.peer("beta") or {}).get("accepts") == "replies only"
        wait_for(lambda: (b.peer("delta") or {}).get("accepts") == "udp/9", timeout=5, what="beta's filter")
        assert (b.peer("delta") or {}).get("sends") == "replies only"
        assert (d.peer("beta") or {}).get("sends") == "udp/9"
        shown = a.meshwg("status", "-d")
        assert "    sends: tcp/5001 icmp; accepts: replies only" in shown.stdout.splitlines(), shown.stdout

        # allowed pairs: ping and a TCP transfer
        wait_for(lambda: a.ping(ip["beta"]), timeout=10, what="alpha pings beta")
        wait_for(lambda: d.ping(ip["gamma"]), timeout=10, what="delta pings gamma")
        transfer(a, b, ip["beta"])
        transfer(d, g, ip["gamma"])

        # denied pairs with a tunnel: dropped by the receiver's filter, both directions, and counted
        for src, dst in ((b, a), (g, d), (d, b), (b, d)):
            before = counter(dst, "core.drop_acl_not_allowed")
            assert not src.ping(ip[dst.name], count=2), f"{src.name} reached {dst.name}"
            assert counter(dst, "core.drop_acl_not_allowed") >= before + 2, f"{dst.name} did not count {src.name}"
        # denied pairs without one: neither knows the other
        for x, y in ((a, "gamma"), (g, "alpha"), (a, "delta"), (d, "alpha"), (b, "gamma"), (g, "beta")):
            assert not x.ping(ip[y]), f"{x.name} reached {y}"

        # delta forges alpha's address (allowed to ping beta) inside its own tunnel to beta: cryptokey routing
        # drops every one before the filter or the kernel sees it
        before, rx = counter(b, "core.drop_source_not_allowed"), rx_packets(b)
        out = d.ns.run(PY, "-c", FORGE, ip["alpha"], ip["beta"], "5")
        assert out.strip() == "sent 5"
        wait_for(lambda: counter(b, "core.drop_source_not_allowed") >= before + 5, timeout=5,
                 what="beta's source check drops the forged packets")
        assert rx_packets(b) == rx, "a forged packet reached beta's kernel"

        # changes apply within 1 s: a new allowed flow passes, a removed pair stops
        write(policy, FOUR + BETA_PINGS_ALPHA)
        sent = ping_within(b, ip["alpha"], 5.0)
        print(f"beta -> alpha allowed: first answered ping sent {sent} s after the write")
        assert sent is not None and sent < 1.0
        write(policy, NO_DELTA_GAMMA + BETA_PINGS_ALPHA)
        lost = lost_within(d, ip["gamma"], 5.0)
        print(f"delta -> gamma taken away: first lost ping sent {lost} s after the write")
        assert lost is not None and lost < 1.0
        time.sleep(0.2)
        assert not d.ping(ip["gamma"], count=2) and not g.ping(ip["delta"])
        assert a.ping(ip["beta"])
    except BaseException:
        net.print_logs()
        raise
    finally:
        net.close()

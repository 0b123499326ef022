"""Bad input: random UDP datagrams (and well-formed WireGuard headers carrying garbage)
flooded at a meshwg device while an established tunnel carries a TCP transfer.

The flooder runs for the whole transfer and switches its target every second between the device's
port ("flood" phases) and a closed port on the same host ("control" phases), so both kinds of phase
pay the same flooder CPU and kernel cost on this 2-core machine; only the device's own handling of
the junk differs. Throughput in flood phases must stay >= 80% of control phases, the device must
survive, and its drop counters (logged by meshwg-tun) must account for the junk. Also: a TUN packet
with no matching peer is dropped and counted as no_route.

The flood rate is 100 k junk datagrams/s (MESHWG_FLOOD_RATE overrides; 0 = unthrottled, as fast as one
flooder core can send: ~165-185 k/s here). The socket filter (meshwg.io.dataplane.socket_filter) drops in the
kernel what is misshapen or names a receiver index the device never issued; only initiation-shaped
garbage reaches Python, where mac1 fails. Measured on the 2-core machine (the flooder, both devices and
the TCP ends share it): flood/control 0.94-1.05 at 100 k/s; 0.74-0.90 unthrottled (most runs >= 0.8; 0.89
and 0.90 with the compiled hot path). Before the filter TCP collapsed when unthrottled and kept 0.59-0.70
at 50 k/s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from scenarios.netns import Netns, unique_name, veth, wait_for
from conftest import require_real_components  # tests/conftest.py
from wgnet import ENV, RUN_DIR, genkey

PHASE = 1.0          # seconds per flood/control phase
PHASES = 12          # the first two are warm-up
PORT_A, PORT_B, CLOSED_PORT = 51850, 51851, 51999
FLOOD_RATE = float(os.environ.get("MESHWG_FLOOD_RATE", "100000"))
# A tunnel this slow in the control phases is broken, whatever the ratio says.
MIN_CONTROL_BYTES_PER_PHASE = 4_000_000

# Junk of every kind at FLOOD_RATE datagrams/s (each phase switch re-targets).
FLOODER = textwrap.dedent("""
    import os, random, socket, struct, sys, time
    host, port, closed, t0, phase, phases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    rate = float(sys.argv[7])  # datagrams per second, 0 = as fast as possible
    rnd = random.Random(7)
    junk = []
    for i in range(4096):
        kind = i % 6
        if kind == 0:   # transport header, random receiver index and counter, padded-looking size
            body = os.urandom(16 * rnd.randint(1, 88))
            junk.append(struct.pack("<IIQ", 4, rnd.getrandbits(32), rnd.getrandbits(64)) + body)
        elif kind == 1: # initiation-sized garbage
            junk.append(struct.pack("<I", 1) + os.urandom(144))
        elif kind == 2: # response-sized garbage
            junk.append(struct.pack("<I", 2) + os.urandom(88))
        elif kind == 3: # cookie-reply-sized garbage
            junk.append(struct.pack("<I", 3) + os.urandom(60))
        elif kind == 4: # truncated WireGuard headers
            junk.append(bytes([rnd.randint(1, 4), 0, 0, 0])[: rnd.randint(1, 4)] + os.urandom(rnd.randint(0, 27)))
        else:           # anything at all
            junk.append(os.urandom(rnd.randint(1, 1400)))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    sent = {True: 0, False: 0}
    n = len(junk)
    i = 0
    end = t0 + phase * phases
    start = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= end:
            break
        flood = now >= t0 and int((now - t0) / phase) % 2 == 1
        dst = (host, port if flood else closed)
        if rate and i > (now - start) * rate:
            time.sleep(0.0005)
            continue
        for _ in range(64):
            try:
                s.sendto(junk[i % n], dst)
                sent[flood] += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
            i += 1
    print(sent[True], sent[False])
""")

# TCP sink: bytes received per phase, by the same monotonic clock as the flooder.
SINK = textwrap.dedent("""
    import socket, sys, time
    addr, port, t0, phase, phases = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((addr, port)); srv.listen(1)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(5)
    buf = bytearray(1 << 16)
    got = [0] * phases
    end = t0 + phase * phases
    while True:
        n = conn.recv_into(buf)
        now = time.monotonic()
        if not n or now >= end:
            break
        if now >= t0:
            got[int((now - t0) / phase)] += n
    print(" ".join(map(str, got)), flush=True)
""")

SOURCE = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    data = memoryview(bytes(1 << 20))
    end = float(sys.argv[3])
    try:
        while time.monotonic() < end:
            s.sendall(data)
    except OSError:
        pass
""")


class MeshwgTun:
    def __init__(self, ns: Netns, prefix: str, port: int, addr: str, logfile: str):
        self.ns, self.port = ns, port
        self.iface = unique_name(prefix)  # distinct prefixes: the UAPI socket dir is shared
        self.sk, self.pk = genkey()
        self.logfile = logfile
        env = {**os.environ, **ENV, "LOG_LEVEL": "info", "MESHWG_LOG_FILE": logfile, "MESHWG_STATS_INTERVAL": "1"}
        self.proc = ns.popen("meshwg-tun", "-f", self.iface, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        sock = os.path.join(RUN_DIR, f"{self.iface}.sock")
        wait_for(lambda: os.path.exists(sock) or self.proc.poll() is not None, 15, what=f"{self.iface} socket")
        assert self.proc.poll() is None
        keyfile = f"/tmp/{self.iface}.key"
        with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.sk + "\n")
        try:
            ns.run("wg", "set", self.iface, "private-key", keyfile, "listen-port", str(port))
        finally:
            os.unlink(keyfile)
        ns.run("ip", "addr", "add", addr, "dev", self.iface)
        ns.run("ip", "link", "set", self.iface, "up")

    def drops(self) -> dict[str, int]:
        """The last drop line meshwg-tun logged."""
        with open(self.logfile) as f:
            lines = [line for line in f if "drops:" in line]
        if not lines:
            return {}
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("drops:", 1)[1])}


def _python(ns: Netns, script: str, *args, **kwargs) -> subprocess.Popen:
    return ns.popen(sys.executable, "-c", script, *map(str, args), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.netns
def test_flood_of_junk_does_not_crash_or_slow_the_tunnel():
    require_real_components("ip", "wg", "ping")
    logs = [f"/tmp/{unique_name('fllog')}.log" for _ in range(2)]
    a, b = Netns("fla"), Netns("flb")
    try:
        veth(a, "eth0", ["192.168.93.1/24"], b, "eth0", ["192.168.93.2/24"])
        da = MeshwgTun(a, "fla", PORT_A, "10.93.0.1/24", logs[0])
        db = MeshwgTun(b, "flb", PORT_B, "10.93.0.2/24", logs[1])
        da.ns.run("wg", "set", da.iface, "peer", db.pk, "allowed-ips", "10.93.0.2/32",
                  "endpoint", f"192.168.93.2:{PORT_B}")
        db.ns.run("wg", "set", db.iface, "peer", da.pk, "allowed-ips", "10.93.0.1/32",
                  "endpoint", f"192.168.93.1:{PORT_A}")
        a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.93.0.2")

        # A TUN packet with no matching peer: routed into the interface (10.93.0.0/24), no peer owns it.
        a.run("ping", "-c", "5", "-i", "0.05", "-W", "1", "10.93.0.77", check=False)

        t0 = time.monotonic() + 1.5
        sink = _python(b, SINK, "10.93.0.2", 5201, t0, PHASE, PHASES)
        assert sink.stdout.readline().strip() == "ready"
        source = _python(a, SOURCE, "10.93.0.2", 5201, t0 + PHASE * PHASES + 0.5)
        flooder = _python(a, FLOODER, "192.168.93.2", PORT_B, CLOSED_PORT, t0, PHASE, PHASES, FLOOD_RATE)
        out, err = flooder.communicate(timeout=PHASE * PHASES + 30)
        assert flooder.returncode == 0, err
        flood_sent, control_sent = map(int, out.split())
        got = list(map(int, sink.communicate(timeout=30)[0].split()))
        source.wait(timeout=30)

        assert db.proc.poll() is None, "meshwg-tun died under the flood"
        a.run("ping", "-c", "2", "-W", "2", "10.93.0.2")  # the tunnel still works

        control = sum(got[k] for k in range(2, PHASES) if k % 2 == 0)
        flood = sum(got[k] for k in range(2, PHASES) if k % 2 == 1)
        print(f"\njunk sent: {flood_sent} to the device, {control_sent} to a closed port; "
              f"TCP bytes per phase {got}; flood/control = {flood / control:.2f}")
        control_phases = (PHASES - 2) // 2
        assert control >= MIN_CONTROL_BYTES_PER_PHASE * control_phases, f"the tunnel barely moves data: {got}"
        time.sleep(1.5)
        print(f"device drops: {db.drops()}; sender drops: {da.drops()}")
        assert flood >= 0.8 * control, f"throughput under flood {flood} < 80% of control {control}"

        time.sleep(1.5)  # one more stats interval
        drops = db.drops()
        print(f"device drops: {drops}; sender drops: {da.drops()}")
        junk_counted = sum(v for k, v in drops.items() if k not in ("no_route",))
        # Every junk datagram is dropped and counted: by the socket filter in the kernel ("socket":
        # truncated, misshapen, naming an index the device never issued) or by the core (initiation-
        # shaped garbage fails mac1). The flooder counts what left its socket; a few may be lost on the way.
        assert junk_counted >= 0.9 * flood_sent, (junk_counted, flood_sent)
        for reason in ("socket", "bad_mac1"):
            assert drops.get(reason, 0) > 0, (reason, drops)
        assert da.drops().get("no_route", 0) >= 5, da.drops()
    finally:
        a.close()
        b.close()
        for log in logs:
            try:
                os.unlink(log)
            except FileNotFoundError:
                pass

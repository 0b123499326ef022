"""Forwarding microbenchmark: packets a second per core of the server's UDP relay, several pairs at once.

A relay-only server process on 127.0.0.1 (fwd_server.py; no meshwg nodes): 2 x --pairs emulated nodes HELLO
with their own keys, then one sender process floods SEND frames of --size bytes (WireGuard-transport-like,
type 4) both ways over every pair for --time seconds. The server's CPU seconds come from /proc, its forwarded
packets from its counters at exit. Loopback only.

    .venv/bin/python benchmarks/relay/forward.py [--pairs 4] [--time 5] [--size 1400] [--profile FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(HERE))

from procstat import cpu_seconds  # noqa: E402

from meshwg.control.relay_client import RelaySession  # noqa: E402
from meshwg.wg.crypto import clamp, dh_pub  # noqa: E402


class Node:
    def __init__(self, server_pk: bytes, server) -> None:
        self.sk = os.urandom(32)
        self.pub = dh_pub(clamp(self.sk))
        self.rs = RelaySession(self.sk, server_pk, os.urandom)
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.settimeout(3)

    def hello(self) -> None:
        self.sock.sendto(self.rs.hello(time.monotonic(), time.time()), self.server)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data, _ = self.sock.recvfrom(65535)
            event = self.rs.handle_untrusted(data, time.monotonic())
            if event is not None and event[0] == "ready":
                self.sock.sendto(self.rs.confirm(), self.server)
                return
        raise RuntimeError("no HELLO_OK")


def flood(frames, server, seconds: float, rate: float) -> None:
    """Send the frames round-robin for `seconds`: as fast as one core can (rate 0), or paced at `rate`
    packets a second one at a time (busy-waiting: the server wakes per packet, as under a TCP flow)."""
    for sock, _ in frames:
        sock.setblocking(False)
    now = time.monotonic()
    end, gap, due = now + seconds, 1.0 / rate if rate else 0.0, now
    burst = 1 if rate else 16
    while time.monotonic() < end:
        for sock, frame in frames:
            if gap:
                while time.monotonic() < due:
                    pass
                due += gap
            for _ in range(burst):
                try:
                    sock.sendto(frame, server)
                except (BlockingIOError, OSError):
                    break


def run(pairs: int, seconds: float, size: int, server_args: list[str], profile: str | None, rate: float = 0.0) -> dict:
    tmp = tempfile.mkdtemp(prefix="meshwg-relay-fwd-")
    nodes_sk = []
    keys_file = os.path.join(tmp, "keys")
    # Keys are made here, before the server starts, so that the server allows them.
    sks = [os.urandom(32) for _ in range(2 * pairs)]
    with open(keys_file, "w") as f:
        for sk in sks:
            f.write(dh_pub(clamp(sk)).hex() + "\n")
    argv = [sys.executable, os.path.join(HERE, "fwd_server.py"), os.path.join(tmp, "db"), keys_file, *server_args]
    if profile:
        argv += ["--profile", profile]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        line = proc.stdout.readline().split()
        port, server_pk = int(line[1]), bytes.fromhex(line[2])
        server = ("127.0.0.1", port)
        nodes = []
        for sk in sks:
            n = Node(server_pk, server)
            n.sk, n.pub, n.rs = sk, dh_pub(clamp(sk)), RelaySession(sk, server_pk, os.urandom)
            n.hello()
            nodes.append(n)
        payload = b"\x04\0\0\0" + os.urandom(size - 4)
        frames = []
        for i in range(pairs):
            a, b = nodes[2 * i], nodes[2 * i + 1]
            frames += [(a.sock, a.rs.encode_send(b.pub, payload)), (b.sock, b.rs.encode_send(a.pub, payload))]
        time.sleep(0.2)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        sender = multiprocessing.Process(target=flood, args=(frames, server, seconds, rate))
        sender.start()
        sender.join(seconds + 30)
        time.sleep(0.3)  # the server drains what is queued
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    counters = {}
    for part in out.split("counters", 1)[-1].split():
        k, _, v = part.partition("=")
        counters[k] = int(v)
    fwd = counters.get("forwarded_packets", 0)
    cpu = cpu1 - cpu0
    return {"pairs": pairs, "size": size, "offered_pkt_s": rate or "flood", "forwarded": fwd,
            "server_cpu_s": round(cpu, 2),
            "wall_s": round(t1 - t0, 2), "pkt_s": round(fwd / (t1 - t0)),
            "pkt_s_per_core": round(fwd / cpu) if cpu else 0,
            "us_per_pkt": round(cpu * 1e6 / fwd, 2) if fwd else 0,
            "gbit_s_per_core": round(fwd * size * 8 / cpu / 1e9, 3) if cpu else 0,
            "dropped": {k: v for k, v in counters.items() if k.startswith(("drop", "refused"))}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--time", type=float, default=5.0)
    p.add_argument("--size", type=int, default=1400, help="relayed packet bytes (the SEND frame adds 45)")
    p.add_argument("--node-rate", type=float, default=100000.0,
                   help="per-node limit, Mbit/s, high enough not to cut the flood (default 100000)")
    p.add_argument("--rate", type=float, default=0.0, help="offered packets a second in all (default 0: flood)")
    p.add_argument("--profile", metavar="FILE", help="cProfile the server into FILE")
    args = p.parse_args()
    r = run(args.pairs, args.time, args.size, ["--node-rate", str(args.node_rate), "--total-rate", "0"], args.profile,
            args.rate)
    print("relay forward: " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

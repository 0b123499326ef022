"""The TCP relay's round trip through the server alone, on loopback (issue 16: relay RTT overhead).

A relay-only server (this process's child: a SignalServer on 127.0.0.1, UDP and TCP relay) and two emulated
nodes: `a` on the TCP relay, `b` on the UDP relay, echoing. `a` sends one SEND to `b` at a time and waits for
the echo: the round trip is the server's TCP reader -> UDP forward, then UDP -> its TCP writer (plus the
emulated nodes' blocking socket calls, the same on any tree). Prints the median and quartiles in microseconds,
and the same for a UDP <-> UDP pair (the reference: what the TCP hops add). Loopback only.

    .venv/bin/python benchmarks/relay/tcp_rtt.py [--count 3000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, REPO)

from meshwg.control.relay_client import RelaySession  # noqa: E402
from meshwg.signaling import relay_wire as W  # noqa: E402
from meshwg.wg.crypto import clamp, dh_pub  # noqa: E402

SERVER = r'''
import signal, sys, trio
from signal_server.server import ServerConfig, SignalServer
cfg = ServerConfig(db=sys.argv[1], init=True, control_enabled=False, udp=[("127.0.0.1", 0)],
                   relay_tcp=[("127.0.0.1", 0)], plain_udp=None, stun_alt_port=None)
for name in ("relay_node_rate",):
    if hasattr(cfg, name):
        setattr(cfg, name, 10000.0)
srv = SignalServer(cfg)
for line in open(sys.argv[2]):
    srv.relay.allowed.add(bytes.fromhex(line.strip()))
async def run():
    async with trio.open_nursery() as n:
        b = await n.start(srv.run)
        print("port", b.udp[0][1], b.relay_tcp[0][1], srv.server_pk.hex(), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        n.cancel_scope.cancel()
trio.run(run)
'''


class UdpNode:
    def __init__(self, sk: bytes, server_pk: bytes, server) -> None:
        self.pub, self.rs, self.server = dh_pub(clamp(sk)), RelaySession(sk, server_pk, os.urandom), server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(3)
        self.sock.sendto(self.rs.hello(time.monotonic(), time.time()), server)
        while True:
            ev = self.rs.handle_untrusted(self.sock.recv(65535), time.monotonic())
            if ev is not None and ev[0] == "ready":
                self.sock.sendto(self.rs.confirm(), server)
                return

    def send(self, dst: bytes, packet: bytes) -> None:
        self.sock.sendto(self.rs.encode_send(dst, packet), self.server)

    def recv(self):
        while True:
            ev = self.rs.handle_untrusted(self.sock.recv(65535), time.monotonic())
            if ev is not None and ev[0] == "recv":
                return ev[1], ev[2]


class TcpNode:
    def __init__(self, sk: bytes, server_pk: bytes, addr) -> None:
        self.pub, self.rs = dh_pub(clamp(sk)), RelaySession(sk, server_pk, os.urandom)
        self.sock = socket.create_connection(addr, timeout=3)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dec, self.frames = W.TcpFrameDecoder(), []
        self.sock.sendall(W.tcp_frame(self.rs.hello(time.monotonic(), time.time())))
        while True:
            ev = self.rs.handle_untrusted(self._frame(), time.monotonic())
            if ev is not None and ev[0] == "ready":
                return

    def _frame(self) -> bytes:
        while not self.frames:
            self.frames += self.dec.feed(self.sock.recv(65536))
        return self.frames.pop(0)

    def send(self, dst: bytes, packet: bytes) -> None:
        self.sock.sendall(W.tcp_frame(self.rs.encode_send(dst, packet)))

    def recv(self):
        while True:
            ev = self.rs.handle_untrusted(self._frame(), time.monotonic())
            if ev is not None and ev[0] == "recv":
                return ev[1], ev[2]


def echo(node, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            src, packet = node.recv()
        except (socket.timeout, OSError):
            continue
        node.send(src, packet)


def rtts(a, b, count: int) -> list[float]:
    stop = threading.Event()
    t = threading.Thread(target=echo, args=(b, stop), daemon=True)
    t.start()
    payload = b"\x04" + os.urandom(99)
    out = []
    try:
        for i in range(count + 100):
            t0 = time.perf_counter()
            a.send(b.pub, payload)
            a.recv()
            if i >= 100:  # warm-up
                out.append((time.perf_counter() - t0) * 1e6)
    finally:
        stop.set()
    return out


def summary(name: str, xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"{name}: median {q[1]:.0f} us (quartiles {q[0]:.0f}-{q[2]:.0f}), {len(xs)} round trips"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=3000)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="meshwg-tcp-rtt-")
    sks = [os.urandom(32) for _ in range(4)]
    with open(os.path.join(tmp, "keys"), "w") as f:
        f.writelines(dh_pub(clamp(sk)).hex() + "\n" for sk in sks)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, os.path.join(tmp, "db"), os.path.join(tmp, "keys")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        _, udp_port, tcp_port, pk = proc.stdout.readline().split()
        server_pk = bytes.fromhex(pk)
        udp, tcp = ("127.0.0.1", int(udp_port)), ("127.0.0.1", int(tcp_port))
        a, b = TcpNode(sks[0], server_pk, tcp), UdpNode(sks[1], server_pk, udp)
        c, d = UdpNode(sks[2], server_pk, udp), UdpNode(sks[3], server_pk, udp)
        time.sleep(0.2)
        print(summary("tcp <-> udp", rtts(a, b, args.count)), flush=True)
        print(summary("udp <-> udp", rtts(c, d, args.count)), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

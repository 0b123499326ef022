"""Helpers for device tests: two namespaces joined by a veth, WireGuard devices in them
(meshwg-tun or wireguard-go, from scenarios/wgdevice.py), configured with the stock `wg`;
a TCP checksum transfer."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from scenarios.netns import Netns
from scenarios.wgdevice import ENV, REPO, RUN_DIR, Pair, genkey, ping  # noqa: F401 (the device tests' names)

_RECEIVER = textwrap.dedent("""
    import hashlib, socket, sys
    fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print('ready', flush=True)
    c, _ = s.accept(); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b); n += len(b)
    print(n, h.hexdigest(), flush=True)
""")
_SENDER = textwrap.dedent("""
    import hashlib, random, socket, sys
    size = int(sys.argv[3]); rnd = random.Random(7); h = hashlib.sha256(); n = 0
    fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    while n < size:
        b = rnd.randbytes(min(1 << 20, size - n)); c.sendall(b); h.update(b); n += len(b)
    c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
    print(n, h.hexdigest(), flush=True)
""")


def tcp_transfer(sender: Netns, receiver: Netns, addr: str, size: int, port: int = 5001, timeout: float = 60) -> tuple[str, str]:
    """Send `size` pseudo-random bytes over TCP; return (sender's 'n sha256', receiver's 'n sha256')."""
    recv = receiver.popen(sys.executable, "-c", _RECEIVER, addr, str(port), stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        sent = subprocess.run(sender.argv(sys.executable, "-c", _SENDER, addr, str(port), str(size)),
                              capture_output=True, text=True, timeout=timeout)
        assert sent.returncode == 0, sent.stderr
        got = recv.communicate(timeout=timeout)[0].strip()
        return sent.stdout.strip(), got
    finally:
        receiver.stop(recv)

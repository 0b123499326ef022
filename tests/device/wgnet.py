"""Helpers for device tests: two namespaces joined by a veth, WireGuard devices in them
(meshwg-tun or wireguard-go), configured with the stock `wg`; a TCP checksum transfer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from scenarios.netns import Netns, unique_name, veth, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
ENV = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
RUN_DIR = "/var/run/wireguard"


def genkey() -> tuple[str, str]:
    sk = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pk = subprocess.run(["wg", "pubkey"], input=sk, capture_output=True, text=True, check=True).stdout.strip()
    return sk, pk


class WgDevice:
    """One WireGuard interface in a namespace, run by `kind` ("meshwg" or "wggo") in the foreground."""

    def __init__(self, ns: Netns, kind: str, *, port: int, tunnel_addrs: list[str]):
        self.ns, self.kind, self.port = ns, kind, port
        self.iface = unique_name("mw" if kind == "meshwg" else "wg")
        self.sk, self.pk = genkey()
        self.keyfile = f"/tmp/{self.iface}.key"
        with open(os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.sk + "\n")
        argv = ["meshwg-tun", "-f", self.iface] if kind == "meshwg" else ["wireguard-go", "-f", self.iface]
        self.proc = ns.popen(*argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None, 15, what=f"{self.iface} socket")
        assert self.proc.poll() is None, f"{argv} exited with {self.proc.returncode}"
        self.wg("set", self.iface, "private-key", self.keyfile, "listen-port", str(port))
        for addr in tunnel_addrs:
            fam = "-6" if ":" in addr else "-4"
            ns.run("ip", fam, "addr", "add", addr, "dev", self.iface, *(["nodad"] if fam == "-6" else []))
        ns.run("ip", "link", "set", self.iface, "up")

    @property
    def sock(self) -> str:
        return os.path.join(RUN_DIR, f"{self.iface}.sock")

    def wg(self, *args: str, check: bool = True) -> str:
        return self.ns.run("wg", *args, check=check)

    def add_peer(self, other: WgDevice, allowed: list[str], endpoint: str | None = None, *extra: str) -> None:
        args = ["set", self.iface, "peer", other.pk, "allowed-ips", ",".join(allowed)]
        if endpoint:
            args += ["endpoint", endpoint]
        self.wg(*args, *extra)

    def dump(self) -> list[list[str]]:
        return [line.split("\t") for line in self.wg("show", self.iface, "dump").strip().splitlines()]

    def stop(self) -> None:
        self.ns.stop(self.proc)
        try:
            os.unlink(self.keyfile)
        except FileNotFoundError:
            pass


class Pair:
    """Namespaces a and b on a veth: 192.168.<n>.1/.2 and fd00:<n>::1/::2; tunnel 10.<n>.0.x, fd<n>::x."""

    def __init__(self, n: int = 91):
        self.n = n
        self.a = Netns("mwa")
        self.b = Netns("mwb")
        self.devices: list[WgDevice] = []
        veth(self.a, "eth0", [f"192.168.{n}.1/24", f"fd00:{n}::1/64"], self.b, "eth0", [f"192.168.{n}.2/24", f"fd00:{n}::2/64"])

    def device(self, ns: Netns, kind: str, port: int, index: int) -> WgDevice:
        n = self.n
        dev = WgDevice(ns, kind, port=port, tunnel_addrs=[f"10.{n}.0.{index}/24", f"fd{n}::{index}/64"])
        self.devices.append(dev)
        return dev

    def close(self) -> None:
        for dev in self.devices:
            dev.stop()
        for ns in (self.a, self.b):
            # Daemons started by wg-quick/meshwg up are not our children: stop them by PID.
            kill_namespace_pids(ns)
            ns.close()


def kill_namespace_pids(ns: Netns) -> None:
    out = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), 15)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.strip():
        time.sleep(0.05)


def ping(ns: Netns, addr: str, count: int = 3, timeout: float = 10) -> bool:
    """True once `count` pings in a row get replies (the first may wait for a handshake)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(ns.argv("ping", "-c", str(count), "-i", "0.05", "-W", "1", addr), capture_output=True)
        if proc.returncode == 0:
            return True
    return False


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

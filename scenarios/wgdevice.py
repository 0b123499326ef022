"""WireGuard devices (meshwg-tun or wireguard-go) in network namespaces, for tests, benchmarks and the lab.

A device runs in the foreground, is configured with the stock `wg`, and is stopped by PID. `Pair` is two
namespaces on a veth that devices are added to.
"""

from __future__ import annotations

import os
import subprocess
import time

from scenarios.netns import Netns, kill_namespace_pids, unique_name, veth, wait_for  # noqa: F401 (re-exported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
ENV = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
RUN_DIR = "/var/run/wireguard"


def genkey() -> tuple[str, str]:
    sk = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pk = subprocess.run(["wg", "pubkey"], input=sk, capture_output=True, text=True, check=True).stdout.strip()
    return sk, pk


def start_daemon(ns: Netns, kind: str, iface: str, env: dict | None = None) -> subprocess.Popen:
    """Run `kind` ("meshwg" or "wggo") for `iface` in the foreground; return once its UAPI socket exists.

    Raises RuntimeError at once if the daemon exits first (not a socket timeout much later)."""
    argv = ["meshwg-tun", "-f", iface] if kind == "meshwg" else ["wireguard-go", "-f", iface]
    proc = ns.popen(*argv, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = os.path.join(RUN_DIR, f"{iface}.sock")
    wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 15, what=f"{iface} socket")
    if proc.poll() is not None:
        raise RuntimeError(f"{' '.join(argv)} exited with status {proc.returncode} before creating {sock}")
    return proc


class WgDevice:
    """One WireGuard interface in a namespace, run by `kind` ("meshwg" or "wggo") in the foreground."""

    def __init__(self, ns: Netns, kind: str, *, port: int, tunnel_addrs: list[str], env: dict | None = None):
        self.ns, self.kind, self.port = ns, kind, port
        self.iface = unique_name("mw" if kind == "meshwg" else "wg")
        self.sk, self.pk = genkey()
        self.keyfile = f"/tmp/{self.iface}.key"
        with open(os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.sk + "\n")
        self.proc = start_daemon(ns, kind, self.iface, env)
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
        try:
            veth(self.a, "eth0", [f"192.168.{n}.1/24", f"fd00:{n}::1/64"],
                 self.b, "eth0", [f"192.168.{n}.2/24", f"fd00:{n}::2/64"])
        except BaseException:
            self.close()
            raise

    def device(self, ns: Netns, kind: str, port: int, index: int, *, ipv6: bool = True,
               env: dict | None = None) -> WgDevice:
        """A device with tunnel address 10.<n>.0.<index>/24 (and fd<n>::<index>/64 unless not ipv6)."""
        n = self.n
        addrs = [f"10.{n}.0.{index}/24"] + ([f"fd{n}::{index}/64"] if ipv6 else [])
        dev = WgDevice(ns, kind, port=port, tunnel_addrs=addrs, env=env)
        self.devices.append(dev)
        return dev

    def close(self) -> None:
        for dev in self.devices:
            dev.stop()
        for ns in (self.a, self.b):
            # Daemons started by wg-quick/meshwg up are not our children: stop them by PID.
            kill_namespace_pids(ns)
            ns.close()


def ping(ns: Netns, addr: str, count: int = 3, timeout: float = 10) -> bool:
    """True once `count` pings in a row get replies (the first may wait for a handshake)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(ns.argv("ping", "-c", str(count), "-i", "0.05", "-W", "1", addr), capture_output=True)
        if proc.returncode == 0:
            return True
    return False

"""Two namespaces joined by a veth with a WireGuard tunnel between them, for benchmarks.

    with TunnelPair("meshwg") as t:   # or "wggo"
        t.a.run("iperf3", ...)         # tunnel addresses 10.200.0.1 (a) and 10.200.0.2 (b)
"""

from __future__ import annotations

import os
import subprocess
import time

from scenarios.netns import Netns, unique_name, veth, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PATH": f"{os.path.join(REPO, '.venv', 'bin')}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
A_TUN, B_TUN = "10.200.0.1", "10.200.0.2"


def _genkey() -> tuple[str, str]:
    sk = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pk = subprocess.run(["wg", "pubkey"], input=sk, capture_output=True, text=True, check=True).stdout.strip()
    return sk, pk


class TunnelPair:
    def __init__(self, kind: str, *, extra_env: dict | None = None):
        self.kind = kind
        self.env = {**ENV, **(extra_env or {})}
        self.a = self.b = None
        self.procs: list = []
        self.ifaces: dict = {}

    def __enter__(self) -> TunnelPair:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self.a, self.b = Netns("bwa"), Netns("bwb")
        veth(self.a, "eth0", ["192.168.250.1/24"], self.b, "eth0", ["192.168.250.2/24"])
        keys = {}
        for name, ns in (("a", self.a), ("b", self.b)):
            iface = unique_name("bm" if self.kind == "meshwg" else "bg")
            argv = ["meshwg-tun", "-f", iface] if self.kind == "meshwg" else ["wireguard-go", "-f", iface]
            proc = ns.popen(*argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((ns, proc))
            wait_for(lambda: os.path.exists(f"/var/run/wireguard/{iface}.sock"), 15, what=f"{iface} socket")
            self.ifaces[name] = (ns, iface, proc)
            keys[name] = _genkey()
        for name, other, port, oport, addr, oaddr in (("a", "b", 51820, 51821, A_TUN, B_TUN),
                                                      ("b", "a", 51821, 51820, B_TUN, A_TUN)):
            ns, iface, _ = self.ifaces[name]
            keyfile = f"/tmp/{iface}.key"
            with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(keys[name][0])
            oip = "192.168.250.2" if name == "a" else "192.168.250.1"
            ns.run("wg", "set", iface, "private-key", keyfile, "listen-port", str(port), "peer", keys[other][1],
                   "allowed-ips", f"{oaddr}/32", "endpoint", f"{oip}:{oport}")
            os.unlink(keyfile)
            ns.run("ip", "addr", "add", f"{addr}/24", "dev", iface)
            ns.run("ip", "link", "set", iface, "up")
        deadline = time.monotonic() + 10
        while subprocess.run(self.a.argv("ping", "-c", "1", "-W", "1", B_TUN), capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} tunnel did not come up")

    def pid(self, name: str) -> int:
        return self.ifaces[name][2].pid

    def close(self) -> None:
        for ns, proc in self.procs:
            ns.stop(proc)
        for ns in (self.a, self.b):
            if ns is not None:
                ns.close()

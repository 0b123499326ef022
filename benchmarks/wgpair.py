"""Two namespaces joined by a veth with a WireGuard tunnel between them, for benchmarks.

    with TunnelPair("meshwg") as t:   # or "wggo"
        t.a.run("iperf3", ...)         # tunnel addresses 10.200.0.1 (a) and 10.200.0.2 (b)
"""

from __future__ import annotations

from scenarios.wgdevice import ENV, Pair, ping

N = 200                                       # Pair's address block: veth 192.168.200.x, tunnel 10.200.0.x
A_TUN, B_TUN = f"10.{N}.0.1", f"10.{N}.0.2"
PORTS = {"a": 51820, "b": 51821}


class TunnelPair:
    def __init__(self, kind: str, *, extra_env: dict | None = None):
        self.kind = kind
        self.env = {**ENV, **(extra_env or {})}
        self.pair: Pair | None = None
        self.a = self.b = None
        self.devices: dict = {}

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
        self.pair = Pair(N)
        self.a, self.b = self.pair.a, self.pair.b
        for index, (name, ns) in enumerate((("a", self.a), ("b", self.b)), 1):
            # IPv4 only: the benchmarks use A_TUN/B_TUN alone.
            self.devices[name] = self.pair.device(ns, self.kind, PORTS[name], index, ipv6=False, env=self.env)
        a, b = self.devices["a"], self.devices["b"]
        a.add_peer(b, [f"{B_TUN}/32"], f"192.168.{N}.2:{PORTS['b']}")
        b.add_peer(a, [f"{A_TUN}/32"], f"192.168.{N}.1:{PORTS['a']}")
        if not ping(self.a, B_TUN, count=1):
            raise RuntimeError(f"{self.kind} tunnel did not come up")

    def pid(self, name: str) -> int:
        return self.devices[name].proc.pid

    def close(self) -> None:
        if self.pair is not None:
            self.pair.close()

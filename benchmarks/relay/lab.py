"""relay: the mesh through the signal server's relay vs direct, in the NAT lab, same run (issue 16).

Three pairs of `meshwg join` nodes, each behind its own NAT router, one signal server on the lab's internet:
  udp-relay   symmetric <-> symmetric: cannot punch, so through the UDP relay
  tcp-relay   UDP-blocked <-> symmetric: the blocked side reaches the relay over TCP only
  direct      port-restricted <-> full cone: punches, goes direct
For each: ping RTT (--pings at -i 0.01) and iperf3 TCP (--time s, 1 stream) through the mesh, the signal server's
CPU seconds during the iperf3 run and per GB it relayed (benchmarks/procstat.py, /metrics forwarded_bytes), then
the ratios relay/direct, and the route MTU x uses for y (1375 on a relayed pair, issue 16; '-': the interface's).
The first line says which relay limits the server ran with. --forward also runs forward.py's loopback
microbenchmark. Removes all it created.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from procstat import cpu_seconds

from mesh_lab import MeshLab, paths
from scenarios.nat import NatType
from scenarios.netns import wait_for
from scenarios.topology import Lab

PAIRS = {
    "udp-relay": (NatType.SYMMETRIC, NatType.SYMMETRIC, "relay"),
    "tcp-relay": (NatType.UDP_BLOCKED, NatType.SYMMETRIC, "relay"),
    "direct": (NatType.PORT_RESTRICTED, NatType.FULL_CONE, "direct"),
}


def ping_ms(x, ip: str, count: int) -> float:
    x.host.run("ping", "-n", "-c", "20", "-i", "0.01", "-q", ip, timeout=60)  # warm-up
    out = x.host.run("ping", "-n", "-c", str(count), "-i", "0.01", ip, timeout=count + 60)
    rtts = [float(v) for v in re.findall(r"time=([\d.]+) ms", out)]
    return statistics.fmean(rtts) if rtts else float("nan")


def iperf_mbit(x, y, ip: str, seconds: int) -> float:
    server = y.host.popen("iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = x.host.run("iperf3", "-c", ip, "-t", str(seconds), "-J", timeout=seconds + 60)
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        y.host.stop(server)


def route_mtu(x, ip: str) -> str:
    """The MTU `ip route get` gives in x's namespace ('-': none on the route, the interface's)."""
    m = re.search(r"\bmtu (\d+)", x.host.run("ip", "route", "get", ip))
    return m.group(1) if m else "-"


def limits_line(server_args: list[str]) -> str:
    """The relay limits the server runs with: `serve`'s parse of the lab's arguments (defaults included)."""
    from signal_server.cli import build_parser
    a = build_parser().parse_args(["serve", *server_args])
    pps = f"{a.relay_node_pps:g} packets/s" if a.relay_node_pps else "a packet/s per 512 B/s of it"
    total = f"{a.relay_total_rate:g} Mbit/s" if a.relay_total_rate else "none"
    return (f"relay limits: per node {a.relay_node_rate:g} Mbit/s and {pps}; total {total}"
            + ("" if server_args else " (the defaults)"))


def measure(mesh: MeshLab, x, y, seconds: int, pings: int) -> dict:
    ip = y.mesh_ip()
    mtu = route_mtu(x, ip)
    rtt = ping_ms(x, ip, pings)
    pid = mesh.server.pid
    cpu0, fwd0 = cpu_seconds(pid), mesh.metrics().get("meshwg_signal_forwarded_bytes_total", 0.0)
    mbit = iperf_mbit(x, y, ip, seconds)
    cpu1, fwd1 = cpu_seconds(pid), mesh.metrics().get("meshwg_signal_forwarded_bytes_total", 0.0)
    gb = (fwd1 - fwd0) / 1e9
    return {"tcp_mbit": mbit, "ping_ms": rtt, "server_cpu_s": cpu1 - cpu0, "relayed_gb": gb,
            "server_cpu_s_per_gb": (cpu1 - cpu0) / gb if gb > 0.01 else float("nan"),
            "path": "/".join(str(p) for p in paths(x, y)), "route_mtu": mtu}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", type=int, default=8, help="iperf3 seconds per pair")
    p.add_argument("--pings", type=int, default=200)
    p.add_argument("--forward", action="store_true", help="also the loopback forwarding microbenchmark")
    p.add_argument("--server-arg", action="append", default=[], help="extra meshwg-signal serve argument")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/relay needs root (network namespaces)", file=sys.stderr)
        return 1
    results = {}
    print(limits_line(args.server_arg), flush=True)
    with Lab() as lab:
        mesh = MeshLab(lab)
        mesh.start_server()
        if args.server_arg:  # restart with the extra arguments (start_server takes the lab's defaults)
            mesh.stop_server()
            from scenarios.runner import start_signal_server
            from mesh_lab import METRICS_PORT
            mesh.server = start_signal_server(mesh.signal, "--metrics", f"{mesh.signal.addr}:{METRICS_PORT}",
                                              *args.server_arg)
        pairs = {}
        for name, (nx, ny, _) in PAIRS.items():
            tag = name.replace("-", "")
            pairs[name] = (mesh.add_node(f"{tag}a", nx), mesh.add_node(f"{tag}b", ny))
        for name, (x, y) in pairs.items():
            want = PAIRS[name][2]
            try:
                wait_for(lambda: x.mesh_ip() and y.mesh_ip() and x.ping(y.mesh_ip(), 1, 1.0)
                         and paths(x, y) == (want, want), timeout=90, interval=0.5, what=f"{name} on its path")
            except TimeoutError:
                print(f"{name}: not on the {want} path ({paths(x, y)}); measuring anyway", flush=True)
        for name, (x, y) in pairs.items():
            results[name] = r = measure(mesh, x, y, args.time, args.pings)
            print(f"{name:10s} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in r.items()), flush=True)
        m = mesh.metrics()
        drops = {k.removeprefix("meshwg_signal_"): int(v) for k, v in m.items() if "drop" in k and v}
        print(f"server drops: {drops or 'none'}")
    d = results["direct"]
    print()
    for name in ("udp-relay", "tcp-relay"):
        r = results[name]
        print(f"{name}/direct: throughput {r['tcp_mbit'] / d['tcp_mbit']:.2f}x, "
              f"RTT {r['ping_ms'] / d['ping_ms']:.2f}x (+{r['ping_ms'] - d['ping_ms']:.2f} ms)")
    if args.forward:
        import forward
        for rate in (0.0, 30000.0):
            r = forward.run(4, 4.0, 1400, ["--node-rate", "100000", "--total-rate", "0"], None, rate)
            print("relay forward: " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    return 0

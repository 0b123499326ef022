"""plain: a stock WireGuard phone vs a meshwg node, both reaching "home" through the signal server's relay (issue 12).

One NAT lab, one run, every host behind its own symmetric NAT (so nothing punches and everything is relayed):
  home    `meshwg join`
  laptop  `meshwg join`                        node <-> node through the UDP relay (symmetric <-> symmetric)
  phone   stock wg-quick + wireguard-go, configured from `meshwg-signal plain add phone --to home`; it reaches
          home through the server's plain-WireGuard port (never decrypted; relayed over home's relay session)
Measured, each path in turn (so a noisy moment hits both):
  - the phone's first answered ping after its first handshake initiation (tcpdump on the phone; ping -D);
  - ping RTT to home's mesh address (--pings at 0.02 s after 10 warm-up pings): average and median;
  - iperf3 TCP to home and from home (-R), --time seconds each, after a pause that refills the relay's per-key
    token buckets (so each run starts from the same budget);
  - the signal server's CPU seconds (/proc/<pid>/stat) per GB it relayed during each iperf3 (relayed bytes from
    its /metrics: forwarded_bytes for node <-> node, forwarded_{from,to}_plain_bytes for the phone), and the
    relay's rate-limit drops meanwhile.
`meshwg status` is sampled during the laptop's measurements: the table says if the pair ever went direct.
Prints a table with the ratios plain / node-relay (goal >= 0.9x throughput) and the first-ping time (goal <= 1 s).
Not a test: run as root. Removes every namespace and process it started (wireguard-go by the phone's namespace PIDs).

    .venv/bin/python benchmarks/plain [--time 5] [--pings 100]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

from mesh_lab import MeshLab, MeshNode, Pinger, path_log, read_pcap, wait_until
from procstat import cpu_seconds
from scenarios.nat import NatType
from scenarios.runner import create_invite, start_signal_server
from scenarios.services import listening
from scenarios.topology import Host, Lab
from scenarios.wgdevice import kill_namespace_pids

SYM = NatType.SYMMETRIC
PLAIN_PORT = 51820
METRICS_PORT = 9300
IPERF_PORT = 5201
PHONE_IF = "wgp0"               # wg-quick names the interface after its config file
USERSPACE = ("env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
             "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1")
# The relay's per-key budget is 4,000 packets/s with a burst of 8,000 (RelayCore defaults): a 2.5 s pause
# refills it, so every iperf3 run starts from a full bucket whichever path ran before.
REFILL_PAUSE = 2.5
WARMUP_PINGS = 10
# /metrics counters (meshwg_signal_<name>_total) that count what each path relayed.
NODE_BYTES, NODE_PKTS = ("forwarded_bytes",), ("forwarded_packets",)
PLAIN_BYTES = ("forwarded_from_plain_bytes", "forwarded_to_plain_bytes")
PLAIN_PKTS = ("forwarded_from_plain_packets", "forwarded_to_plain_packets")
LIMIT_DROPS = ("drop_rate_limited", "drop_plain_rate_limited")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """The lab: signal server, home and laptop nodes, the phone host; torn down by close()."""

    def __init__(self, lab: Lab):
        self.mesh = MeshLab(lab)
        self.phone: Host | None = None
        self.home: MeshNode | None = None
        self.laptop: MeshNode | None = None

    def start(self) -> None:
        m = self.mesh
        m.server = start_signal_server(m.signal, "--advertise", m.signal.addr,
                                       "--metrics", f"{m.signal.addr}:{METRICS_PORT}")
        cmdline = open(f"/proc/{m.server.pid}/cmdline", "rb").read()
        if b"signal_server" not in cmdline:   # the PID must be the server itself for its CPU time
            raise SystemExit(f"PID {m.server.pid} is not the signal server: {cmdline!r}")
        m.invite = create_invite(m.signal)
        self.home = m.add_node("home", SYM)
        self.laptop = m.add_node("laptop", SYM)
        for node in (self.home, self.laptop):
            ip, _ = wait_until(node.mesh_ip, 30)
            if not ip:
                raise SystemExit(f"{node.name} got no mesh address in 30 s\n{m.logs()}")
        self.phone = m.lab.host("phone", m.lab.router("r-phone", SYM))

    def close(self) -> None:
        if self.phone is not None:
            self.phone.run("wg-quick", "down", str(self.phone.dir / f"{PHONE_IF}.conf"), check=False)
            kill_namespace_pids(self.phone.ns)   # wireguard-go is wg-quick's daemon, not our child
        for node in self.mesh.nodes.values():
            node.stop()
        self.mesh.stop_server()

    def server_cpu(self) -> float:
        return cpu_seconds(self.mesh.server.pid)

    def counters(self) -> dict[str, float]:
        return {k.removeprefix("meshwg_signal_").removesuffix("_total"): v for k, v in self.mesh.metrics().items()}


# -- the phone ------------------------------------------------------------------------------------

def first_ping(bench: Bench, home_ip: str) -> dict:
    """Bring the phone up with its `plain add` config; times of its first initiation, response and answered ping."""
    m, phone = bench.mesh, bench.phone
    config = m.admin("plain", "add", "phone", "--to", "home")
    # Measure from the handshake, not from the server pushing the new peer to home (issue 12: within 1 s).
    if wait_until(lambda: bench.home.peer("phone"), 10)[0] is None:
        raise SystemExit(f"home does not list the plain peer 10 s after `plain add`\n{m.logs()}")
    conf = phone.dir / f"{PHONE_IF}.conf"
    conf.write_text(config)
    conf.chmod(0o600)
    pcap = phone.dir / "handshake.pcap"
    # --immediate-mode: a short capture must not wait in the kernel's ring buffer for its block timeout.
    cap = phone.popen("tcpdump", "-i", "eth0", "--immediate-mode", "-U", "-n", "-s", "256", "-w", str(pcap),
                      "udp", "port", str(PLAIN_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if "listening" not in cap.stderr.readline().decode(errors="replace"):
        raise SystemExit("tcpdump did not start on the phone")
    pinger = Pinger(phone, home_ip, interval=0.02).start()   # restarts ping until the tunnel's route exists
    try:
        t_up = time.time()
        phone.run(*USERSPACE, "wg-quick", "up", str(conf))
        t_up_done = time.time()
        if wait_until(lambda: pinger.first_reply(), 15)[0] is None:
            raise SystemExit(f"the phone got no answer from home ({home_ip}) in 15 s\n{m.logs()}")
    finally:
        pinger.stop()
        time.sleep(0.2)   # the last frames reach the file
        phone.stop(cap)
    frames = read_pcap(pcap)
    init = next((t for t, src, _, _, _, p in frames if src == phone.addr and p[:1] == b"\x01"), None)
    resp = next((t for t, src, _, _, _, p in frames if src != phone.addr and p[:1] == b"\x02"), None)
    # The first transport message with a payload (a keepalive is 32 bytes): the first ping on the wire.
    data = next((t for t, src, _, _, _, p in frames if src == phone.addr and p[:1] == b"\x04" and len(p) > 32), None)
    hs = phone.run("wg", "show", PHONE_IF, "latest-handshakes").split()
    return {"up": t_up, "up_done": t_up_done, "init": init, "resp": resp, "data": data, "reply": pinger.first_reply(),
            "wg_latest_handshake": int(hs[1]) if len(hs) == 2 else None}


def plain_peer_state(bench: Bench) -> str:
    p = bench.home.peer("phone") or {}
    return f"plain={p.get('plain')} path={p.get('path')} reason={p.get('relay_reason')!r}"


# -- measurements ---------------------------------------------------------------------------------

def ping_stats(host: Host, ip: str, count: int) -> dict:
    host.run("ping", "-n", "-q", "-c", str(WARMUP_PINGS), "-i", "0.02", "-W", "1", ip, check=False, timeout=30)
    out = host.run("ping", "-n", "-c", str(count), "-i", "0.02", "-W", "1", ip, check=False, timeout=count + 30)
    rtts = [float(ms) for ms in re.findall(r"time=([\d.]+) ms", out)]
    if not rtts:
        raise SystemExit(f"no ping from {host.name} to {ip} was answered:\n{out[-400:]}")
    return {"avg": statistics.fmean(rtts), "median": statistics.median(rtts), "answered": len(rtts), "sent": count}


def iperf(bench: Bench, client: Host, home_ip: str, seconds: int, reverse: bool, bytes_keys, pkt_keys) -> dict:
    """iperf3 TCP between `client` and home (to home; from home with reverse), with the server's CPU and counters."""
    server_host = bench.home.host
    time.sleep(REFILL_PAUSE)
    server = server_host.popen("iperf3", "-s", "-1", "-B", home_ip, "-p", str(IPERF_PORT),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if wait_until(lambda: listening(server_host, IPERF_PORT, "tcp"), 10)[0] is None:
            raise SystemExit("iperf3 did not listen on home")
        c0, cpu0 = bench.counters(), bench.server_cpu()
        out = client.run("iperf3", "-c", home_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                         *(["-R"] if reverse else []), check=False, timeout=seconds + 30)
        cpu1, c1 = bench.server_cpu(), bench.counters()
    finally:
        server_host.stop(server)
    try:
        data = json.loads(out)
        mbit = data["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        raise SystemExit(f"iperf3 from {client.name} failed:\n{out[-600:]}") from None

    def delta(keys) -> float:
        return sum(c1.get(k, 0) - c0.get(k, 0) for k in keys)

    relayed = delta(bytes_keys)
    return {"mbit": mbit, "cpu_s": cpu1 - cpu0, "relayed_bytes": relayed, "pkts_per_s": delta(pkt_keys) / seconds,
            "cpu_s_per_gb": (cpu1 - cpu0) / (relayed / 1e9) if relayed else float("nan"),
            "limit_drops": delta(LIMIT_DROPS)}


class PathWatch:
    """Samples both sides' `meshwg status` path for the home <-> laptop pair in the background."""

    def __init__(self, a: MeshNode, b: MeshNode, interval: float = 0.25):
        self.a, self.b, self.interval = a, b, interval
        self.seen: dict[str, int] = {}
        self.modes: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for x, y in ((self.a, self.b), (self.b, self.a)):
            st = x.status()
            p = x.peer(y.name, st)
            path = (p or {}).get("path") or "none"
            self.seen[path] = self.seen.get(path, 0) + 1
            if st:
                self.modes.add(str((st.get("relay") or {}).get("mode")))

    def __enter__(self) -> "PathWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> str:
        seen = ", ".join(f"{k} x{v}" for k, v in sorted(self.seen.items()))
        return f"{seen} (relay mode {'/'.join(sorted(self.modes))})"


# -- the report -----------------------------------------------------------------------------------

def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_table(r: dict, seconds: int, pings: int) -> None:
    p, n = r["plain"], r["node"]
    rows = [
        (f"TCP to home, {seconds} s (Mbit/s)", p["up"]["mbit"], n["up"]["mbit"], "{:.1f}"),
        (f"TCP from home -R, {seconds} s (Mbit/s)", p["down"]["mbit"], n["down"]["mbit"], "{:.1f}"),
        (f"ping RTT avg, {pings} x 0.02 s (ms)", p["ping"]["avg"], n["ping"]["avg"], "{:.3f}"),
        ("ping RTT median (ms)", p["ping"]["median"], n["ping"]["median"], "{:.3f}"),
        ("server CPU s / GB relayed, to home", p["up"]["cpu_s_per_gb"], n["up"]["cpu_s_per_gb"], "{:.2f}"),
        ("server CPU s / GB relayed, from home", p["down"]["cpu_s_per_gb"], n["down"]["cpu_s_per_gb"], "{:.2f}"),
        ("relayed packets/s, to home", p["up"]["pkts_per_s"], n["up"]["pkts_per_s"], "{:.0f}"),
        ("relayed packets/s, from home", p["down"]["pkts_per_s"], n["down"]["pkts_per_s"], "{:.0f}"),
        ("relay rate-limit drops, to home", p["up"]["limit_drops"], n["up"]["limit_drops"], "{:.0f}"),
        ("relay rate-limit drops, from home", p["down"]["limit_drops"], n["down"]["limit_drops"], "{:.0f}"),
    ]
    w = 40
    print(f"{'':{w}s}{'plain (phone)':>15s}{'node-relay':>13s}{'plain/node':>12s}")
    print(f"{'':{w}s}{'-' * 13:>15s}{'-' * 11:>13s}{'-' * 10:>12s}")
    for label, a, b, fmt in rows:
        print(f"{label:{w}s}{fmt.format(a):>15s}{fmt.format(b):>13s}{ratio(a, b):>12s}")
    print(f"ping answered: plain {p['ping']['answered']}/{p['ping']['sent']}, "
          f"node {n['ping']['answered']}/{n['ping']['sent']}")
    up, down = p["up"]["mbit"] / n["up"]["mbit"], p["down"]["mbit"] / n["down"]["mbit"]
    verdict = "met" if min(up, down) >= 0.9 else "NOT met"
    print(f"throughput goal plain >= 0.9x node-relay: {verdict} (to home {up:.2f}x, from home {down:.2f}x)")
    fp = r["first"]
    if fp["init"] is None:
        print(f"first answered ping: {fp['reply'] - fp['up']:.2f} s after wg-quick up (no initiation captured)")
    else:
        after = fp["reply"] - fp["init"]
        def ms(t):
            return "-" if t is None else f"{(t - fp['init']) * 1000:+.1f} ms"

        print(f"first answered ping: {after:.3f} s after the phone's first handshake initiation "
              f"(goal <= 1 s: {'met' if after <= 1.0 else 'NOT met'})")
        print(f"  timeline from the initiation: handshake response {ms(fp['resp'])}, `wg-quick up` returned "
              f"{ms(fp['up_done'])}, first ping on the wire {ms(fp['data'])}, answered {ms(fp['reply'])}; "
              f"`wg-quick up` started {ms(fp['up'])}")
    print(f"paths: home's plain peer {r['plain_state']}; home <-> laptop during its measurements: "
          f"{r['node_paths']}; direct in the logs: {r['node_direct'] or 'never'}")
    drops = [x["limit_drops"] for x in (p["up"], p["down"], n["up"], n["down"])]
    if all(d > 0 for d in drops):
        print("note: every iperf3 run hit the relay's per-key limits (RelayCore defaults: 4,000 packets/s, "
              "16 MB/s per key; issue 16): both paths are capped by the same limit, so the "
              "throughput ratio compares two capped paths")


def measure(bench: Bench, seconds: int, pings: int) -> dict:
    home_ip, laptop_ip = bench.home.mesh_ip(), bench.laptop.mesh_ip()
    say(f"home {home_ip}, laptop {laptop_ip} ({bench.home.host.nat_label}); waiting for laptop -> home")
    if wait_until(lambda: bench.laptop.ping(home_ip), 30, interval=0.1)[0] is None:
        raise SystemExit(f"laptop cannot reach home in 30 s\n{bench.mesh.logs()}")
    say("phone: plain add, wg-quick up, first ping")
    first = first_ping(bench, home_ip)
    phone, laptop = bench.phone, bench.laptop.host
    r = {"first": first, "plain": {}, "node": {}}
    with PathWatch(bench.home, bench.laptop) as watch:
        t_watch = time.time()
        say("ping RTT")
        r["plain"]["ping"] = ping_stats(phone, home_ip, pings)
        r["node"]["ping"] = ping_stats(laptop, home_ip, pings)
        for key, reverse in (("up", False), ("down", True)):
            say(f"iperf3 {'from' if reverse else 'to'} home")
            r["plain"][key] = iperf(bench, phone, home_ip, seconds, reverse, PLAIN_BYTES, PLAIN_PKTS)
            r["node"][key] = iperf(bench, laptop, home_ip, seconds, reverse, NODE_BYTES, NODE_PKTS)
        watch.sample()
    r["plain_state"] = plain_peer_state(bench)
    r["node_paths"] = watch.summary()
    direct = [f"{x.name} at +{t - t_watch:.1f} s" for x, y in ((bench.home, bench.laptop), (bench.laptop, bench.home))
              for t, kind in path_log(x, y) if kind == "direct"]
    r["node_direct"] = ", ".join(direct)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", type=int, default=5, help="iperf3 seconds per direction and path (default 5)")
    ap.add_argument("--pings", type=int, default=100, help="pings per path for the RTT (default 100, at 0.02 s)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/plain needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    started = time.monotonic()
    with Lab() as lab:
        bench = Bench(lab)
        try:
            bench.start()
            result = measure(bench, args.time, args.pings)
        finally:
            bench.close()
    print(f"plain WireGuard peer vs meshwg node, both to home through the signal server's relay; every host "
          f"behind its own symmetric NAT ({time.monotonic() - started:.0f} s in all)")
    print_table(result, args.time, args.pings)
    return 0

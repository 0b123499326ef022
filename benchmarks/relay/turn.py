"""A second reference for the relay's forwarding cost: coturn's TURN server beside meshwg's relay, same run.

meshwg: forward.py's loopback microbenchmark (2 x --pairs emulated nodes flooding SEND frames through a relay-only
server). TURN: coturn's `turnserver` on 127.0.0.1 (a throwaway config in a temp directory: a free port, UDP only,
long-term credentials of a static user, relay ports in 61000-61999, loopback peers allowed, no CLI), driven by
`turnutils_uclient` with 2 x --pairs clients (channel data, --messages each of --size bytes, no pacing) against
`turnutils_peer`, which echoes. A relayed packet is one the server took in on one side and sent out on the other:
for TURN the sum of the per-session "peer usage" counts (sent to the peer + received from it) in turnserver's log,
for meshwg the relay's forwarded_packets. Both servers' CPU seconds come from /proc (all threads). Printed: each
one's packets/s per core of server CPU, then the ratio meshwg/TURN. Loopback only; kills only what it started.

    .venv/bin/python benchmarks/relay/turn.py [--pairs 4] [--time 5] [--size 1400] [--messages 50000] [--uclients 1]

Without coturn's tools it says so and exits 0 (scripts/setup installs the Debian package coturn).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import forward  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

TOOLS = ("turnserver", "turnutils_uclient", "turnutils_peer")
USER, PASSWORD, REALM = "bench", "bench-pw", "meshwg-bench"
RELAY_PORTS = (61000, 61999)  # above the ephemeral range (32768-60999): no clash with the clients' own ports


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: str, port: int) -> str:
    """turnserver's options, all in a file of ours: with -c it reads no /etc/turnserver.conf, and the
    user database, pid file and log stay in tmp."""
    lines = [
        "listening-ip=127.0.0.1", f"listening-port={port}", "relay-ip=127.0.0.1",
        f"min-port={RELAY_PORTS[0]}", f"max-port={RELAY_PORTS[1]}",
        "no-tcp", "no-tls", "no-dtls", "no-cli", "no-rfc5780",
        "lt-cred-mech", f"user={USER}:{PASSWORD}", f"realm={REALM}",
        # coturn refuses loopback peers by default; the echo peer is on 127.0.0.1.
        "allow-loopback-peers", "allowed-peer-ip=127.0.0.1",
        f"userdb={os.path.join(tmp, 'turndb')}", f"pidfile={os.path.join(tmp, 'turnserver.pid')}",
        f"log-file={os.path.join(tmp, 'turn.log')}", "simple-log", "no-stdout-log",
        "verbose",  # the per-session usage lines the relayed packets are counted from
    ]
    path = os.path.join(tmp, "turnserver.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def wait_udp_answer(port: int, probe: bytes, what: str, timeout: float = 10.0) -> None:
    """Until something on 127.0.0.1:port answers the probe (a STUN binding request, an echo)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(probe, ("127.0.0.1", port))
            try:
                s.recvfrom(2048)
                return
            except OSError:  # a timeout, or a refusal while nothing listens yet
                time.sleep(0.05)
    raise RuntimeError(f"{what} on 127.0.0.1:{port} did not answer within {timeout:g} s")


STUN_BINDING = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"meshwg-bench"  # type, length 0, magic cookie, 12-byte id


def usage_counts(log: str) -> tuple[int, int]:
    """(relayed packets, sessions closed) from turnserver's log: 'peer usage' lines are per-session counts since
    the previous line (rp from the peer -> the client, sp from the client -> the peer)."""
    relayed = closed = 0
    for line in log.splitlines():
        m = re.search(r": peer usage: .*\brp=(\d+), rb=\d+, sp=(\d+)", line)
        if m:
            relayed += int(m[1]) + int(m[2])
        elif re.search(r": delete: realm=", line):
            closed += 1
    return relayed, closed


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_turn(clients: int, messages: int, size: int, uclients: int = 1) -> dict:
    tmp = tempfile.mkdtemp(prefix="meshwg-relay-turn-")
    procs: list[subprocess.Popen] = []
    try:
        port, peer_port = free_udp_port(), free_udp_port()
        conf = write_config(tmp, port)
        server = subprocess.Popen(["turnserver", "-c", conf], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, cwd=tmp)
        procs.append(server)
        procs.append(subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=tmp))
        wait_udp_answer(port, STUN_BINDING, "turnserver")
        wait_udp_answer(peer_port, b"ping", "turnutils_peer")
        log_path = os.path.join(tmp, "turn.log")
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        # -c: one allocation a client (no RTCP twin); -z 0: no pacing (each client sends as fast as uclient can,
        # after a random 1-6 s start of its own); the default channel data (no -s).
        # uclient is one thread: more than one of them (the clients split among them) loads the server harder.
        shares = [clients // uclients + (i < clients % uclients) for i in range(uclients)]
        started = []
        for n in shares:
            argv = ["turnutils_uclient", "-u", USER, "-w", PASSWORD, "-p", str(port), "-e", "127.0.0.1",
                    "-r", str(peer_port), "-l", str(size), "-n", str(messages), "-m", str(n), "-c", "-z", "0",
                    "127.0.0.1"]
            started.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, cwd=tmp))
            procs.append(started[-1])
        outs = [c.communicate(timeout=600)[0] for c in started]
        # The last usage lines come as the allocations close (uclient refreshes them to lifetime 0 at its end).
        deadline = time.monotonic() + 15
        relayed, closed = usage_counts(read(log_path))
        while closed < clients and time.monotonic() < deadline:
            time.sleep(0.1)
            relayed, closed = usage_counts(read(log_path))
        cpu1, t1 = cpu_seconds(server.pid), time.monotonic()
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    totals = [re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$", out, re.M)[-1:] for out in outs]
    cpu = cpu1 - cpu0
    return {"clients": clients, "uclients": uclients, "size": size, "messages": messages,
            "client_sent": sum(int(t[0][0]) for t in totals if t),
            "client_echoed": sum(int(t[0][1]) for t in totals if t),
            "relayed": relayed, "sessions_closed": closed, "server_cpu_s": round(cpu, 2),
            "wall_s": round(t1 - t0, 2),
            "pkt_s_per_core": round(relayed / cpu) if cpu else 0,
            "us_per_pkt": round(cpu * 1e6 / relayed, 2) if relayed else 0,
            "gbit_s_per_core": round(relayed * size * 8 / cpu / 1e9, 3) if cpu else 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="meshwg node pairs; TURN gets 2 x this many clients")
    p.add_argument("--time", type=float, default=5.0, help="meshwg flood seconds")
    p.add_argument("--size", type=int, default=1400, help="relayed payload bytes, both servers")
    p.add_argument("--messages", type=int, default=50000, help="messages each TURN client sends (default 50000)")
    p.add_argument("--uclients", type=int, default=1, help="turnutils_uclient processes the clients split among")
    args = p.parse_args()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"turn: coturn's {', '.join(missing)} not found (the Debian package coturn; scripts/setup installs it):"
              " TURN reference skipped", flush=True)
        return 0
    m = forward.run(args.pairs, args.time, args.size, ["--node-rate", "100000", "--total-rate", "0"], None)
    print("relay forward: " + "  ".join(f"{k}={v}" for k, v in m.items()), flush=True)
    t = run_turn(2 * args.pairs, args.messages, args.size, max(1, min(args.uclients, 2 * args.pairs)))
    print("turn forward:  " + "  ".join(f"{k}={v}" for k, v in t.items()), flush=True)
    if not (m["pkt_s_per_core"] and t["pkt_s_per_core"]):
        print("meshwg/TURN: no figure (a side relayed nothing)")
        return 0
    print(f"packets/s per core of server CPU, {args.size} B: meshwg {m['pkt_s_per_core']:,}  "
          f"TURN {t['pkt_s_per_core']:,}  meshwg/TURN {m['pkt_s_per_core'] / t['pkt_s_per_core']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What an idle mesh costs (issue 15): wake-ups per second and CPU of an agent with 4 peers and of the signal
server, once the mesh has settled and no traffic flows. Real `meshwg join` agents in network namespaces on one
bridge; a wake-up is a context switch of any of the process's threads (/proc/PID/task/*/status), which counts
every return from epoll/poll/futex, timer or packet alike. Goal: <= 2 wake-ups/s for an idle agent.

Settled: past the 45 s after the last traffic at which every peer turns idle (meshwg.disco.paths
SESSION_ACTIVE_TIMEOUT; until then active paths' disco heartbeats run every 2 s, as they must).

Run (as root): .venv/bin/python benchmarks/idle [--peers 4] [--settle 60] [--window 30] [--threads]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path[:0] = [REPO, os.path.join(REPO, "tests", "join"), os.path.join(REPO, "benchmarks")]

from joinnet import BridgeNet  # noqa: E402
from procstat import cpu_seconds  # noqa: E402
from scenarios.netns import wait_for  # noqa: E402


def thread_switches(pid: int) -> dict[str, int]:
    """Context switches per thread, keyed by "tid comm" (--threads)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[f"{tid} {comm}"] = sum(int(ln.split()[1]) for ln in f if "ctxt_switches:" in ln)
        except OSError:
            pass
    return out


def switches_between(before: dict[str, int], after: dict[str, int]) -> int:
    """Context switches in the window: each thread's own difference (a thread that ended in the window took its
    count with it, which made a whole-process difference negative; one that began counts from 0)."""
    return sum(count - before.get(thread, 0) for thread, count in after.items())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=4, help="peers of the measured agent")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="seconds of quiet before measuring (peers turn idle 45 s after their last traffic)")
    ap.add_argument("--window", type=float, default=30.0, help="seconds measured")
    ap.add_argument("--threads", action="store_true", help="also print each thread's wake-ups")
    args = ap.parse_args()
    net = BridgeNet(n=94)
    try:
        invite = net.start_server()
        nodes = [net.node(f"n{i}") for i in range(args.peers + 1)]
        for n in nodes:
            n.start(invite)
        wait_for(lambda: all(n.mesh_ip() for n in nodes), timeout=60, what="every node joined")
        first = nodes[0]
        for peer in nodes[1:]:  # one ping each way, so every pair has handshaken and found its path
            wait_for(lambda p=peer: first.ping(p.mesh_ip()), timeout=20, what=f"ping {peer.name}")
        time.sleep(args.settle)
        pids = {"agent": first.proc.pid, "server": net.server.pid}
        threads_before = {name: thread_switches(pid) for name, pid in pids.items()}
        cpu_before, t0 = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
        time.sleep(args.window)
        cpu_after, elapsed = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic() - t0
        threads_after = {name: thread_switches(pid) for name, pid in pids.items()}
        print(f"idle mesh: 1 agent with {args.peers} peers, settled {args.settle:.0f} s, measured {elapsed:.1f} s")
        for name in pids:
            wakeups = switches_between(threads_before[name], threads_after[name]) / elapsed
            cpu = 100 * (cpu_after[name] - cpu_before[name]) / elapsed
            print(f"  {name:6s}: {wakeups:6.1f} wake-ups/s, {cpu:.2f}% of a core")
            if args.threads:
                for thread, count in threads_after[name].items():
                    rate = (count - threads_before[name].get(thread, 0)) / elapsed
                    print(f"    thread {thread}: {rate:.1f}/s")
        return 0
    finally:
        net.close()


if __name__ == "__main__":
    sys.exit(main())

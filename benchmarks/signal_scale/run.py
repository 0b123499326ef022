"""signal_scale: N simulated nodes over loopback against a real `meshwg-signal serve` process.

Each simulated node does the real Noise IK handshake and registration, keeps its session with heartbeats,
and tracks the directory (a light decoder: key, online flag and candidates of each entry, so the load
generator's own CPU does not dominate the measurement). Reports:
  join phase duration, time to convergence after the last join (every node sees every other online),
  endpoint change propagation (one node reports new candidates; time until all others see them),
  server RSS and CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import msgpack
import trio

from meshwg.signaling import protocol as P
from meshwg.control.client import ControlConnection
from meshwg.signaling.invite import parse_invite
from procstat import cpu_seconds, rss_kb
from signal_proc import SignalProcess, free_port


MARK_NET = "192.0.2."  # endpoint changes are reported in TEST-NET-1 (a kind a node may claim: "local")


class SimNode:
    __slots__ = ("conn", "key", "online", "cands", "converged_at", "seen", "n")

    def __init__(self, conn, key, n):
        self.conn, self.key, self.n = conn, key, n
        self.online: set = set()
        self.cands: dict = {}
        self.converged_at = None
        self.seen: dict = {}  # marker -> time first seen

    def apply(self, raw_entries, removes, now):
        for raw in raw_entries:
            e = msgpack.unpackb(raw, raw=False)
            k = e["key"]
            if e["online"]:
                self.online.add(k)
            else:
                self.online.discard(k)
            for c in e["cand"]:
                if c[0].startswith(MARK_NET) and c[1] not in self.seen:
                    self.seen[c[1]] = now
        for k in removes:
            self.online.discard(k)
        if self.converged_at is None and len(self.online) == self.n - 1:
            self.converged_at = now

    async def loop(self, hb):
        conn = self.conn
        stream, chan = conn.stream, conn.chan
        next_hb = trio.current_time() + hb  # trio's clock, not time.monotonic (different origin)
        while True:
            with trio.move_on_at(next_hb):
                data = await stream.receive_some(1 << 20)
                if not data:
                    return
                now = time.monotonic()
                for m in chan.feed_untrusted(data):
                    t = m["type"]
                    if t == P.T_DIR_FULL:
                        if m.get("first"):
                            self.online.clear()
                        self.apply(m["peers"], (), now)
                    elif t == P.T_DIR_UPDATE:
                        self.apply(m["upsert"], m["remove"], now)
            if trio.current_time() >= next_hb:
                next_hb += hb
                await conn.heartbeat()


async def bench(args, invite_text, server_pid):
    inv = parse_invite(invite_text)
    n = args.nodes
    nodes: list[SimNode] = []
    sem = trio.Semaphore(args.concurrency)
    lat: list[float] = []
    t_start = time.monotonic()

    async with trio.open_nursery() as nursery:
        async def join(i):
            async with sem:
                key = os.urandom(32)
                t_j = time.monotonic()
                conn = await ControlConnection.open(inv, key, name=f"sim{i}",
                                                    candidates=[("10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255), 51820, "local")],
                                                    timeout=60)
            lat.append(time.monotonic() - t_j)
            node = SimNode(conn, key, n)
            for m in conn._pending:  # frames that arrived with the welcome
                if m["type"] == P.T_DIR_FULL:
                    node.apply(m["peers"], (), time.monotonic())
                elif m["type"] == P.T_DIR_UPDATE:
                    node.apply(m["upsert"], m["remove"], time.monotonic())
            conn._pending = []
            nodes.append(node)
            if len(nodes) % 100 == 0:
                print(f"  {len(nodes)} joined at {time.monotonic() - t_start:.2f} s", flush=True)
            nursery.start_soon(node.loop, args.heartbeat)

        async with trio.open_nursery() as joins:
            for i in range(n):
                joins.start_soon(join, i)
        t_last_join = time.monotonic()
        lat.sort()
        print(f"join latency: median {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms, "
              f"max {lat[-1] * 1000:.0f} ms; over 900 ms: {sum(1 for x in lat if x > 0.9)}", flush=True)
        print(f"joined {n} nodes in {t_last_join - t_start:.2f} s ({n / (t_last_join - t_start):.0f} joins/s)", flush=True)

        with trio.move_on_after(args.timeout):
            while any(x.converged_at is None for x in nodes):
                await trio.sleep(0.05)
        done = [x.converged_at for x in nodes if x.converged_at is not None]
        conv = max(done) - t_last_join if len(done) == n else float("nan")
        print(f"converged: {len(done)}/{n} nodes; all converged {max(conv, 0):.2f} s after the last join", flush=True)
        rss_after_join = rss_kb(server_pid)

        # endpoint changes: one node at a time reports a new candidate; measure until all others saw it
        props = []
        for j in range(args.changes):
            src = nodes[j * 7 % n]
            marker = 40000 + j
            t0 = time.monotonic()
            await src.conn.report_candidates([(MARK_NET + "%d" % (j + 1), marker, "local")])
            with trio.move_on_after(10):
                while any(marker not in x.seen for x in nodes if x is not src):
                    await trio.sleep(0.005)
            seen = [x.seen.get(marker) for x in nodes if x is not src]
            if all(seen):
                props.append(max(seen) - t0)
            await trio.sleep(0.2)
        print("endpoint change visible to all: " + (
            f"median {statistics.median(props) * 1000:.0f} ms, max {max(props) * 1000:.0f} ms over {len(props)} changes"
            if props else "never"), flush=True)

        await trio.sleep(args.steady)  # heartbeats keep flowing
        result = {
            "nodes": n,
            "join_seconds": round(t_last_join - t_start, 2),
            "convergence_after_last_join_s": round(conv, 3),
            "endpoint_change_median_ms": round(statistics.median(props) * 1000, 1) if props else None,
            "endpoint_change_max_ms": round(max(props) * 1000, 1) if props else None,
            "server_rss_mb_after_join": round(rss_after_join / 1024, 1),
            "server_rss_mb_end": round(rss_kb(server_pid) / 1024, 1),
            "server_cpu_s": round(cpu_seconds(server_pid), 2),
        }
        nursery.cancel_scope.cancel()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64, help="joins in flight at once")
    ap.add_argument("--heartbeat", type=float, default=10.0)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--steady", type=float, default=3.0, help="seconds of steady state after the changes")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.nodes + 256)), hard))
    with SignalProcess(["--udp", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "--relay-tcp", "none",
                        "--heartbeat", str(args.heartbeat),
                        # every simulated node shares 127.0.0.1: one "source" here is the whole mesh
                        "--max-unauthenticated-per-source", str(args.nodes + 16),
                        "--accept-rate", str(max(10 * args.nodes, 10))],
                       log_level=args.log_level, nofile=min(hard, 4 * args.nodes + 256)) as srv:
        result = trio.run(bench, args, srv.invite_text, srv.proc.pid)
        print(json.dumps(result, indent=2))
    return 0

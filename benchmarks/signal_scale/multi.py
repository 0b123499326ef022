"""signal_scale with the simulated nodes in several processes (--procs K, no --policy), so the measurement is the
server's and not one client process starving it on a 2-core machine; and the run against two servers on one
PostgreSQL (--pg: a throwaway cluster, half the workers on each server).

Worker w (a forked process with its own trio loop) joins nodes w, w+K, w+2K, ... through server w % S and tracks
their directories with run.SimNode; it talks to the coordinator (this process, no trio) over a pipe:
  worker -> ("ready")                          coordinator -> ("go", t_start)
  worker -> ("joined", t_last, latencies)      (its nodes keep their sessions and heartbeats)
  worker -> ("converged", t_last_converged | None, how many)
  coordinator -> ("change", j, node index, marker)   every worker -> ("seen", t | None): the last of its nodes to
                                                      see the marker (the owner of the node reports it)
  coordinator -> ("stop")                      worker -> ("cpu", user+sys seconds)
Times are time.monotonic(), one clock for every process on the host (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import time
from multiprocessing.connection import wait

from procstat import cpu_seconds, rss_kb


def _split(pid: int) -> tuple:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def _hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# --- a worker process

def worker(conn, w: int, k: int, args, invite_text: str) -> None:
    import gc

    import trio

    import run
    run.LIGHT[0] = True
    gc.set_threshold(20000, 20, 50)  # the load generator's own collections are not what is measured
    try:
        trio.run(_worker, conn, w, k, args, invite_text)
    finally:
        u = os.times()
        conn.send(("cpu", round(u.user + u.system, 2)))


async def _recv(conn):
    import trio
    return await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)


async def _worker(conn, w: int, k: int, args, invite_text: str) -> None:
    import trio

    from meshwg.control.client import ControlConnection
    from meshwg.signaling import protocol as P
    from meshwg.signaling.invite import parse_invite
    from run import MARK_NET, SimNode

    inv = parse_invite(invite_text)
    n = args.nodes
    mine = list(range(w, n, k))
    nodes: dict[int, SimNode] = {}
    lat: list = []
    sem = trio.Semaphore(max(1, args.concurrency // k))
    conn.send(("ready",))
    _, t_start = await _recv(conn)

    async with trio.open_nursery() as nursery:
        async def join(i):
            async with sem:
                key = os.urandom(32)
                t_j = time.monotonic()
                c = await ControlConnection.open(inv, key, name=f"sim{i}",
                                                 candidates=[("10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255),
                                                              51820, "local")], timeout=120)
            lat.append(time.monotonic() - t_j)
            node = SimNode(c, key, n, i)
            for m in c._pending:  # frames that came with the welcome
                if m["type"] == P.T_DIR_FULL:
                    node.apply(m["peers"], (), time.monotonic())
                elif m["type"] == P.T_DIR_UPDATE:
                    node.apply(m["upsert"], m["remove"], time.monotonic())
            c._pending = []
            nodes[i] = node
            if len(nodes) % 1000 == 0:
                print(f"  worker {w}: {len(nodes)} joined at {time.monotonic() - t_start:.1f} s", flush=True)
            nursery.start_soon(node.loop, args.heartbeat)

        async with trio.open_nursery() as joins:
            for i in mine:
                joins.start_soon(join, i)
        conn.send(("joined", time.monotonic(), lat))

        with trio.move_on_after(args.timeout):
            while any(x.converged_at is None for x in nodes.values()):
                await trio.sleep(0.05)
        done = [x.converged_at for x in nodes.values() if x.converged_at is not None]
        conn.send(("converged", max(done) if len(done) == len(nodes) else None, len(done)))

        while True:
            cmd = await _recv(conn)
            if cmd[0] == "stop":
                break
            _, j, src_i, marker = cmd
            src = nodes.get(src_i)
            if src is not None:
                await src.conn.report_candidates([(MARK_NET + "%d" % (j + 1), marker, "local")])
            others = [x for x in nodes.values() if x is not src]
            with trio.move_on_after(10):
                while any(marker not in x.seen for x in others):
                    await trio.sleep(0.005)
            seen = [x.seen.get(marker) for x in others]
            conn.send(("seen", max(seen) if all(seen) else None))
        nursery.cancel_scope.cancel()


# --- the coordinator

class Workers:
    def __init__(self, k: int, args, invites: list[str]) -> None:
        ctx = mp.get_context("fork")  # no trio running here yet: a plain fork
        self.conns, self.procs = [], []
        for w in range(k):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker, args=(b, w, k, args, invites[w % len(invites)]), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)

    def all(self, kind: str, timeout: float) -> list:
        """One message of `kind` from every worker (a worker's message of another kind is an error)."""
        got: dict = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.conns):
            left = deadline - time.monotonic()
            ready = wait([c for c in self.conns if c not in got], max(0.0, left))
            if not ready:
                raise SystemExit(f"workers did not answer {kind!r} within {timeout:g} s")
            for c in ready:
                try:
                    m = c.recv()
                except EOFError:
                    raise SystemExit(f"a worker died (waiting for {kind!r})") from None
                if m[0] != kind:
                    raise SystemExit(f"a worker answered {m[0]!r}, not {kind!r}")
                got[c] = m
        return [got[c] for c in self.conns]

    def send(self, msg) -> None:
        for c in self.conns:
            c.send(msg)

    def close(self) -> None:
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()  # by its own PID (multiprocessing)
                p.join()


def drive(args, invites: list[str], server_pids: list[int], pg_pid: int | None = None) -> dict:
    n, k = args.nodes, args.procs
    cpu0 = [cpu_seconds(p) for p in server_pids]
    load0 = os.getloadavg()
    ws = Workers(k, args, invites)
    try:
        ws.all("ready", 60)
        t_start = time.monotonic()
        ws.send(("go", t_start))
        joined = ws.all("joined", 3600)
        t_last = max(m[1] for m in joined)
        lat = sorted(x for m in joined for x in m[2])
        rate = n / (t_last - t_start)
        print(f"join latency: median {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} "
              f"ms, max {lat[-1] * 1000:.0f} ms", flush=True)
        print(f"joined {n} nodes in {t_last - t_start:.2f} s ({rate:.0f} joins/s)", flush=True)
        cpu_join = [round(cpu_seconds(p) - c, 2) for p, c in zip(server_pids, cpu0)]
        conv = ws.all("converged", args.timeout + 60)
        ok = all(m[1] is not None for m in conv)
        t_conv = max(m[1] for m in conv) - t_last if ok else float("nan")
        print(f"converged: {sum(m[2] for m in conv)}/{n} nodes; all converged {max(t_conv, 0):.2f} s after the last "
              f"join", flush=True)
        rss_join = [round(rss_kb(p) / 1024, 1) for p in server_pids]
        props = []
        for j in range(args.changes):
            src = j * 7 % n
            t0 = time.monotonic()
            ws.send(("change", j, src, 40000 + j))
            seen = ws.all("seen", 30)
            if all(m[1] is not None for m in seen):
                props.append(max(m[1] for m in seen) - t0)
            time.sleep(0.2)
        print("endpoint change visible to all: " + (
            f"median {statistics.median(props) * 1000:.0f} ms, max {max(props) * 1000:.0f} ms over {len(props)} "
            "changes" if props else "never"), flush=True)
        time.sleep(args.steady)
        ws.send(("stop",))
        clients_cpu = sum(m[1] for m in ws.all("cpu", 60))
    finally:
        ws.close()
    load1 = os.getloadavg()
    return {
        "nodes": n,
        "servers": len(server_pids),
        "client_processes": k,
        "join_seconds": round(t_last - t_start, 2),
        "joins_per_s": round(rate, 1),
        "join_latency_median_ms": round(lat[len(lat) // 2] * 1000, 1),
        "convergence_after_last_join_s": round(t_conv, 3),
        "endpoint_change_median_ms": round(statistics.median(props) * 1000, 1) if props else None,
        "endpoint_change_max_ms": round(max(props) * 1000, 1) if props else None,
        "server_rss_mb_after_join": rss_join,
        "server_rss_mb_peak": [_hwm_mb(p) for p in server_pids],
        "server_cpu_s_join_phase": cpu_join,
        "server_cpu_s": [round(cpu_seconds(p) - c, 2) for p, c in zip(server_pids, cpu0)],
        "server_user_sys_s": [[round(x, 2) for x in _split(p)] for p in server_pids],
        "clients_cpu_s": round(clients_cpu, 2),
        **({"postgres_cpu_s": round(_tree_cpu(pg_pid), 2)} if pg_pid else {}),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in load1],
    }


def _tree_cpu(root: int) -> float:
    """CPU seconds of a process, its exited children, and its running children (the postmaster, its backends)."""
    tck, total = os.sysconf("SC_CLK_TCK"), 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d) == root:
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) == root:
            total += int(fields[11]) + int(fields[12])
    return total / tck


def server_args(args, udp_port: int) -> list[str]:
    return ["--udp", f"127.0.0.1:{udp_port}", "--relay-tcp", "none", "--heartbeat", str(args.heartbeat),
            # every simulated node shares 127.0.0.1: one "source" here is the whole mesh
            "--max-unauthenticated-per-source", str(args.nodes + 16), "--accept-rate", str(max(10 * args.nodes, 10))]


def main_sqlite(args, nofile: int) -> dict:
    from signal_proc import SignalProcess, free_port

    with SignalProcess(server_args(args, free_port(socket.SOCK_DGRAM)), log_level=args.log_level,
                       nofile=nofile) as srv:
        return drive(args, [srv.invite_text], [srv.proc.pid])


def main_pg(args, nofile: int) -> dict:
    """Two servers on one throwaway PostgreSQL cluster (tests/signal/pg_cluster.py: fsync and synchronous_commit
    off, a unix socket in a temporary directory), the workers spread over both."""
    import sys

    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "tests", "signal")))
    from pg_cluster import Cluster
    from signal_proc import SignalProcess, free_port

    cluster = Cluster()
    try:
        cluster.start()
        url = cluster.create_db()
        a = SignalProcess(server_args(args, free_port(socket.SOCK_DGRAM)), log_level=args.log_level, nofile=nofile,
                          db=url)
        with a:
            b = SignalProcess(server_args(args, free_port(socket.SOCK_DGRAM)), log_level=args.log_level,
                              nofile=nofile, db=url, init=False)
            with b:
                with open(os.path.join(cluster.data, "postmaster.pid")) as f:
                    pg_pid = int(f.readline())
                return drive(args, [a.invite_text, b.invite_text], [a.proc.pid, b.proc.pid], pg_pid)
    finally:
        cluster.stop()

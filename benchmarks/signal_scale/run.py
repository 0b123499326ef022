"""signal_scale: N simulated nodes over loopback against a real `meshwg-signal serve` process.

Each simulated node does the real Noise IK handshake and registration, keeps its session with heartbeats,
and tracks the directory (a light decoder: key, online flag and candidates of each entry, so the load
generator's own CPU does not dominate the measurement). Reports:
  join phase duration, time to convergence after the last join (every node sees every other online),
  endpoint change propagation (one node reports new candidates; time until all others see them),
  server RSS and CPU time.

Without --policy the nodes run in --procs processes (default 2, multi.py), so the measurement is the server's and not
one client process starving it on two cores; the clients' CPU is printed beside the server's. --pg: two servers on
one throwaway PostgreSQL cluster, half the client processes on each.

--policy (issue 13): the server runs with an access policy file; nodes join with tagged invites (ops, web/db and
one of ten teams). After convergence the benchmark rewrites the file and measures, for each change, the time from
the write until every node's directory (visible peers and each one's "accept" list) equals what the policy says
(computed here with signal_server.policy): the 20-rule policy replacing a one-rule one (every accept list
changes), one rule's ports (the entries of the ten ops nodes change at every other node), the allow-all rule
removed (most peers hidden) and put back (revealed).

Each change is measured twice. "deferred": the simulated nodes only keep the bytes they receive (with their arrival
time) until the server has been quiet for a second, then decode them; the figure is the write to the arrival of
the bytes that made the last node's directory right, i.e. the server's delivery, with the clients' decoding (a
full rewrite is ~1 M entries, several CPU seconds in this one process, on the server's cores) reported apart as
"clients' decoding". "live": nodes decode as bytes arrive (the clients' decoding is then in the figure). Both print
the server's CPU (user, sys) and its peak RSS during the change. --profile DIR runs py-spy on the server and on this
process during each deferred change.
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


LIGHT = [False]  # SimNode.apply_light (set without --policy)
_KEY_HEAD = b"\xa3key\xc4\x20"
_ONLINE, _OFFLINE = b"\xa6online\xc3", b"\xa6online\xc2"
_MARK_B = MARK_NET.encode()

_INTERN: dict = {}  # accept lists as tuples, one object per distinct list (a million entries share a few)


def _accept_of(e):
    acc = e.get("accept")
    if acc is None:
        return None
    t = tuple(tuple(x) for x in acc)
    return _INTERN.setdefault(t, t)


_IDS: dict = {}  # key -> index in every node's _Bits (one dict per process, not one set of keys per node)


class _Bits:
    """A set of peer keys as one byte per peer of the process-wide index (10,000 nodes, each with a set of 10,000
    keys, took gigabytes of the client processes)."""

    __slots__ = ("bits", "n")

    def __init__(self, keys=()) -> None:
        self.bits, self.n = bytearray(max(1024, 2 * len(_IDS))), 0
        for k in keys:
            self.put(k, True)

    def put(self, key: bytes, on: bool) -> None:
        i = _IDS.get(key)
        if i is None:
            i = _IDS[key] = len(_IDS)
        if i >= len(self.bits):
            self.bits.extend(bytes(len(self.bits)))
        if self.bits[i] != on:
            self.bits[i] = on
            self.n += 1 if on else -1

    def difference_update(self, keys) -> None:
        for k in keys:
            if k in _IDS:
                self.put(k, False)

    def discard(self, key: bytes) -> None:
        self.difference_update((key,))

    def add(self, key: bytes) -> None:
        self.put(key, True)

    def clear(self) -> None:
        self.bits, self.n = bytearray(len(self.bits)), 0

    def __len__(self) -> int:
        return self.n


class SimNode:
    __slots__ = ("conn", "key", "online", "cands", "converged_at", "seen", "n", "index", "acc", "updated", "raw",
                 "clock")

    def __init__(self, conn, key, n, index=0, clock=None):
        self.conn, self.key, self.n, self.index = conn, key, n, index
        self.online: set = set()
        self.cands: dict = {}
        self.converged_at = None
        self.seen: dict = {}  # marker -> time first seen
        self.acc: dict = {}  # peer key -> its accept list (tuple) or None: the directory as the policy shapes it
        self.updated = 0.0  # when the directory last changed
        # None: bytes are decoded as they arrive. A list: they are only kept, with their arrival time, and decoded
        # later (drain): the server's delivery is then measured without the simulated clients' decoding, which
        # runs on the same cores, in the way.
        self.raw: list | None = None
        self.clock = clock  # a shared [last arrival time] (deferred mode)

    def apply(self, raw_entries, removes, now):
        if LIGHT[0]:
            return self.apply_light(raw_entries, removes, now)
        for raw in raw_entries:
            e = msgpack.unpackb(raw, raw=False)
            k = e["key"]
            self.acc[k] = _accept_of(e)
            if e["online"]:
                self.online.add(k)
            else:
                self.online.discard(k)
            for c in e["cand"]:
                if c[0].startswith(MARK_NET) and c[1] not in self.seen:
                    self.seen[c[1]] = now
        for k in removes:
            self.online.discard(k)
            self.acc.pop(k, None)
        self.updated = now
        if self.converged_at is None and len(self.online) == self.n - 1:
            self.converged_at = now

    def apply_light(self, raw_entries, removes, now):
        """apply() without decoding each entry in Python (no policy: only who is online and the markers matter):
        an entry packs "key" first (signal_server's Node.entry), so its key is bytes 7..39; "online" is found by
        its packed bytes. At 10,000 nodes the clients get 10^8 entries: decoding each would measure this process."""
        if raw_entries:
            if raw_entries[0][1:7] != _KEY_HEAD:  # not the layout assumed: decode
                LIGHT[0] = False
                return self.apply(raw_entries, removes, now)
            on = self.online
            if not isinstance(on, _Bits):
                on = self.online = _Bits(on)
            for r in raw_entries:
                on.put(r[7:39], _ONLINE in r)
            if _MARK_B in b"".join(raw_entries):
                for r in raw_entries:
                    if _MARK_B in r:
                        for c in msgpack.unpackb(r, raw=False)["cand"]:
                            if c[0].startswith(MARK_NET) and c[1] not in self.seen:
                                self.seen[c[1]] = now
        self.online.difference_update(removes)
        self.updated = now
        if self.converged_at is None and len(self.online) == self.n - 1:
            self.converged_at = now

    def handle(self, data: bytes, now: float) -> bool:
        """Decode stream bytes; True when a directory message was among them."""
        changed = False
        for m in self.conn.chan.feed_untrusted(data):
            t = m["type"]
            if t == P.T_DIR_FULL:
                if m.get("first"):
                    self.online.clear()
                    self.acc.clear()
                self.apply(m["peers"], (), now)
                changed = True
            elif t == P.T_DIR_UPDATE:
                self.apply(m["upsert"], m["remove"], now)
                changed = True
        return changed

    def drain(self, want) -> float | None:
        """Decode what deferred mode kept; the arrival time of the bytes that made the directory equal `want`
        (None: it never did). Back to decoding as bytes arrive."""
        raw, self.raw = self.raw or [], None
        got = None
        for now, data in raw:
            if self.handle(data, now) and got is None and self.acc == want:
                got = now
        return got

    async def loop(self, hb):
        conn = self.conn
        stream = conn.stream
        next_hb = trio.current_time() + hb  # trio's clock, not time.monotonic (different origin)
        while True:
            with trio.move_on_at(next_hb):
                data = await stream.receive_some(1 << 20)
                if not data:
                    return
                now = time.monotonic()
                if self.raw is not None:
                    self.raw.append((now, data))
                    self.clock[0] = now
                else:
                    self.handle(data, now)
            if trio.current_time() >= next_hb:
                next_hb += hb
                await conn.heartbeat()


# --- --policy: tags, the policy texts, and what each node should see

TEAMS = 10


def node_tags(i: int) -> tuple:
    return ("ops" if i % 100 == 0 else "web" if i % 2 else "db", f"t{i % TEAMS}")


ALLOW_ALL = "[[rule]]\nfrom = ['*']\nto = ['*']\nports = ['icmp']\n"


def policy_text(allow_all: bool = True, ops_ports=("tcp:22",)) -> str:
    """20 rules (19 without the allow-all one): ops reach everyone, web reaches db, teams reach their own and
    seven of them the web tier."""
    q = lambda xs: "[" + ", ".join(f"'{x}'" for x in xs) + "]"  # noqa: E731
    rules = [ALLOW_ALL] if allow_all else []
    rules.append(f"[[rule]]\nfrom = ['tag:ops']\nto = ['*']\nports = {q(ops_ports)}\n")
    rules.append("[[rule]]\nfrom = ['tag:web']\nto = ['tag:db']\nports = ['tcp:5432']\n")
    rules += [f"[[rule]]\nfrom = ['tag:t{k}']\nto = ['tag:t{k}']\nports = ['tcp:8000-8100']\n" for k in range(TEAMS)]
    rules += [f"[[rule]]\nfrom = ['tag:t{k}']\nto = ['tag:web']\nports = ['tcp:443', 'udp:443']\n" for k in range(7)]
    return "\n".join(rules)


def expected_views(text: str, nodes) -> dict:
    """node key -> {peer key: accept tuple} as the policy says (per class pair, as the server evaluates it)."""
    from signal_server import policy as pol

    from meshwg.wg.crypto import dh_pub

    acl = pol.Acl(pol.parse(text, "bench"))
    pub = {x.key: dh_pub(x.key) for x in nodes}  # SimNode.key is its private key; entries name public keys
    members = {pub[x.key]: pol.Member(pub[x.key], f"sim{x.index}", frozenset(node_tags(x.index)),
                                      (f"{x.conn.welcome.ipv4}/32", f"{x.conn.welcome.ipv6}/128")) for x in nodes}
    cls = {k: acl.class_of(m) for k, m in members.items()}
    out = {}
    for x in nodes:
        me, mc, view = {}, cls[pub[x.key]], {}
        for k, pc in cls.items():
            if k == pub[x.key]:
                continue
            v = view.get(pc)
            if v is None:
                vw = acl.view(mc, pc)
                t = tuple(tuple(e) for e in pol.expand(vw.template, members[pub[x.key]].addrs)) if vw.visible else False
                v = view[pc] = _INTERN.setdefault(t, t) if t is not False else False
            if v is not False:
                me[k] = v
        out[x.key] = me
    return out


def _write_policy(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # an editor's atomic save: the server never reads half a file


def _differs(nodes, want) -> str:
    """How one node's directory differs from what the policy says."""
    x = next(iter(nodes))
    w = want[x.key]
    extra, missing = set(x.acc) - set(w), set(w) - set(x.acc)
    wrong = [k for k in set(w) & set(x.acc) if w[k] != x.acc[k]]
    return (f"  sim{x.index}: {len(nodes)} nodes differ; e.g. {len(extra)} peers too many, {len(missing)} missing, "
            f"{len(wrong)} accept lists differ" + (f" ({x.acc[wrong[0]]} != {w[wrong[0]]})" if wrong else ""))


async def _until_right(pending: dict, want, done_at: float, limit: float) -> float:
    """Decoding as bytes arrive: the time the last of `pending` got its directory right (the latest of `done_at`
    and those), nan when some did not within `limit` seconds."""
    with trio.move_on_after(limit):
        while pending:
            for k, x in list(pending.items()):
                if x.acc == want[k]:
                    done_at = max(done_at, x.updated)
                    del pending[k]
            if pending:
                await trio.sleep(0.01)
    if pending:
        print(_differs(pending.values(), want))
        return float("nan")
    return done_at


class _Sampler:
    """The server's resident memory, sampled every 10 ms while a change is measured: its peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb = pid, 0

    async def run(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
            await trio.sleep(0.01)


QUIET = 1.0  # deferred mode: the server is taken to be done after this long with no byte to any node


async def policy_change(path: str, text: str, nodes, server_pid: int, deferred: bool = False) -> dict:
    """Write the policy and wait until every node's directory is what it says.

    Live mode: nodes decode as bytes arrive; "s" is the write to the last node's directory being right.
    Deferred mode: nodes only keep the bytes until the server has been quiet for QUIET s, then decode them;
    "s" is the write to the arrival of the bytes that made the last node's directory right (the server's delivery,
    with the clients' decoding out of the way), "client_decode_s" the CPU the simulated clients then spent decoding.
    """
    want = expected_views(text, nodes)
    clock = [0.0]
    if deferred:
        for x in nodes:
            x.raw, x.clock = [], clock
    cpu0, ticks0 = cpu_seconds(server_pid), _cpu_split(server_pid)
    out: dict = {}
    async with trio.open_nursery() as nursery:
        sampler = _Sampler(server_pid)
        nursery.start_soon(sampler.run)
        t0 = time.monotonic()
        _write_policy(path, text)
        pending = {x.key: x for x in nodes}
        done_at = t0
        if deferred:
            with trio.move_on_after(30):
                while clock[0] <= t0 or time.monotonic() - clock[0] < QUIET:
                    await trio.sleep(0.05)
            out["server_cpu_s"] = round(cpu_seconds(server_pid) - cpu0, 2)
            out["server_user_sys_s"] = [round(b - a, 2) for a, b in zip(ticks0, _cpu_split(server_pid))]
            c0 = time.process_time()
            for x in nodes:
                got = x.drain(want[x.key])
                if got is not None:
                    done_at = max(done_at, got)
                    del pending[x.key]
            out["client_decode_s"] = round(time.process_time() - c0, 2)
            if pending:  # not all there when the server went quiet: the rest as it comes (and says so)
                print(f"  {len(pending)} nodes not right when the server went quiet; waiting")
                out["late"] = len(pending)
        done_at = await _until_right(pending, want, done_at, 30)
        if not deferred:
            out["server_cpu_s"] = round(cpu_seconds(server_pid) - cpu0, 2)
            out["server_user_sys_s"] = [round(b - a, 2) for a, b in zip(ticks0, _cpu_split(server_pid))]
        out["s"] = round(done_at - t0, 3)
        out["server_rss_peak_mb"] = round(sampler.peak_kb / 1024, 1)
        nursery.cancel_scope.cancel()
    return out


def _cpu_split(pid: int) -> tuple:
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


POLICY_CHANGES = (("load_20_rules", policy_text()),
                  ("one_rule_ports", policy_text(ops_ports=("tcp:22", "tcp:8443"))),
                  ("hide_allow_all_removed", policy_text(False, ("tcp:22", "tcp:8443"))),
                  ("reveal_allow_all_back", policy_text(True, ("tcp:22", "tcp:8443"))))


async def policy_changes(args, path: str, nodes, server_pid: int) -> dict:
    """Each change of POLICY_CHANGES measured in deferred mode, then (from allow-all again) in live mode."""
    results = {}
    for mode in ("deferred", "live"):
        if mode == "live":
            await policy_change(path, ALLOW_ALL, nodes, server_pid)  # back to the start, not measured
            await trio.sleep(0.5)
        for label, text in POLICY_CHANGES:
            prof = _profile(args, f"{label}_{mode}", server_pid) if mode == "deferred" else []
            r = await policy_change(path, text, nodes, server_pid, deferred=mode == "deferred")
            for p in prof:
                await trio.to_thread.run_sync(p.wait)
            results[f"{label}_{mode}"] = r
            extra = f", clients' decoding {r['client_decode_s']:.2f} s CPU" if "client_decode_s" in r else ""
            print(f"policy change {label} ({mode}): every node's directory right after {r['s'] * 1000:.0f} ms; "
                  f"server CPU {r['server_cpu_s']:.2f} s (user, sys {r['server_user_sys_s']}){extra}; "
                  f"server RSS peak {r['server_rss_peak_mb']:.0f} MB", flush=True)
            await trio.sleep(0.5)
    return results


def _profile(args, label: str, server_pid: int) -> list:
    """--profile DIR: py-spy samples the server and this process (the simulated clients) during one change."""
    if not args.profile:
        return []
    import subprocess
    import sys

    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    procs = [subprocess.Popen([spy, "record", "--nonblocking", "-r", "200", "-d", str(args.profile_seconds), "-f",
                               "raw", "-o", os.path.join(args.profile, f"{who}_{label}.txt"), "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(args.profile, "py-spy.log"), "a"))
             for who, pid in (("server", server_pid), ("clients", os.getpid()))]
    time.sleep(1.0)  # attached before the change
    return procs


async def bench(args, invite_text, server_pid, invites=None, policy_path=None):
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
                conn = await ControlConnection.open(invites[node_tags(i)] if invites else inv, key, name=f"sim{i}",
                                                    candidates=[("10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255), 51820, "local")],
                                                    timeout=60)
            lat.append(time.monotonic() - t_j)
            node = SimNode(conn, key, n, i)
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

        policy_results = await policy_changes(args, policy_path, nodes, server_pid) if policy_path else {}

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
            "clients_cpu_s": round(time.process_time(), 2),
            "server_rss_mb_peak": round(_hwm_kb(server_pid) / 1024, 1),
            "policy_changes": policy_results,
        }
        nursery.cancel_scope.cancel()
    return result


def _hwm_kb(pid: int) -> int:
    """VmHWM (the peak resident memory) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64, help="joins in flight at once")
    ap.add_argument("--heartbeat", type=float, default=10.0)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--steady", type=float, default=3.0, help="seconds of steady state after the changes")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--policy", action="store_true", help="run with an access policy and measure policy changes")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the server and the clients during the full rewrite")
    ap.add_argument("--profile-seconds", type=int, default=6)
    ap.add_argument("--procs", type=int, default=None,
                    help="processes running the simulated nodes (default 2; with --policy 1: this process)")
    ap.add_argument("--pg", action="store_true",
                    help="two servers on one throwaway PostgreSQL cluster, half the client processes on each")
    args = ap.parse_args(argv)
    LIGHT[0] = not args.policy
    if args.procs is None:
        args.procs = 1 if args.policy else 2
    if args.policy and (args.procs > 1 or args.pg):
        ap.error("--policy runs its nodes in this process, on SQLite (--procs 1, no --pg)")

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.nodes + 256)), hard))
    if args.procs > 1 or args.pg:
        import multi

        args.procs = max(args.procs, 2 if args.pg else 1)
        result = (multi.main_pg if args.pg else multi.main_sqlite)(args, min(hard, 4 * args.nodes + 256))
        print("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items()) + "\n}")
        return 0
    import tempfile

    policy_dir = tempfile.mkdtemp(prefix="meshwg-bench-policy-") if args.policy else None
    policy_path = os.path.join(policy_dir, "policy.toml") if policy_dir else None
    if policy_path:
        with open(policy_path, "w") as f:
            f.write(ALLOW_ALL)  # valid with no node: tags are known once the invites exist
    with SignalProcess(["--udp", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "--relay-tcp", "none",
                        *(["--policy", policy_path] if policy_path else []),
                        "--heartbeat", str(args.heartbeat),
                        # every simulated node shares 127.0.0.1: one "source" here is the whole mesh
                        "--max-unauthenticated-per-source", str(args.nodes + 16),
                        "--accept-rate", str(max(10 * args.nodes, 10))],
                       log_level=args.log_level, nofile=min(hard, 4 * args.nodes + 256)) as srv:
        invites = None
        if policy_path:
            addr = f"{srv.control[0]}:{srv.control[1]}"
            combos = {node_tags(i) for i in range(args.nodes)}
            invites = {c: parse_invite(srv.admin("invite", "create", "--reusable", "--tag", ",".join(c), "--addr",
                                                 addr).strip().splitlines()[-1]) for c in combos}
        result = trio.run(bench, args, srv.invite_text, srv.proc.pid, invites, policy_path)
        print(json.dumps(result, indent=2))
    if policy_dir:
        import shutil

        shutil.rmtree(policy_dir, ignore_errors=True)
    return 0

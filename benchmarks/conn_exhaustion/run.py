"""conn_exhaustion: unauthenticated connection floods against a real `meshwg-signal serve` process (issue 10,
items 2 and 3), and what legitimate nodes see meanwhile. Loopback only.

Phase "control": attacker hosts (127.0.1.x, --sources of them) open idle TCP connections to the control
port at --rate a second each and hold them (never a byte); a node from 127.0.0.2 reconnects (handshake +
register) every 0.3 s. Phase "relay": the same hosts open as many idle relay TCP connections as they can
(up to --relay-conns) and hold them; nodes from 127.0.0.2 open a relay session and join every 0.3 s.
Reports per phase: connections the server held for the attackers (peak of its gauges), the server's open
descriptors and RSS (peak, and 2 s after the attackers left), the legitimate node's successes out of its
attempts, the server's refusal counters and how many accept-error lines it logged.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource

import trio

from meshwg.control.client import ControlConnection
from meshwg.signaling.invite import parse_invite
from meshwg.control.relay_client import open_tcp_relay
from procstat import rss_kb
from signal_proc import SignalProcess, free_port
from signal_server.metrics import parse_text

_open_tcp_stream = trio.open_tcp_stream


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def metrics(port: int) -> dict:
    s = await _open_tcp_stream("127.0.0.1", port)
    await s.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
    buf = b""
    while data := await s.receive_some(65536):
        buf += data
    await s.aclose()
    return parse_text(buf.split(b"\r\n\r\n", 1)[-1].decode())


class Legit:
    """One legitimate node's attempts, from its own address."""

    def __init__(self, src: str) -> None:
        self.src, self.ok, self.tries, self.errors = src, 0, 0, {}

    async def attempt(self, fn) -> None:
        self.tries += 1
        trio.open_tcp_stream = functools.partial(_open_tcp_stream, local_address=self.src)
        try:
            with trio.fail_after(5):
                await fn()
            self.ok += 1
        except Exception as exc:  # any failure is a figure here
            name = type(exc).__name__
            self.errors[name] = self.errors.get(name, 0) + 1
        finally:
            trio.open_tcp_stream = _open_tcp_stream

    def figures(self) -> dict:
        return {"ok": self.ok, "attempts": self.tries, "errors": self.errors}


async def hold(addr, src: str, rate: float, limit: int, held: list, stop: trio.Event) -> None:
    """Opens idle connections from src at `rate` a second (as fast as it can with 0) until `limit`."""
    while not stop.is_set() and len(held) < limit:
        try:
            held.append(await _open_tcp_stream(*addr, local_address=src))
        except OSError:
            await trio.sleep(0.05)
        if rate:
            await trio.sleep(1 / rate)
        else:
            await trio.lowlevel.checkpoint()


async def phase(name, args, pid, mport, attack_addr, legit_step, limit, rate) -> dict:
    legit = Legit("127.0.0.2")
    held: list = []
    stop = trio.Event()
    peak = {"attacker_conns_held": 0, "server_fds": 0, "server_rss_kb": 0}
    gauge = "meshwg_signal_unauthenticated_connections" if name == "control" else "meshwg_signal_relay_tcp_connections"
    before = await metrics(mport)
    async with trio.open_nursery() as n:
        for i in range(args.sources):
            n.start_soon(hold, attack_addr, f"127.0.1.{i + 1}", rate, limit // args.sources, held, stop)
        end = trio.current_time() + args.seconds
        while trio.current_time() < end:
            await legit.attempt(legit_step)
            m = await metrics(mport)
            peak["attacker_conns_held"] = max(peak["attacker_conns_held"], int(m.get(gauge, 0)))
            peak["server_fds"] = max(peak["server_fds"], fds(pid))
            peak["server_rss_kb"] = max(peak["server_rss_kb"], rss_kb(pid))
            await trio.sleep(0.3)
        stop.set()
    opened = len(held)
    for s in held:
        with trio.CancelScope(shield=True):
            await s.aclose()
    await trio.sleep(2)
    after = await metrics(mport)
    delta = {k.removeprefix("meshwg_signal_").removesuffix("_total"): int(v - before.get(k, 0))
             for k, v in after.items() if k.endswith("_total") and ("refused" in k or "timeout" in k or "no_hello" in k)
             and v - before.get(k, 0)}
    return {"attack_connections_opened": opened, "peak": peak, "legit": legit.figures(),
            "after_attack": {"server_fds": fds(pid), "server_rss_kb": rss_kb(pid)}, "server_counters": delta}


async def bench(args, inv_text: str, pid: int, mport: int, relay_port: int) -> dict:
    inv = parse_invite(inv_text)
    host, port = inv.addrs[0].rsplit(":", 1)
    key = os.urandom(32)
    await (await ControlConnection.open(inv, key)).aclose()  # registered once; the node then reconnects
    out = {}

    async def rejoin():
        conn = await ControlConnection.open(inv, key, timeout=4.0)
        await conn.aclose()

    out["control"] = await phase("control", args, pid, mport, (host, int(port)), rejoin, 10**6, args.rate)

    async def relay_and_join():
        r = await open_tcp_relay("127.0.0.1", relay_port, key, inv.server_key, os.urandom)
        await r.aclose()
        await rejoin()

    out["relay"] = await phase("relay", args, pid, mport, ("127.0.0.1", relay_port), relay_and_join,
                               args.relay_conns, 0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="attack length per phase")
    ap.add_argument("--sources", type=int, default=1, help="attacker addresses (127.0.1.1...)")
    ap.add_argument("--rate", type=float, default=150.0, help="control connections a second per attacker")
    ap.add_argument("--relay-conns", type=int, default=20000, help="relay connections the attackers try to hold")
    ap.add_argument("--nofile", type=int, default=4096, help="the server's RLIMIT_NOFILE soft limit")
    args = ap.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attackers' own sockets
    relay, mport = free_port(), free_port()
    with SignalProcess(["--udp", "none", "--relay-tcp", f"127.0.0.1:{relay}", "--metrics", f"127.0.0.1:{mport}"],
                       nofile=min(hard, args.nofile)) as srv:
        result = {"server_nofile": args.nofile, "attacker_sources": args.sources}
        result.update(trio.run(bench, args, srv.invite_text, srv.proc.pid, mport, relay))
        text = srv.log_text()
        result["server_log"] = {"lines": text.count("\n"), "accept_error_lines": text.count("accept returned"),
                                "tracebacks": text.count("Traceback")}
        print(json.dumps(result, indent=2))
    return 0

"""attack: the attacks of issue 10 against a real `meshwg-signal serve` process on loopback, with figures.

An attacker at 127.0.0.2 and legitimate nodes at 127.0.0.3 (loopback only). Each round prints what the
attacker held or got back, and what a legitimate node saw meanwhile:
  control-slots   idle connections to the control port; legitimate fresh joins during the attack
  control-churn   ~150 empty connections a second (open, close) while 10 legitimate nodes sharing one
                  address reconnect, each every 2 s
  relay-tcp       idle connections to the TCP relay; how many the server keeps, its RSS after, a
                  legitimate TCP relay session during the attack
  relay-junk      junk HELLOs naming a victim's key at ~10 KB/s; the victim's relayed packets delivered
  stun-reflect    STUN Binding requests from one source; answers and bytes reflected per request
Bounded in count and time; removes everything it started.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import trio

from meshwg.signaling import relay_wire as W
from meshwg.control.client import ControlConnection, ControlError
from meshwg.signaling.invite import parse_invite
from meshwg.control.relay_client import RelaySession
from meshwg.disco import stun
from procstat import rss_kb
from signal_proc import SignalProcess, free_port

ATTACKER, LEGIT, SERVER = "127.0.0.2", "127.0.0.3", "127.0.0.1"


class Server(SignalProcess):
    """The server under attack, with STUN, the UDP relay and the TCP relay on loopback."""

    def __init__(self) -> None:
        self.udp, self.relay_tcp = free_port(socket.SOCK_DGRAM, SERVER), free_port(host=SERVER)
        super().__init__(["--udp", f"{SERVER}:{self.udp}", "--stun-alt-port", "none",
                          "--relay-tcp", f"{SERVER}:{self.relay_tcp}"], host=SERVER)

    def __enter__(self) -> "Server":
        super().__enter__()
        self.invite = parse_invite(self.invite_text)
        return self


async def tcp_from(src: str, port):
    """A TCP stream from `src` to the server's `port` (a number, or the (host, port) of its control)."""
    sock = trio.socket.socket()
    await sock.bind((src, 0))
    await sock.connect(port if isinstance(port, tuple) else (SERVER, port))
    return trio.SocketStream(sock)


async def legit_join(srv: Server, key: bytes | None = None) -> float | None:
    """One registration from the legitimate source: seconds it took, None if refused or failed."""
    t0 = time.monotonic()
    try:
        with trio.fail_after(10):
            stream = await tcp_from(LEGIT, srv.control)
            conn = await ControlConnection._handshake(stream, srv.invite, key or os.urandom(32), None, (), os.urandom)
    except (OSError, ControlError, trio.TooSlowError, trio.BrokenResourceError):
        return None
    await conn.aclose()
    return time.monotonic() - t0


async def hold_idle(port: int, n: int, held: list) -> None:
    """Open n connections from the attacker and keep them; each ends when the server closes it."""
    async def one():
        try:
            s = await tcp_from(ATTACKER, port)
        except OSError:
            return
        held.append(s)
        try:
            while await s.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        held.remove(s)
        await s.aclose()

    async with trio.open_nursery() as n_:
        for _ in range(n):
            n_.start_soon(one)
            await trio.sleep(0)


def fmt_joins(times: list) -> str:
    ok = [t for t in times if t is not None]
    med = f", median {statistics.median(ok) * 1000:.0f} ms" if ok else ""
    return f"{len(ok)} of {len(times)} legitimate joins succeeded{med}"


async def control_slots(srv: Server, n: int) -> str:
    held: list = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_idle, srv.control, n, held)
        await trio.sleep(1.0)
        opened = len(held)
        joins = [await legit_join(srv) for _ in range(28)]
        await trio.sleep(3.0)  # past any first-frame deadline
        left = len(held)
        nursery.cancel_scope.cancel()
    return f"control-slots: attacker opened {opened} idle connections, {left} still open 4 s later; {fmt_joins(joins)}"


async def control_churn(srv: Server, seconds: float) -> str:
    stop = trio.Event()
    made = [0]

    async def churn():
        while not stop.is_set():
            try:
                s = await tcp_from(ATTACKER, srv.control)
                await s.aclose()
                made[0] += 1
            except OSError:
                pass
            await trio.sleep(1 / 150)

    keys = [os.urandom(32) for _ in range(10)]
    for k in keys:  # registered first: the attack hits reconnects
        await legit_join(srv, k)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(churn)
        joins = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:  # each node reconnects every 2 s (5 a second in all)
            for k in keys:
                joins.append(await legit_join(srv, k))
                await trio.sleep(0.2)
        stop.set()
    return f"control-churn: {made[0]} empty connections in {seconds:.0f} s; {fmt_joins(joins)} (reconnects)"


async def relay_tcp(srv: Server, n: int) -> str:
    key = os.urandom(32)
    if await legit_join(srv, key) is None:
        return "relay-tcp: the legitimate node could not register"
    held: list = []
    rss_before = rss_kb(srv.proc.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_idle, srv.relay_tcp, n, held)
        await trio.sleep(2.0)
        opened = len(held)
        ok = await legit_relay_tcp(srv, key)
        await trio.sleep(6.0)  # past any HELLO deadline
        left = len(held)
        nursery.cancel_scope.cancel()
    await trio.sleep(2.0)
    rss_after = rss_kb(srv.proc.pid)
    return (f"relay-tcp: attacker opened {opened} idle connections, {left} still open 8 s later; legitimate TCP "
            f"relay session {'worked' if ok else 'FAILED'}; server RSS {rss_before // 1024} MB before, "
            f"{rss_after // 1024} MB after")


async def legit_relay_tcp(srv: Server, key: bytes) -> bool:
    session = RelaySession(key, srv.invite.server_key, os.urandom)
    try:
        with trio.fail_after(5):
            s = await tcp_from(LEGIT, srv.relay_tcp)
            await s.send_all(W.tcp_frame(session.hello(time.monotonic(), time.time())))
            dec = W.TcpFrameDecoder()
            while True:
                data = await s.receive_some(4096)
                if not data:
                    return False
                for frame in dec.feed(data):
                    ev = session.handle_untrusted(frame, time.monotonic())
                    if ev and ev[0] == "ready":
                        await s.aclose()
                        return True
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return False


def udp_from(src: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.settimeout(0.5)
    return s


def relay_hello(sock, session: RelaySession, srv: Server) -> bool:
    sock.sendto(session.hello(time.monotonic(), time.time()), (SERVER, srv.udp))
    try:
        while True:
            data, _ = sock.recvfrom(2048)
            ev = session.handle_untrusted(data, time.monotonic())
            if ev and ev[0] == "ready":
                return True
    except TimeoutError:
        return False


async def relay_junk(srv: Server, packets: int) -> str:
    from nacl.public import PrivateKey

    ka, kb = (bytes(PrivateKey.generate()) for _ in range(2))
    for k in (ka, kb):
        await legit_join(srv, k)
    a, b = udp_from(LEGIT), udp_from(LEGIT)
    sa, sb = RelaySession(ka, srv.invite.server_key, os.urandom), RelaySession(kb, srv.invite.server_key, os.urandom)
    if not (relay_hello(a, sa, srv) and relay_hello(b, sb, srv)):
        return "relay-junk: the legitimate relay sessions did not start"
    victim_pub = bytes(PrivateKey(ka).public_key)
    b_pub = bytes(PrivateKey(kb).public_key)
    junk = udp_from(ATTACKER)
    delivered = hellos_ok = junk_sent = 0
    for i in range(packets):
        for _ in range(80):  # ~7 KB of junk HELLOs naming the victim before each packet (~70 KB/s)
            junk.sendto(W.MAGIC + bytes([W.T_HELLO]) + victim_pub + os.urandom(W.HELLO_LEN - 37), (SERVER, srv.udp))
            junk_sent += 1
        # The victim starts a new session now, as a node does at start, after a network change or a
        # relay restart: the junk must not have spent its budget.
        sa = RelaySession(ka, srv.invite.server_key, os.urandom)
        hellos_ok += relay_hello(a, sa, srv)
        frame = sa.encode_send(b_pub, b"ping %d" % i)
        if frame is not None:
            a.sendto(frame, (SERVER, srv.udp))
            delivered += relayed(b, sb, b"ping %d" % i)
        await trio.sleep(0.1)
    for s in (a, b, junk):
        s.close()
    return (f"relay-junk: {junk_sent} junk HELLOs naming the victim ({junk_sent * W.HELLO_LEN // 1024} KB); "
            f"victim's HELLOs answered {hellos_ok} of {packets}, its relayed packets delivered {delivered} of {packets}")


def relayed(sock, session: RelaySession, payload: bytes) -> bool:
    try:
        while True:
            data, _ = sock.recvfrom(2048)
            ev = session.handle_untrusted(data, time.monotonic())
            if ev and ev[0] == "recv" and ev[2] == payload:
                return True
    except TimeoutError:
        return False


async def stun_reflect(srv: Server, n: int) -> str:
    atk, legit = udp_from(ATTACKER), udp_from(LEGIT)
    atk.settimeout(0.05)
    req_bytes = answered = answered_bytes = 0
    for _ in range(n):
        req = stun.build_binding_request(os.urandom(12))
        atk.sendto(req, (SERVER, srv.udp))
        req_bytes += len(req)
    t_end = time.monotonic() + 1.0
    while time.monotonic() < t_end:
        try:
            data, _ = atk.recvfrom(2048)
        except TimeoutError:
            continue
        answered += 1
        answered_bytes += len(data)
    legit.sendto(stun.build_binding_request(os.urandom(12)), (SERVER, srv.udp))
    try:
        legit.recvfrom(2048)
        other = "answered"
    except TimeoutError:
        other = "NOT answered"
    atk.close()
    legit.close()
    ratio = answered_bytes / max(1, answered * (req_bytes / n))
    return (f"stun-reflect: {n} requests from one source, {answered} answered ({answered / n:.1%}), "
            f"{ratio:.2f}x the request's bytes per answer; a request from another source {other}")


async def amain(args) -> None:
    with Server() as srv:
        lines = [await control_slots(srv, args.idle), await control_churn(srv, args.seconds),
                 await relay_tcp(srv, args.relay_idle), await relay_junk(srv, args.packets),
                 await stun_reflect(srv, args.stun)]
        lines.append(f"server still running: {srv.proc.poll() is None}; RSS {rss_kb(srv.proc.pid) // 1024} MB")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, default=600, help="idle control connections (default 600)")
    ap.add_argument("--seconds", type=float, default=5.0, help="control churn duration (default 5)")
    ap.add_argument("--relay-idle", type=int, default=5000, help="idle relay TCP connections (default 5000)")
    ap.add_argument("--packets", type=int, default=30, help="relayed packets under junk (default 30)")
    ap.add_argument("--stun", type=int, default=2310, help="STUN requests from one source (default 2310)")
    args = ap.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(amain, args)
    return 0

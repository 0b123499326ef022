"""The sans-IO WireGuard core against real wireguard-go (configured with `wg`) inside a test namespace.

A minimal blocking-socket shell drives the core from this process: its UDP socket is created inside the
namespace (setns in a short-lived thread; the socket keeps that namespace), so all traffic stays on the
namespace's loopback. wireguard-go's TUN carries the ICMP echo we build here.
"""

from __future__ import annotations

import base64
import ctypes
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshwg.wg import crypto
from meshwg.wg.constants import LABEL_MAC1
from meshwg.wg.device import WireGuardCore
from meshwg.wg.events import HandshakeCompleted
from scenarios.netns import Netns, unique_name, wait_for
from conftest import require_real_components

pytestmark = pytest.mark.netns

WG_IP, OUR_IP = "10.9.0.1", "10.9.0.2"
WG_PORT = 51820
CLONE_NEWNET = 0x40000000
FLOOD = Path(__file__).with_name("wg_flood.py")


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmp_echo(src: str, dst: str, ident: int, seq: int, payload: bytes, reply: bool = False) -> bytes:
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def parse_icmp(pkt: bytes):
    """(type, ident, seq, payload, src, dst) of an IPv4 ICMP echo packet, else None."""
    if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 1:
        return None
    ihl = (pkt[0] & 15) * 4
    kind, _, _, ident, seq = struct.unpack_from("!BBHHH", pkt, ihl)
    return kind, ident, seq, pkt[ihl + 8:], str(ipaddress.IPv4Address(pkt[12:16])), str(ipaddress.IPv4Address(pkt[16:20]))


def udp_socket_in(ns: Netns) -> socket.socket:
    """A UDP socket bound to 127.0.0.1 inside `ns` (a netns switch only affects the calling thread)."""
    box: dict = {}

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            box["sock"] = sock
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["sock"]


class Shell:
    """Blocking-socket driver for one WireGuardCore. The core's clock is monotonic time + `skew`."""

    def __init__(self, core: WireGuardCore, sock: socket.socket):
        self.core, self.sock = core, sock
        self.skew = 0.0
        self.received_types: list[int] = []
        self.sent: list[bytes] = []
        self.tun: list[bytes] = []
        self.events: list = []

    def now(self) -> float:
        return time.monotonic() + self.skew

    def flush(self) -> None:
        for data, addr in self.core.datagrams_to_send():
            self.sent.append(data)
            self.sock.sendto(data, addr)
        self.events += self.core.pop_events()
        for pkt in self.core.tun_packets_to_write():
            self.tun.append(pkt)
            echo = parse_icmp(pkt)
            if echo and echo[0] == 8 and echo[5] == OUR_IP:  # answer pings to us
                self.core.send_ip_packet(icmp_echo(OUR_IP, echo[4], echo[1], echo[2], echo[3], reply=True), self.now())
        if self.core._out:
            self.flush()

    def pump(self, until, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            self.core.handle_timer(self.now())
            self.flush()
            result = until()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}; received types {self.received_types}, "
                                   f"drops {dict(self.core.drops)}")
            self.sock.settimeout(max(0.001, min(left, 0.05, self.core.get_timer() - self.now())))
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if data:
                self.received_types.append(data[0])
            self.core.receive_datagram(data, addr, self.now())


class WgGo:
    def __init__(self, ns: Netns, iface: str, private_key: bytes, proc, log_path: str):
        self.ns, self.iface, self.proc, self.log_path = ns, iface, proc, log_path
        self.public_key = crypto.dh_pub(private_key)

    def wg(self, *args: str, input: bytes | None = None) -> str:
        return self.ns.run("wg", *args, input=input)

    def latest_handshake(self) -> int:
        out = self.wg("show", self.iface, "latest-handshakes").split()
        return int(out[1]) if len(out) >= 2 else 0


@contextmanager
def wireguard_go(our_public: bytes, psk: bytes | None = None, endpoint: str | None = None, gomaxprocs: int | None = None):
    require_real_components("wireguard-go", "wg", "ip", "ping")
    ns = Netns("wgi")
    iface = unique_name("wgc")
    tmp = tempfile.mkdtemp(prefix="meshwg-interop-")
    proc = None
    try:
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
        if gomaxprocs:
            env["GOMAXPROCS"] = str(gomaxprocs)
        log_path = os.path.join(tmp, "wireguard-go.log")
        with open(log_path, "wb") as log:
            proc = ns.popen("wireguard-go", "-f", iface, env=env, stdout=log, stderr=subprocess.STDOUT)
        sock_path = f"/var/run/wireguard/{iface}.sock"
        wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, timeout=10, what="wireguard-go UAPI socket")
        assert proc.poll() is None, open(log_path).read()
        private = crypto.clamp(secrets.token_bytes(32))
        key_file = os.path.join(tmp, "key")
        with open(key_file, "w") as f:
            f.write(b64(private))
        args = ["set", iface, "listen-port", str(WG_PORT), "private-key", key_file, "peer", b64(our_public),
                "allowed-ips", f"{OUR_IP}/32"]
        if psk:
            psk_file = os.path.join(tmp, "psk")
            with open(psk_file, "w") as f:
                f.write(b64(psk))
            args += ["preshared-key", psk_file]
        if endpoint:
            args += ["endpoint", endpoint]
        ns.run("wg", *args)
        ns.run("ip", "addr", "add", f"{WG_IP}/24", "dev", iface)
        ns.run("ip", "link", "set", iface, "up")
        yield WgGo(ns, iface, private, proc, log_path)
    finally:
        if proc is not None:
            ns.stop(proc)
        try:
            os.unlink(f"/var/run/wireguard/{iface}.sock")
        except FileNotFoundError:
            pass
        ns.close()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def make_core() -> WireGuardCore:
    return WireGuardCore(crypto.clamp(secrets.token_bytes(32)), secrets.token_bytes,
                         wall_offset=time.time() - time.monotonic())


def add_wg_peer(core: WireGuardCore, wg: WgGo, psk: bytes | None, endpoint: bool):
    peer = core.add_peer(wg.public_key)
    core.set_preshared_key(peer, psk)
    core.set_allowed_ips(peer, [ipaddress.ip_network(f"{WG_IP}/32")])
    if endpoint:
        core.set_endpoint(peer, ("127.0.0.1", WG_PORT))
    return peer


def replies(shell: Shell, ident: int):
    return [e for e in map(parse_icmp, shell.tun) if e and e[0] == 0 and e[1] == ident]


@pytest.mark.parametrize("use_psk", [False, True], ids=["nopsk", "psk"])
def test_meshwg_initiator_ping_through_wireguard_go(use_psk):
    psk = secrets.token_bytes(32) if use_psk else None
    core = make_core()
    with wireguard_go(core.public_key, psk) as wg:
        sock = udp_socket_in(wg.ns)
        try:
            shell = Shell(core, sock)
            peer = add_wg_peer(core, wg, psk, endpoint=True)
            for seq in range(3):
                core.send_ip_packet(icmp_echo(OUR_IP, WG_IP, 0x4D57, seq, b"meshwg-%d" % seq), shell.now())
            shell.pump(lambda: len(replies(shell, 0x4D57)) == 3, 10, "3 echo replies through wireguard-go")
            assert [r[2] for r in replies(shell, 0x4D57)] == [0, 1, 2]
            assert shell.received_types[0] == 2  # the response to our initiation
            assert HandshakeCompleted(wg.public_key) in shell.events
            assert wg.latest_handshake() > 0 and peer.rx_bytes > 0
        finally:
            sock.close()


@pytest.mark.parametrize("use_psk", [False, True], ids=["nopsk", "psk"])
def test_meshwg_responder_answers_ping_from_wireguard_go(use_psk):
    psk = secrets.token_bytes(32) if use_psk else None
    core = make_core()
    # wireguard-go knows our endpoint; we learn its endpoint from its initiation (roaming).
    with wireguard_go(core.public_key, psk) as wg:
        sock = udp_socket_in(wg.ns)
        try:
            wg.wg("set", wg.iface, "peer", b64(core.public_key), "endpoint", f"127.0.0.1:{sock.getsockname()[1]}")
            shell = Shell(core, sock)
            peer = add_wg_peer(core, wg, psk, endpoint=False)
            ping = wg.ns.popen("ping", "-c", "3", "-i", "0.2", "-W", "3", OUR_IP,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                shell.pump(lambda: ping.poll() is not None, 15, "ping to finish")
                output = ping.stdout.read().decode()
            finally:
                wg.ns.stop(ping)
            assert ping.returncode == 0, output
            assert "3 received" in output, output
            assert shell.received_types[0] == 1  # wireguard-go initiated
            assert peer.endpoint == ("127.0.0.1", WG_PORT)
            assert HandshakeCompleted(wg.public_key) in shell.events
        finally:
            sock.close()


def flood_initiation(wg_public: bytes) -> bytes:
    """An initiation with a valid mac1 but garbage inside: wireguard-go must queue it and do a DH."""
    body = struct.pack("<II", 1, 0xF100D) + crypto.dh_pub(crypto.clamp(secrets.token_bytes(32))) + secrets.token_bytes(76)
    return body + crypto.mac(crypto.hash(LABEL_MAC1, wg_public), body) + bytes(16)


def flood(wg: WgGo, seconds: float, processes: int = 2) -> None:
    msg = flood_initiation(wg.public_key).hex()
    procs = [wg.ns.popen(sys.executable, str(FLOOD), str(WG_PORT), msg, str(seconds)) for _ in range(processes)]
    try:
        for p in procs:
            p.wait(timeout=seconds + 10)
    finally:
        for p in procs:
            wg.ns.stop(p)


def pump_resending(shell: Shell, until, what: str) -> None:
    """Pump; if nothing comes, resend our last initiation as is: wireguard-go drops handshake messages
    that meet a full queue (1024) right after a flood, and our own retransmission is 5 s away."""
    for _ in range(5):
        try:
            shell.pump(until, 0.6, what)
            return
        except TimeoutError:
            init = [d for d in shell.sent if d[0] == 1][-1]
            shell.sock.sendto(init, ("127.0.0.1", WG_PORT))
    shell.pump(until, 0.6, what)


def test_cookie_path_with_wireguard_go_under_load():
    core = make_core()
    with wireguard_go(core.public_key, gomaxprocs=1) as wg:
        sock = udp_socket_in(wg.ns)
        try:
            shell = Shell(core, sock)
            peer = add_wg_peer(core, wg, None, endpoint=True)
            # 1. Flood, then initiate while wireguard-go still counts itself under load: a cookie reply.
            flood(wg, 0.7)
            core.initiate_handshake(peer, shell.now())
            pump_resending(shell, lambda: 3 in shell.received_types, "a cookie reply from wireguard-go")
            assert peer.cookie.cookie is not None
            assert 2 not in shell.received_types
            # 2. Flood again, then move the core's clock past the retransmit deadline: the retry carries
            #    mac2 made with the cookie, and wireguard-go answers it with a response.
            #    A probe (same key, no cookie) sent just before shows wireguard-go is under load right then.
            probe_sock = udp_socket_in(wg.ns)
            try:
                probe = WireGuardCore(core.private_key, secrets.token_bytes, wall_offset=time.time() - time.monotonic())
                add_wg_peer(probe, wg, None, endpoint=True)
                flood(wg, 0.7)
                probe.initiate_handshake(probe.peers[wg.public_key], time.monotonic())
                [(probe_init, addr)] = probe.datagrams_to_send()
                probe_sock.settimeout(0.5)
                for _ in range(4):  # resend if it met a full queue (dropped, as wireguard-go does)
                    probe_sock.sendto(probe_init, addr)
                    try:
                        answer = probe_sock.recvfrom(65535)[0]
                        break
                    except TimeoutError:
                        continue
                else:
                    raise AssertionError("no answer to the probe initiation")
                assert answer[0] == 3  # mac2-less initiation under load: cookie reply
            finally:
                probe_sock.close()
            shell.skew += 5.5
            pump_resending(shell, lambda: 2 in shell.received_types, "a response to the initiation with mac2")
            assert shell.received_types[:2] == [3, 2]
            retry = [d for d in shell.sent if d[0] == 1][-1]
            assert retry[132:148] != bytes(16)
            core.send_ip_packet(icmp_echo(OUR_IP, WG_IP, 0xC00C, 1, b"after-cookie"), shell.now())
            shell.pump(lambda: replies(shell, 0xC00C), 5, "an echo reply after the cookie handshake")
        finally:
            sock.close()

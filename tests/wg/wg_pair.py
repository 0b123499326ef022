"""Two WireGuardCores wired together in memory over explicit time (aioquic-style transfer loop)."""

from __future__ import annotations

import ipaddress
import random
import struct

from meshwg.wg import crypto
from meshwg.wg.device import WireGuardCore

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("198.51.100.2", 51820)
A_IP, B_IP = "10.0.0.1", "10.0.0.2"
WALL = 1_700_000_000.0


def ipv4_packet(src: str, dst: str, payload: bytes = b"x" * 64) -> bytes:
    """A UDP-protocol (17) IPv4 packet with a valid header checksum."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    csum = sum(struct.unpack("!10H", header))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


class Pair:
    """a = initiator side (knows b's endpoint), b = responder side (learns a's endpoint by roaming)."""

    def __init__(self, seed: int = 1, psk: bytes | None = None, b_knows_a: bool = False):
        rng = random.Random(seed)
        self.a = WireGuardCore(crypto.clamp(rng.randbytes(32)), rng.randbytes, wall_offset=WALL)
        self.b = WireGuardCore(crypto.clamp(rng.randbytes(32)), rng.randbytes, wall_offset=WALL)
        self.pa = self.a.add_peer(self.b.public_key)  # a's view of b
        self.pb = self.b.add_peer(self.a.public_key)  # b's view of a
        self.a.set_endpoint(self.pa, B_ADDR)
        if b_knows_a:
            self.b.set_endpoint(self.pb, A_ADDR)
        self.a.set_allowed_ips(self.pa, [ipaddress.ip_network(B_IP + "/32")])
        self.b.set_allowed_ips(self.pb, [ipaddress.ip_network(A_IP + "/32")])
        if psk:
            self.a.set_preshared_key(self.pa, psk)
            self.b.set_preshared_key(self.pb, psk)
        self.addr = {id(self.a): A_ADDR, id(self.b): B_ADDR}
        self.now = 0.0
        self.block_a_to_b = False
        self.block_b_to_a = False
        self.sent: list[tuple[float, str, bytes]] = []  # (time, "a->b"/"b->a", datagram) incl. blocked ones
        self.tun_a: list[bytes] = []
        self.tun_b: list[bytes] = []
        self.events_a: list = []
        self.events_b: list = []

    def cookie_reply(self, now: float = 0.0) -> bytes:
        """b under load answers a fresh initiation from a with a cookie reply (type 3), returned undelivered."""
        self.b.note_handshake_backlog(500, now)
        self.a.initiate_handshake(self.pa, now)
        [(init, _)] = self.a.datagrams_to_send()
        self.b.receive_datagram(init, A_ADDR, now)
        [(reply, _)] = self.b.datagrams_to_send()
        return reply

    def core_at(self, addr):
        if addr == B_ADDR:
            return self.b
        if addr == self.addr[id(self.a)] or addr == A_ADDR:
            return self.a
        return None

    def deliver(self) -> None:
        """Move datagrams until both cores are quiet."""
        for _ in range(1000):
            moved = False
            for src, dst, blocked, name in ((self.a, self.b, self.block_a_to_b, "a->b"),
                                            (self.b, self.a, self.block_b_to_a, "b->a")):
                for data, addr in src.datagrams_to_send():
                    moved = True
                    self.sent.append((self.now, name, data))
                    target = self.core_at(addr)
                    if blocked or target is not dst:
                        continue
                    dst.receive_datagram(data, self.addr[id(src)], self.now)
            self.tun_a += self.a.tun_packets_to_write()
            self.tun_b += self.b.tun_packets_to_write()
            self.events_a += self.a.pop_events()
            self.events_b += self.b.pop_events()
            if not moved:
                return
        raise AssertionError("datagram ping-pong did not settle")

    def run_until(self, t_end: float, each_step=None) -> None:
        """Fire timers in deadline order up to t_end (each_step(now) lets a test inject traffic)."""
        self.deliver()
        while True:
            nxt = min(self.a.get_timer(), self.b.get_timer())
            if nxt > t_end:
                break
            self.now = max(self.now, nxt)
            self.a.handle_timer(self.now)
            self.b.handle_timer(self.now)
            self.deliver()
        self.now = t_end
        self.deliver()

    def send_a(self, payload: bytes = b"x" * 64) -> bytes:
        pkt = ipv4_packet(A_IP, B_IP, payload)
        self.a.send_ip_packet(pkt, self.now)
        self.deliver()
        return pkt

    def send_b(self, payload: bytes = b"y" * 64) -> bytes:
        pkt = ipv4_packet(B_IP, A_IP, payload)
        self.b.send_ip_packet(pkt, self.now)
        self.deliver()
        return pkt

    def sent_types(self, direction: str, since: float = -1.0) -> list[tuple[float, int, int]]:
        """(time, message type, length) of datagrams sent in one direction."""
        return [(t, d[0], len(d)) for t, name, d in self.sent if name == direction and t >= since]

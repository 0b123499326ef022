"""In-memory network for MeshNode tests: simulated NATs, STUN server, relay, explicit time.

Everything is deterministic: randomness comes from seeded random.Random instances.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import random
import struct

from nacl.public import PrivateKey

from meshwg.disco import stun
from meshwg.mesh import demux
from meshwg.mesh.netmap import PeerSpec
from meshwg.mesh.node import MeshNode, RelayEndpoint, SocketEndpoint
from meshwg.wg.device import WireGuardCore


def ipv4_packet(src: str, dst: str, payload: bytes = b"x" * 40) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + payload


class Nat:
    """RFC 4787 behaviours as pure models.

    full: EIM + endpoint-independent filtering; restricted: EIM + address-dependent filtering;
    port-restricted: EIM + address-and-port-dependent filtering (Linux masquerade);
    symmetric: a random port per destination, address-and-port-dependent filtering.
    """

    def __init__(self, public_ip: str, kind: str, rng: random.Random):
        self.public_ip, self.kind, self.rng = public_ip, kind, rng
        self.mapping: dict[tuple, int] = {}            # (local, dest-or-None) -> public port
        self.by_port: dict[int, tuple] = {}            # public port -> local
        self.allowed: dict[int, set] = {}              # public port -> remote (ip, port) / ip seen
        self.dropped_inbound = 0

    def outbound(self, local: tuple, dest: tuple) -> tuple:
        key = (local, dest if self.kind == "symmetric" else None)
        port = self.mapping.get(key)
        if port is None:
            port = local[1] if self.kind != "symmetric" and local[1] not in self.by_port else None
            while port is None or port in self.by_port:
                port = self.rng.randrange(1024, 65536)
            self.mapping[key] = port
            self.by_port[port] = local
            self.allowed[port] = set()
        self.allowed[port].add(dest)
        self.allowed[port].add(dest[0])
        return (self.public_ip, port)

    def inbound(self, port: int, src: tuple) -> tuple | None:
        local = self.by_port.get(port)
        if local is None:
            self.dropped_inbound += 1
            return None
        allowed = self.allowed[port]
        ok = {"full": True, "restricted": src[0] in allowed}.get(self.kind, src in allowed)
        if not ok:
            self.dropped_inbound += 1
            return None
        return local

    def forget(self) -> None:
        """NAT rebinding: the router drops every mapping."""
        self.mapping.clear()
        self.by_port.clear()
        self.allowed.clear()


class Host:
    def __init__(self, name: str, node: MeshNode, lan_ip: str, port: int, lan: str, nat: Nat | None,
                 mesh_ip: str):
        self.name, self.node, self.lan_ip, self.port, self.lan, self.nat = name, node, lan_ip, port, lan, nat
        self.mesh_ip = mesh_ip
        self.extra: dict[int, int] = {}        # birthday socket index -> local port
        self.received: list[bytes] = []        # IP packets written to the TUN
        self.opened_sockets = 0
        self.events: list = []


class Sim:
    def __init__(self, seed: int = 1, direct_latency: float = 0.010, relay_latency: float = 0.040):
        self.rng = random.Random(seed)
        self.now = 0.0
        self.heap: list = []
        self.seq = 0
        self.hosts: dict[str, Host] = {}
        self.by_key: dict[bytes, Host] = {}
        self.nats: dict[str, Nat] = {}
        self.direct_latency, self.relay_latency = direct_latency, relay_latency
        self.blocked: set[frozenset] = set()      # pairs of host names whose direct traffic is cut
        self.relay_up = True
        self.relay_wg_packets = 0
        self.relay_data_packets = 0
        self.direct_wg_packets = 0
        self.sent_log: list = []                  # (time, host, dest) of every non-relay datagram
        self.stun_ips = ("198.51.100.1", "198.51.100.2")
        self.stun_port = 3478

    # --- topology -------------------------------------------------------------------------
    def add_nat(self, name: str, public_ip: str, kind: str) -> Nat:
        nat = self.nats[name] = Nat(public_ip, kind, random.Random(self.rng.random()))
        return nat

    def add_host(self, name: str, *, lan_ip: str, port: int = 41641, nat: str | None = None,
                 mesh_ip: str, lan: str | None = None) -> Host:
        seed = self.rng.random()
        r = random.Random(seed)
        rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
        sk = PrivateKey(rb(32))
        core = WireGuardCore(private_key=bytes(sk), random_bytes=rb)
        node = MeshNode(core, bytes(sk), rb, wall_offset=1_700_000_000.0)
        host = Host(name, node, lan_ip, port, lan or nat or name, self.nats.get(nat) if nat else None, mesh_ip)
        self.hosts[name] = host
        self.by_key[node.public_key] = host
        node.set_local_endpoints([(lan_ip, port)], self.now)
        return host

    def public_addr(self, host: Host) -> tuple:
        """What the signaling server would observe (as if it were at the first STUN IP)."""
        if host.nat is None:
            return (host.lan_ip, host.port)
        return host.nat.outbound((host.lan_ip, host.port), (self.stun_ips[0], 443))

    def netmap(self, with_nat: bool = True, observed: bool = True) -> dict:
        specs = {}
        for h in self.hosts.values():
            nat = None
            if with_nat:
                nat = "endpoint-dependent" if h.nat and h.nat.kind == "symmetric" else "endpoint-independent"
            specs[h.node.public_key] = PeerSpec.make(
                h.node.public_key, h.name, [h.mesh_ip + "/32"], [(h.lan_ip, h.port)],
                [self.public_addr(h)] if observed else [], nat)
        return specs

    def join_all(self, with_nat: bool = True, observed: bool = True) -> None:
        nm = self.netmap(with_nat, observed)
        for h in self.hosts.values():
            if with_nat:
                h.node.set_local_nat(nm[h.node.public_key].nat)
            h.node.apply_netmap(nm, self.now)
        self.flush()

    # --- event loop -----------------------------------------------------------------------
    def at(self, t: float, fn) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn))

    def run(self, until: float) -> None:
        spins = 0
        while True:
            t_heap = self.heap[0][0] if self.heap else math.inf
            t_timer = min((h.node.get_timer() for h in self.hosts.values()), default=math.inf)
            t = min(t_heap, t_timer)
            if t > until:
                break
            t = max(t, self.now)
            spins = spins + 1 if t == self.now else 0
            if spins > 100_000:
                raise RuntimeError("simulation stuck at t=%r" % t)
            self.now = t
            if t_heap <= t:
                _, _, fn = heapq.heappop(self.heap)
                fn()
            else:
                for h in self.hosts.values():
                    if h.node.get_timer() <= t:
                        h.node.handle_timer(t)
            self.flush()
        self.now = until

    def flush(self) -> None:
        for _ in range(100):
            if not self._flush_once():
                return
        raise RuntimeError("outputs keep coming")

    def _flush_once(self) -> bool:
        work = False
        for h in list(self.hosts.values()):
            out = h.node.datagrams_to_send()
            work = work or bool(out)
            for data, dest in out:
                self.send(h, data, dest)
            for pkt in h.node.tun_packets_to_write():
                h.received.append(pkt)
                if pkt[20:23] == b"req":  # echo back, like ping
                    reply = pkt[:12] + pkt[16:20] + pkt[12:16] + b"rep" + pkt[23:]
                    h.node.send_ip_packet(reply, self.now)
            for ev in h.node.pop_events():
                h.events.append((self.now, ev))
                name = type(ev).__name__
                if name == "OpenBirthdaySockets":
                    for i in range(1, ev.count + 1):
                        h.extra[i] = 20000 + i
                    h.opened_sockets += ev.count
                elif name == "CloseBirthdaySockets":
                    h.extra = {i: p for i, p in h.extra.items() if i in ev.keep}
        return work

    # --- delivery -------------------------------------------------------------------------
    def send(self, src: Host, data: bytes, dest) -> None:
        kind = demux.classify(data)
        if isinstance(dest, RelayEndpoint):
            if not self.relay_up:
                return
            target = self.by_key.get(dest.peer_key)
            if kind == demux.WIREGUARD:
                self.relay_wg_packets += 1
                if data[0] == 4 and len(data) > 32:
                    self.relay_data_packets += 1
            if target is not None:
                key = src.node.public_key
                self.at(self.now + self.relay_latency,
                        lambda: target.node.receive_relay(key, data, self.now))
            return
        via = None
        if isinstance(dest, SocketEndpoint):
            via, dest = dest.socket, dest.addr
            if via not in src.extra:
                return
        local = (src.lan_ip, src.extra[via] if via else src.port)
        self.sent_log.append((self.now, src.name, dest))
        if kind == demux.WIREGUARD:
            self.direct_wg_packets += 1
        # STUN server
        if dest[0] in self.stun_ips and dest[1] == self.stun_port:
            pub = src.nat.outbound(local, dest) if src.nat else local
            parsed = stun.parse_binding_request_untrusted(data)
            if parsed is not None:
                resp = stun.build_binding_response(parsed, pub)
                self._deliver_public(dest, pub, resp, self.direct_latency)
            return
        # same LAN: deliver by private address
        for h in self.hosts.values():
            if h.lan == src.lan and h.lan_ip == dest[0] and h is not src:
                if frozenset((h.name, src.name)) in self.blocked:
                    return
                self._deliver_local(h, dest[1], local, data, self.direct_latency / 5)
                return
        if any(h.lan_ip == dest[0] and h.nat is not None for h in self.hosts.values()):
            return  # someone else's private address: unroutable from here
        pub = src.nat.outbound(local, dest) if src.nat else local
        self._deliver_public(pub, dest, data, self.direct_latency, src_host=src)

    def _deliver_public(self, src_pub: tuple, dest: tuple, data: bytes, latency: float, src_host=None) -> None:
        def arrive():
            nat = next((h.nat for h in self.hosts.values() if h.nat and h.nat.public_ip == dest[0]), None)
            if nat is not None:
                local = nat.inbound(dest[1], src_pub)
                if local is None:
                    return
                target = next((h for h in self.hosts.values() if h.nat is nat and h.lan_ip == local[0]), None)
                port = local[1]
            else:
                target = next((h for h in self.hosts.values() if h.nat is None and h.lan_ip == dest[0]), None)
                port = dest[1]
            if target is None:
                return
            if src_host is not None and frozenset((target.name, src_host.name)) in self.blocked:
                return
            self._deliver_local(target, port, src_pub, data, 0.0, now=True)
        self.at(self.now + latency, arrive)

    def _deliver_local(self, h: Host, port: int, src: tuple, data: bytes, latency: float, now: bool = False):
        if port == h.port:
            via = None
        else:
            via = next((i for i, p in h.extra.items() if p == port), None)
            if via is None:
                return
        if now:
            h.node.receive_datagram(data, src, self.now, via)
        else:
            self.at(self.now + latency, lambda: h.node.receive_datagram(data, src, self.now, via))

    # --- traffic --------------------------------------------------------------------------
    def ping_stream(self, a: str, b: str, start: float, stop: float, every: float = 0.2) -> None:
        """a sends an IP packet to b every `every` seconds; b answers each (like ping)."""
        ha, hb = self.hosts[a], self.hosts[b]

        def tick(t=start):
            if t >= stop:
                return
            ha.node.send_ip_packet(ipv4_packet(ha.mesh_ip, hb.mesh_ip, b"req" + b"x" * 40), self.now)
            self.at(t + every, lambda: tick(t + every))
        self.at(start, tick)

    def delivered(self, name: str, since_index: int = 0) -> int:
        return len(self.hosts[name].received) - since_index

    def path(self, a: str, b: str):
        return self.hosts[a].node.endpoint_of(self.hosts[b].node.public_key)

    def is_direct(self, a: str, b: str) -> bool:
        return not isinstance(self.path(a, b), RelayEndpoint)

"""MeshNode: the WireGuard core plus discovery on one shared UDP socket. Sans-IO.

Inputs:  receive_datagram(data, addr, now, via=None)   any datagram, classified here (demux.classify): the
                                                        birthday extra sockets' (via=i: on socket i)
         receive_wireguard(data, addr, now)             the driver classified the datagram (demux.dispatch):
         receive_disco(data, addr, now, via=None)         one input per kind, none tests the bytes for
         receive_stun(data, addr, now)                    their kind again
         receive_relay(src_key, data, now)              a datagram the relay delivered from src_key
         send_ip_packet(pkt, now)                       from the TUN
         apply_netmap(desired, now), punch(key, now), set_local_endpoints(addrs, now),
         set_stun_servers(addrs, now), handle_timer(now)
         user_ping(ref, key, now, timeout)              `meshwg ping` (meshwg.disco.user_ping): a UserPingDone event
Outputs: datagrams_to_send() -> [(bytes, dest)]  dest: (ip, port) | RelayEndpoint | SocketEndpoint
         tun_packets_to_write(), pop_events(), get_timer(), status(now)
The driver drives it through meshwg.wg.driven.DrivenCore (on_earlier_deadline is that contract's hook).
Counters follow meshwg.counters' convention (`node.counters`; `node.drops` is the older merged view).

Each mesh peer's WireGuard endpoint is chosen here (peer.roaming = False): RelayEndpoint(key) until a
disco pong confirms a direct path, the direct address while it stays trusted, back to the relay when
it stops answering. The WireGuard session is untouched by these moves; only the destination changes.
A pending WireGuard initiation is re-sent as soon as news says the peer's path works (a path change, a
punch notice, disco from the peer through the relay) rather than at the core's 5 s retry.

Whatever the directory or the peers say, probing any one address is bounded: at most 2 pings a second
to one (ip, port) after a burst of 30 (150 in the first minute), and at most 10 a second to one IP (an
IPv6 /64) after a burst of 60 (660 in the first minute) whatever the ports, all peers together; birthday
probes have their own bound instead, 2,048 a minute to one IP (one attempt's worth; each NAT traversal
technique in meshwg.disco.techniques names its own). Pings to an address
that answered the same peer's ping within the last 30 s skip the per-IP bound (not the per-address one):
a victim cannot answer a sealed ping, and a busy office NAT may front dozens of peers we heartbeat. A
hostile entry naming a victim's address (or its IP at many ports) in many peers' candidates thus costs
the victim a trickle, not a flood.

Plain peers (PeerSpec.plain: a stock WireGuard device, issue 12) are core peers with roaming on, as in
WireGuard: their endpoint is where their last authenticated datagram came from, (ip, port) when the phone
reaches our public endpoint directly (`plain add --direct`), RelayEndpoint(PLAIN_SOURCE) through the relay's
plain port (which routes what we send there by receiver index), RelayEndpoint(their key) until they first
speak. No PeerPaths, disco, STUN target, punch, call-me-maybe or birthday for them. Their relayed datagrams
arrive as RECVs from PLAIN_SOURCE (the relay cannot know their key): WireGuard goes to the core, whose
handshake identifies the peer; anything else is dropped.

Nor do our probes go into the mesh: call-me-maybe endpoints and ping sources inside the mesh prefixes
(set_mesh_prefixes, from the welcome), our own mesh address and unassigned ones included, or routed to
a peer, are dropped and counted; the directory's candidates are filtered the same way (peer_entry).
"""

from __future__ import annotations

import collections
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass

from meshwg import counters
from meshwg.disco import netcheck as NC
from meshwg.disco import stun
from meshwg.disco.messages import CallMeMaybe, DiscoCodec, Ping, Pong, endpoints_bounded
from meshwg.disco.peer_paths import (TECHNIQUES, PeerPaths, SendCallMeMaybe, SendPing, SendPong, in_networks,
                                     parse_network)
from meshwg.disco.techniques import CloseSockets, OpenSockets
from meshwg.disco import user_ping as UP
from meshwg.disco.user_ping import UserPingDone  # noqa: F401  (an event of the node's, re-exported)
from meshwg.config.keys import nonzero
from meshwg.config.uapi_apply import apply_peer_update
from meshwg.mesh import demux
from meshwg.mesh.netmap import AddPeer, ChangePeer, PeerSpec, RemovePeer, diff, route_changes
from meshwg.signaling.relay_wire import PLAIN_SOURCE
from meshwg.token_bucket import KeyedLimiter, TokenBucket

GLOBAL_PROBE_RATE = 300.0     # disco pings per second, all peers together
GLOBAL_PROBE_BURST = 600.0
STUN_INTERVAL = (20.0, 26.0)  # re-STUN period, jittered
STUN_TIMEOUT = 3.0
MAX_LOCAL_ENDPOINTS = 16
PROBE_ADDR_RATE = 2.0         # pings a second to any one (ip, port), all peers together (a heartbeat is 0.5)
PROBE_ADDR_BURST = 30.0
PROBE_IP_RATE = 10.0          # pings a second to any one IP (IPv6: /64), all ports and peers together
PROBE_IP_BURST = 60.0
PROBE_CONFIRMED = 30.0        # an address that answered this peer this recently skips the per-IP bound
PROBE_ADDR_KEYS = 65536       # addresses tracked; idle ones are forgotten first


@dataclass(frozen=True)
class RelayEndpoint:
    """Send through the relay to this peer (the relay shell frames it)."""
    peer_key: bytes

    def __repr__(self) -> str:
        return f"RelayEndpoint({self.peer_key[:4].hex()})"


@dataclass(frozen=True)
class SocketEndpoint:
    """Send from birthday extra socket `socket` (1-based) to `addr`."""
    socket: int
    addr: tuple


def _socket_dest(addr: tuple, via: int | None):
    """Where a datagram for addr goes out: the main socket (via None) or birthday socket `via`."""
    return addr if via is None else SocketEndpoint(via, addr)


# --- events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathChanged:
    peer_key: bytes
    endpoint: object
    latency: float | None
    reason: str


@dataclass(frozen=True)
class PeerActive:
    """Traffic to an idle peer: its probing resumed (the agent's punch policy looks at it now, issue 15)."""
    peer_key: bytes


@dataclass(frozen=True)
class RoutesChanged:
    add: tuple
    remove: tuple


@dataclass(frozen=True)
class PeersChanged:
    ops: tuple


@dataclass(frozen=True)
class LocalEndpointsChanged:
    endpoints: tuple
    nat: str | None


@dataclass(frozen=True)
class NetcheckDone:
    report: NC.NetcheckReport


@dataclass(frozen=True)
class OpenBirthdaySockets:
    peer_key: bytes
    count: int


@dataclass(frozen=True)
class CloseBirthdaySockets:
    peer_key: bytes
    keep: tuple              # socket indexes still carrying traffic with the peer


def _probe_ip_key(ip: str):
    """The per-IP probe bound's key: the IPv4 address, or the IPv6 /64 (one host or LAN holds a whole /64)."""
    if ":" not in ip:
        return ip
    try:
        return ipaddress.IPv6Network((ip, 64), strict=False)
    except ValueError:
        return ip


def _is_keepalive(data: bytes) -> bool:
    return len(data) == 32 and data[0] == 4


class MeshNode:
    def __init__(self, core, private_key: bytes, random_bytes, *, wall_offset: float = 0.0,
                 global_probe_rate: float = GLOBAL_PROBE_RATE, global_probe_burst: float = GLOBAL_PROBE_BURST):
        self.core = core
        self.codec = DiscoCodec(private_key, random_bytes)
        self.public_key = self.codec.public_key
        self._random = random_bytes
        self.wall_offset = wall_offset
        self.specs: dict[bytes, PeerSpec] = {}
        self.paths: dict[bytes, PeerPaths] = {}
        self._endpoint: dict[bytes, object] = {}
        self._ep_to_key: dict[object, bytes] = {}
        self._resend_at: dict[bytes, float] = {}    # deferred handshake re-sends (see _resend_handshake)
        self.plain: dict[bytes, None] = {}          # the plain peers' keys, in the order they came
        # Called with a new timer deadline that may be earlier than get_timer() said before, from the
        # packet inputs (which the driver flushes without re-reading the O(peers) timer).
        self.on_earlier_deadline: Callable[[float], None] | None = None
        self._out: list = []
        self._events: list = []
        self.counters: collections.Counter = collections.Counter()
        self._budget = TokenBucket(global_probe_rate, global_probe_burst)
        self._addr_limit = KeyedLimiter(PROBE_ADDR_RATE, PROBE_ADDR_BURST, PROBE_ADDR_KEYS)
        self._ip_limit = KeyedLimiter(PROBE_IP_RATE, PROBE_IP_BURST, PROBE_ADDR_KEYS)
        # A NAT traversal technique's probes have its own per-IP bound instead (birthday: 2,048 a minute).
        self._technique_limit = {t.name: KeyedLimiter(t.ip_rate, t.ip_burst, PROBE_ADDR_KEYS) for t in TECHNIQUES}
        self.mesh_nets: tuple = ()      # the welcome's prefixes: no probe goes there (set_mesh_prefixes)
        self.user_pings = UP.UserPings(random_bytes)   # `meshwg ping`'s pings in flight
        self._now = 0.0
        # our own endpoints
        self.iface_endpoints: tuple = ()
        self.reflexive: tuple = ()
        self.local_nat: str | None = None
        self.last_report: NC.NetcheckReport | None = None
        # STUN
        self.stun_servers: tuple = ()
        self._stun_pending: dict[bytes, tuple] = {}
        self._stun_results: list = []
        self._stun_round_end = math.inf
        self._next_stun = math.inf

    # --- helpers ----------------------------------------------------------------------------
    def _wall(self, now: float) -> float:
        return now + self.wall_offset

    def _take_budget(self, n: int) -> bool:
        return self._budget.take(self._now, n)

    @property
    def endpoints(self) -> tuple:
        """Our candidates for peers: reflexive first (they work across NATs), then interfaces."""
        return endpoints_bounded(list(self.reflexive) + list(self.iface_endpoints))

    def endpoint_of(self, key: bytes):
        if key in self.plain:
            peer = self.core.peers.get(key)
            return None if peer is None else peer.endpoint   # roaming: the core follows the device
        return self._endpoint.get(key)

    # --- directory --------------------------------------------------------------------------
    def apply_netmap(self, desired: dict[bytes, PeerSpec], now: float) -> list:
        self._now = now
        desired = {k: v for k, v in desired.items() if k != self.public_key}
        ops = diff(self.specs, desired)
        if not ops:
            return ops
        rc = route_changes(self.specs, desired)
        for op in ops:
            if isinstance(op, RemovePeer):
                self._remove_peer(op.key)
        for op in ops:
            if isinstance(op, ChangePeer):
                self._change_peer(op.old, op.new, op.fields, now)
            elif isinstance(op, AddPeer):
                self._add_peer(op.spec, now)
        self.specs = dict(desired)
        if rc:
            self._events.append(RoutesChanged(tuple(rc.add), tuple(rc.remove)))
        self._events.append(PeersChanged(tuple(ops)))
        self._flush_core(now, activity=False)
        return ops

    def _add_peer(self, spec: PeerSpec, now: float) -> None:
        peer = self.core.add_peer(spec.key)
        peer.roaming = False  # the mesh layer moves endpoints, not the source of the last packet
        self.core.set_allowed_ips(peer, list(spec.addresses))
        self.core.set_peer_accept(peer, spec.accept)
        if spec.plain:
            # The device answers from wherever it is: our public endpoint directly, or the relay's plain port
            # (its datagrams from RelayEndpoint(PLAIN_SOURCE), routed back by receiver index). WireGuard's
            # roaming follows it; until it speaks, what we send goes to the relay for its key. Its endpoint is
            # the core's alone (not in _endpoint / _ep_to_key, which the mesh peers' path choice keeps).
            self.plain[spec.key] = None
            peer.roaming = True
            self.core.set_endpoint(peer, RelayEndpoint(spec.key))
            return
        self.codec.add_peer(spec.key)
        pp = PeerPaths(spec.key, self._random, local_nat=self.local_nat, peer_nat=spec.nat)
        pp.set_candidates("directory", spec.candidates, now)
        pp.set_candidates("observed", spec.observed, now)
        self.paths[spec.key] = pp
        self._set_endpoint(spec.key, RelayEndpoint(spec.key), None, "relay until a direct path answers")

    def _remove_peer(self, key: bytes) -> None:
        self._resend_at.pop(key, None)
        self.plain.pop(key, None)
        self.core.remove_peer(key)
        self.codec.remove_peer(key)
        pp = self.paths.pop(key, None)
        if pp is not None and pp.holds_sockets():
            self._events.append(CloseBirthdaySockets(key, ()))
        ep = self._endpoint.pop(key, None)
        if ep is not None and self._ep_to_key.get(ep) == key:
            del self._ep_to_key[ep]

    # --- UAPI (`wg set` on the mesh interface) --------------------------------------------------
    def apply_set_request(self, request, now: float) -> None:
        """A parsed UAPI `set` (meshwg.config.uapi.SetRequest). The node is its core's one writer: peers
        added by hand are applied as WireGuard does; a mesh peer may be removed (it stays out until the
        directory next changes, then comes back whole) or given a preshared key or keepalive, but its
        endpoint and AllowedIPs are the directory's and the node's. A refused request changes nothing
        (ValueError, which the UAPI answers with EINVAL)."""
        self._now = now
        if request.private_key is not None and nonzero(request.private_key) != self.core.private_key:
            raise ValueError("the mesh interface's private key is the node's identity; it cannot be set")
        for update in request.peers:
            if update.public_key in self.specs and not update.remove and (
                    update.endpoint is not None or update.replace_allowed_ips or update.allowed_ips):
                raise ValueError(f"peer {update.public_key[:4].hex()} is a mesh peer: the directory sets its "
                                 "endpoint and allowed IPs")
        if request.replace_peers:
            for key in [k for k in self.core.peers if k not in self.specs]:
                self.core.remove_peer(key)
        for update in request.peers:
            if update.public_key in self.specs:
                if update.remove:
                    self._remove_by_hand(update.public_key)
                else:
                    apply_peer_update(self.core, update, now)  # preshared key, keepalive: the core's own
            else:
                apply_peer_update(self.core, update, now)
        self._flush_core(now, activity=False)

    def _remove_by_hand(self, key: bytes) -> None:
        kept = {k: v for k, v in self.specs.items() if k != key}
        rc = route_changes(self.specs, kept)
        self._remove_peer(key)
        self.specs = kept  # the next netmap puts it back whole, as an added peer
        self.counters["remove_peer_by_hand"] += 1
        if rc:
            self._events.append(RoutesChanged(tuple(rc.add), tuple(rc.remove)))

    def _change_peer(self, old: PeerSpec, new: PeerSpec, fields, now: float) -> None:
        if "plain" in fields:
            # A node became a plain peer or back: nothing of the old kind's state applies (paths, disco).
            self._remove_peer(new.key)
            self._add_peer(new, now)
            return
        peer = self.core.peers[new.key]  # the node is its core's one writer: a mesh peer is there
        if "addresses" in fields:
            self.core.set_allowed_ips(peer, list(new.addresses))
        if "accept" in fields:   # the policy changed: recompiled now, in force from the next packet (issue 13)
            self.core.set_peer_accept(peer, new.accept)
        if new.plain:
            return  # no discovery state: candidates, observation and NAT kind are always empty
        pp = self.paths[new.key]
        if "candidates" in fields:
            pp.set_candidates("directory", new.candidates, now)
        if "observed" in fields:
            pp.set_candidates("observed", new.observed, now)
        if "nat" in fields:
            pp.set_nat(self.local_nat, new.nat)

    def punch(self, peer_key: bytes, now: float) -> None:
        """The signaling server says peer_key wants to talk to us now (and tells it the same)."""
        self._now = now
        if peer_key in self.plain:
            self.counters["ignore_punch_plain_peer"] += 1  # no path to punch: it is reached through the relay
            return
        pp = self.paths.get(peer_key)
        if pp is None:
            self.counters["ignore_punch_unknown_peer"] += 1
            return
        pp.on_punch(now)
        self._service(peer_key, now)
        # The peer is online and asked for us: it is very likely reachable through the relay again.
        self._resend_handshake(peer_key, now)

    def set_local_endpoints(self, addrs, now: float) -> None:
        """Our interface addresses with the shared socket's port (LAN peers use these)."""
        self._now = now
        new = endpoints_bounded(tuple(a) for a in addrs)[:MAX_LOCAL_ENDPOINTS]
        if new != self.iface_endpoints:
            self.iface_endpoints = new
            self._local_changed()

    def _local_changed(self) -> None:
        self._events.append(LocalEndpointsChanged(self.endpoints, self.local_nat))
        for pp in self.paths.values():
            pp.want_cmm = pp.active(self._now)

    def set_mesh_prefixes(self, prefixes) -> None:
        """The mesh's prefixes (the welcome's prefix4/prefix6; empty or invalid ones are skipped): peers'
        call-me-maybe endpoints and ping sources inside them are dropped (our own mesh address and
        unassigned ones included: a ping there reaches local services or nobody)."""
        self.mesh_nets = tuple(n for n in map(parse_network, prefixes) if n is not None)
        self.core.set_acl_mesh_nets(self.mesh_nets)

    def set_stun_servers(self, servers, now: float) -> None:
        self.stun_servers = tuple(tuple(s) for s in servers)
        self._next_stun = now if self.stun_servers else math.inf

    def restun(self, now: float) -> None:
        """Network changed: STUN again right away."""
        if self.stun_servers:
            self._next_stun = now

    # --- inputs -----------------------------------------------------------------------------
    def receive_datagram(self, data: bytes, addr, now: float, via: int | None = None) -> None:
        """A datagram nobody classified yet (the birthday sockets'): classify it, then the kind's input."""
        kind = demux.classify(data)
        if kind == demux.WIREGUARD:
            self.receive_wireguard(data, addr if via is None else SocketEndpoint(via, addr), now)
        elif kind == demux.DISCO:
            self.receive_disco(data, addr, now, via)
        elif kind == demux.STUN:
            self.receive_stun(data, addr, now)
        elif kind == demux.RELAY:
            # The shell hands main-socket relay frames to the relay session; one here came on another
            # socket (a birthday one) where no relay session listens. Count it, keep nothing.
            self.counters["drop_relay_datagram"] += 1
        else:
            self.counters["drop_unknown_datagram"] += 1

    def receive_wireguard(self, data: bytes, addr, now: float) -> None:
        """A datagram classified as WireGuard: straight to the core, which validates sizes and counts
        what it drops."""
        self._now = now
        self.core.receive_datagram(data, addr, now)
        self._flush_core(now, activity=False)

    def receive_disco(self, data: bytes, addr, now: float, via: int | None = None) -> None:
        """A datagram classified as discovery (on birthday extra socket `via`, or the shared one)."""
        self._now = now
        self._receive_disco(data, addr, via, None, now)

    def receive_stun(self, data: bytes, addr, now: float) -> None:
        """A datagram classified as STUN: an answer to one of our requests, or dropped and counted."""
        self._now = now
        self._receive_stun(data, addr, now)

    def receive_relay(self, src_key: bytes, data: bytes, now: float) -> None:
        """A datagram the relay delivered, claimed to come from src_key (the relay authenticated it), or
        from a plain peer (src_key PLAIN_SOURCE: the core's handshake tells which, or refuses it)."""
        self._now = now
        kind = demux.classify(data)
        if src_key == PLAIN_SOURCE:
            self._receive_plain(data, kind, now)
            return
        if kind == demux.WIREGUARD:
            self.core.receive_datagram(data, RelayEndpoint(src_key), now)
            self._flush_core(now, activity=False)
        elif kind == demux.DISCO:
            self._receive_disco(data, RelayEndpoint(src_key), None, src_key, now)
        else:
            self.counters["drop_relay_unknown"] += 1

    def _receive_plain(self, data: bytes, kind, now: float) -> None:
        """A plain peer's datagram: WireGuard only (a plain peer speaks nothing else, and has no disco key).
        Its source is RelayEndpoint(PLAIN_SOURCE): the plain peer's endpoint once authenticated (roaming), which
        the relay routes by receiver index."""
        if kind != demux.WIREGUARD:
            self.counters["drop_relay_plain_not_wireguard"] += 1
            return
        self.counters["recv_relay_plain"] += 1
        self.core.receive_datagram(data, RelayEndpoint(PLAIN_SOURCE), now)
        self._flush_core(now, activity=False)

    def send_ip_packet(self, pkt: bytes, now: float) -> None:
        self._now = now
        self.core.send_ip_packet(pkt, now)
        self._flush_core(now, activity=True)

    def handle_timer(self, now: float) -> None:
        self._now = now
        self.core.handle_timer(now)
        self._flush_core(now, activity=False)
        for key in [k for k, t in self._resend_at.items() if t <= now]:
            del self._resend_at[key]
            self._resend_handshake(key, now, defer=False)
        for key, pp in list(self.paths.items()):
            if pp.get_timer(now) <= now or self._endpoint_stale(key, now):
                self._service(key, now)
        self._stun_timer(now)
        self._events += self.user_pings.expire(now)

    # --- the user's pings (meshwg.disco.user_ping) ---------------------------------------------
    def user_ping(self, ref: int, key: bytes, now: float, timeout: float) -> int:
        """Ping mesh peer `key` on each of its candidate paths and through the relay; the first pong back (or
        none within `timeout`) becomes a UserPingDone(ref) event. The probe bounds apply to the direct pings as
        to any; returns how many paths were pinged. Misuse raises (not a mesh peer, user_pings full)."""
        self._now = now
        pp = self.paths[key]
        targets = [t for t in UP.ping_targets(pp.candidates.values())
                   if t == UP.RELAY or self._user_probe_ok(key, t, now)]
        wall = self._wall(now)
        for txid, target in self.user_pings.start(ref, key, targets, now, timeout):
            data = self.codec.seal(key, Ping(txid, self.public_key), wall)
            if target == UP.RELAY:
                self._out.append((data, RelayEndpoint(key)))
            else:
                pp.expect_pong(txid, target[0], target[1], now)
                self._out.append((data, _socket_dest(*target)))
            self.counters["send_disco_ping_user"] += 1
        return len(targets)

    def _user_probe_ok(self, key: bytes, target: tuple, now: float) -> bool:
        refused = self._probe_refused(key, SendPing(target[0], b"", target[1]), now)
        if refused is None and self._take_budget(1):
            return True
        self.counters[refused or "limit_probe_global"] += 1
        return False

    def _pong_via_relay(self, key: bytes, pp: PeerPaths, txid: bytes, now: float) -> None:
        """A ping that came through the relay (a user's `meshwg ping`): answered the same way, at the pong rate;
        never a path (the relay is not an address of the peer's)."""
        if not pp.pong_allowed(now):
            return
        data = self.codec.seal(key, Pong(txid, ("0.0.0.0", 0)), self._wall(now))
        self._out.append((data, RelayEndpoint(key)))
        self.counters["send_disco_pong_relay"] += 1

    def _user_pong(self, key: bytes, txid: bytes, target, now: float) -> bool:
        done = self.user_pings.answer(key, txid, target, now)
        if done is None:
            return False
        self.counters["recv_disco_pong_user"] += 1
        self._events.append(done)
        return True

    # --- disco ------------------------------------------------------------------------------
    def _receive_disco(self, data: bytes, addr, via, relay_src: bytes | None, now: float) -> None:
        opened = self.codec.open_untrusted(data, self._wall(now))
        if opened is None:
            self.counters["drop_disco"] += 1
            return
        sender, msg = opened
        if relay_src is not None and sender != relay_src:
            self.counters["drop_disco_relay_sender_mismatch"] += 1
            return
        pp = self.paths.get(sender)
        if pp is None:  # the codec knows exactly our peers; a race with removal only
            self.counters["drop_disco_unknown_peer"] += 1
            return
        if relay_src is not None:
            # Proof that the peer is up, knows us and has a live relay session: an initiation of ours
            # lost while it was not (server restart, peer not yet reconnected) can go again now.
            self._resend_handshake(sender, now)
        if isinstance(msg, Ping):
            if relay_src is not None:
                self.counters["recv_disco_ping_relay"] += 1
                self._pong_via_relay(sender, pp, msg.txid, now)
                return
            if self._in_mesh(addr):
                # Only through a tunnel or from this host: no pong, and never a path (it would loop).
                self.counters["drop_disco_ping_mesh_source"] += 1
                return
            self.counters["recv_disco_ping"] += 1
            pp.on_ping(msg.txid, addr, via, now)
        elif isinstance(msg, Pong):
            user = self._user_pong(sender, msg.txid, UP.RELAY if relay_src is not None else (addr, via), now)
            if relay_src is not None:
                if not user:
                    self.counters["ignore_disco_pong_via_relay"] += 1
                return
            if pp.on_pong(msg.txid, now, via, addr):   # a user ping's pong too: it is one like any other
                self.counters["recv_disco_pong"] += 1
            elif not user:
                self.counters["drop_disco_pong_unmatched"] += 1
        elif isinstance(msg, CallMeMaybe):
            self.counters["recv_disco_cmm"] += 1
            pp.on_call_me_maybe(self._outside_mesh(msg.endpoints), now)
        self._service(sender, now)

    def _service(self, key: bytes, now: float) -> None:
        pp = self.paths.get(key)
        if pp is None:
            return
        wall = self._wall(now)
        for act in pp.poll(now, wall, self._take_budget):
            if isinstance(act, SendPing):
                refused = self._probe_refused(key, act, now)
                if refused:
                    self.counters["limit_probe_addr"] += 1   # every refusal, as before
                    if refused != "limit_probe_addr":
                        self.counters[refused] += 1
                    continue
                data = self.codec.seal(key, Ping(act.txid, self.public_key), wall)
                self._out.append((data, _socket_dest(act.addr, act.via)))
                self.counters["send_disco_ping"] += 1
            elif isinstance(act, SendPong):
                data = self.codec.seal(key, Pong(act.txid, act.observed), wall)
                self._out.append((data, _socket_dest(act.addr, act.via)))
                self.counters["send_disco_pong"] += 1
            elif isinstance(act, SendCallMeMaybe):
                data = self.codec.seal(key, CallMeMaybe(self.endpoints), wall)
                self._out.append((data, RelayEndpoint(key)))
                self.counters["send_disco_cmm"] += 1
            elif isinstance(act, OpenSockets):
                self._events.append(OpenBirthdaySockets(key, act.count))
            elif isinstance(act, CloseSockets):
                self._events.append(CloseBirthdaySockets(key, act.keep))
        self._update_endpoint(key, now)

    def _probe_refused(self, key: bytes, ping: SendPing, now: float) -> str | None:
        """The probe bounds (see the module docstring): a counter name when `ping` must not go, else None."""
        if ping.technique is not None:
            limit = self._technique_limit[ping.technique]
            return None if limit.allow(ping.addr[0], now) else f"limit_probe_{ping.technique}"
        if self._answered_recently(key, ping.addr, now):
            return None if self._addr_limit.allow(ping.addr, now) else "limit_probe_addr"
        ip = _probe_ip_key(ping.addr[0])
        # Look before spending, so a ping one bound refuses costs the other nothing.
        if self._ip_limit.exhausted(ip, now):
            return "limit_probe_ip"
        if self._addr_limit.exhausted(ping.addr, now) or not self._addr_limit.allow(ping.addr, now):
            return "limit_probe_addr"
        return None if self._ip_limit.allow(ip, now) else "limit_probe_ip"

    def _answered_recently(self, key: bytes, addr: tuple, now: float) -> bool:
        """addr answered a ping of ours to this peer lately: the peer is there, not a victim."""
        pp = self.paths.get(key)
        cand = pp.candidates.get(addr) if pp is not None else None
        return cand is not None and cand.last_pong is not None and now - cand.last_pong <= PROBE_CONFIRMED

    def _outside_mesh(self, endpoints) -> list:
        """A peer's call-me-maybe endpoints minus mesh addresses: a disco ping there would go into the
        tunnels or to this host (the directory's candidates are filtered before they get here, see
        peer_entry); PeerPaths drops the other invalid ones."""
        out = []
        for ep in endpoints:
            if self._in_mesh(ep):
                self.counters["drop_disco_cmm_mesh_endpoint"] += 1
            else:
                out.append(ep)
        return out

    def _in_mesh(self, addr) -> bool:
        """addr's IP lies in the mesh prefixes or is routed to a peer (peer_entry's rule for candidates)."""
        try:
            ip = ipaddress.ip_address(addr[0])
        except (ValueError, TypeError, IndexError, KeyError):
            return False  # not an address: PeerPaths drops it
        if in_networks(ip, self.mesh_nets):
            return True
        return self._routed_in_mesh(ip)

    def _routed_in_mesh(self, ip) -> bool:
        try:
            return self.core.lookup_peer_for(ip) is not None
        except (ValueError, TypeError):
            return False

    def _endpoint_stale(self, key: bytes, now: float) -> bool:
        return self._endpoint.get(key) != self._wanted_endpoint(key, now)

    def _wanted_endpoint(self, key: bytes, now: float):
        pp = self.paths[key]
        d = pp.endpoint(now)
        if d is None:
            return RelayEndpoint(key)
        return _socket_dest(*d)

    def _update_endpoint(self, key: bytes, now: float) -> None:
        want = self._wanted_endpoint(key, now)
        if want != self._endpoint.get(key):
            pp = self.paths[key]
            direct = not isinstance(want, RelayEndpoint)
            reason = "direct path confirmed by pong" if direct else pp.relay_reason(now, self._wall(now))
            self._set_endpoint(key, want, pp.best.latency if direct else None, reason, now)

    def _set_endpoint(self, key: bytes, ep, latency, reason: str, now: float | None = None) -> None:
        old = self._endpoint.get(key)
        if old is not None and self._ep_to_key.get(old) == key:
            del self._ep_to_key[old]
        self._endpoint[key] = ep
        self._ep_to_key[ep] = key
        self.core.set_endpoint(self.core.peers[key], ep)
        self.counters["switch_path"] += 1
        self._events.append(PathChanged(key, ep, latency, reason))
        if old is not None:
            # A pending initiation went to the old path; the new one was just confirmed (or is the relay).
            self._resend_handshake(key, self._now if now is None else now)

    def _resend_handshake(self, key: bytes, now: float, defer: bool = True) -> None:
        """News that the peer's path works: have the core re-send a pending initiation now, or once,
        as soon as its rate floor allows (handle_timer); a no-op once the handshake completed."""
        peer = self.core.peers.get(key)
        if peer is None:
            return
        when = self.core.resend_handshake(peer, now)
        if when is None or when <= now:
            self._resend_at.pop(key, None)
            if when is not None:
                self.counters["resend_handshake_on_path"] += 1
                self._flush_core(now, activity=False)
        elif defer:
            self._resend_at[key] = min(when, self._resend_at.get(key, math.inf))
            if self.on_earlier_deadline is not None:
                self.on_earlier_deadline(self._resend_at[key])

    # --- core output ------------------------------------------------------------------------
    def _flush_core(self, now: float, activity: bool) -> None:
        touched = None
        for data, ep in self.core.datagrams_to_send():
            self._out.append((data, ep))
            if activity and not _is_keepalive(data):
                key = self._ep_to_key.get(ep)
                pp = self.paths.get(key) if key is not None else None
                if pp is not None and pp.note_activity(now):
                    touched = touched or []
                    touched.append(key)
        if touched:
            for key in touched:
                self._service(key, now)
                self._events.append(PeerActive(key))

    # --- STUN -------------------------------------------------------------------------------
    def _stun_timer(self, now: float) -> None:
        if now >= self._stun_round_end:
            self._finish_stun_round()
        if now >= self._next_stun and self.stun_servers:
            self._stun_pending.clear()
            self._stun_results = []
            for server in self.stun_servers:
                txid = self._random(12)
                self._stun_pending[txid] = server
                self._out.append((stun.build_binding_request(txid), server))
                self.counters["send_stun"] += 1
            self._stun_round_end = now + STUN_TIMEOUT
            jitter = int.from_bytes(self._random(2), "big") / 65535.0
            self._next_stun = now + STUN_INTERVAL[0] + jitter * (STUN_INTERVAL[1] - STUN_INTERVAL[0])

    def _receive_stun(self, data: bytes, addr, now: float) -> None:
        parsed = stun.parse_binding_response_untrusted(data)
        if parsed is None:
            self.counters["drop_stun"] += 1
            return
        txid, mapped = parsed
        server = self._stun_pending.pop(txid, None)
        if server is None:
            self.counters["drop_stun_unmatched"] += 1
            return
        self.counters["recv_stun"] += 1
        self._stun_results.append(NC.StunResult(server, tuple(mapped)))
        if not self._stun_pending:
            self._finish_stun_round()

    def _finish_stun_round(self) -> None:
        self._stun_round_end = math.inf
        if not self._stun_results and not self._stun_pending:
            return
        results = self._stun_results + [NC.StunResult(s, None) for s in self._stun_pending.values()]
        self._stun_pending.clear()
        self._stun_results = []
        report = NC.classify(results)
        self.last_report = report
        self._events.append(NetcheckDone(report))
        nat = report.mapping_kind or self.local_nat
        # Under a symmetric NAT a reflexive address is only valid toward that STUN server: still
        # advertise the first one (the observed address is what peers hole-punch toward).
        refl = tuple(report.reflexive[:1] if report.hard else report.reflexive)
        if refl != self.reflexive or nat != self.local_nat:
            self.reflexive = refl
            self.set_local_nat(nat)
            self._local_changed()

    def set_local_nat(self, nat: str | None) -> None:
        """Set our NAT mapping kind from an external netcheck."""
        self.local_nat = nat
        for pp in self.paths.values():
            pp.set_nat(nat, pp.peer_nat)

    # --- outputs ----------------------------------------------------------------------------
    def datagrams_to_send(self) -> list:
        out, self._out = self._out, []
        return out

    def tun_packets_to_write(self) -> list:
        return self.core.tun_packets_to_write()

    def pop_events(self) -> list:
        ev = self._events
        self._events = []
        core_ev = self.core.pop_events()
        return ev + list(core_ev) if core_ev else ev

    def get_timer(self) -> float:
        t = self.core.get_timer()
        now = self._now
        for key, pp in self.paths.items():
            t = min(t, pp.get_timer(now))
        t = min(t, self._next_stun, self._stun_round_end, self.user_pings.deadline(), *self._resend_at.values())
        return t

    def component_counters(self) -> dict[str, collections.Counter]:
        """The node's and its discovery codec's counters, for meshwg.counters.merge (the core's are the
        device's to report: it serves the core)."""
        return {"node": self.counters, "disco": counters.as_drops(self.codec.drops),
                "acl": self.core.acl_counters}   # the peers' filters' flow tables (their drops are the core's)

    @property
    def drops(self) -> collections.Counter:
        """One table of the node's drops: the codec's reasons as they are (`disco_replay`) and the node's own
        drop_* counters (`meshwg status` shows the merged component view instead)."""
        c = collections.Counter(self.codec.drops)
        c.update(counters.drops(self.counters))
        return c

    def status(self, now: float) -> list[dict]:
        wall = self._wall(now)
        out = []
        for key, spec in self.specs.items():
            if spec.plain:
                out.append(self._plain_status(key, spec))
                continue
            pp = self.paths[key]
            peer = self.core.peers.get(key)
            ep = self._endpoint.get(key)
            direct = not isinstance(ep, RelayEndpoint)
            out.append({
                "public_key": key,
                "name": spec.name,
                "addresses": [str(a) for a in spec.addresses],
                "path": ("direct" if direct else "relay"),
                "endpoint": (ep.addr if isinstance(ep, SocketEndpoint) else ep) if direct else None,
                "latency": pp.best.latency if direct and pp.best else None,
                "reason": "" if direct else pp.relay_reason(now, wall),
                "active": pp.active(now),
                "candidates": [c.addr for c in pp.candidates.values()],
                "last_direct": pp.best.addr if pp.best else None,   # kept after the path timed out
                "last_handshake": getattr(peer, "last_handshake_wall", None),
                "rx_bytes": getattr(peer, "rx_bytes", 0),
                "tx_bytes": getattr(peer, "tx_bytes", 0),
                "birthday": pp.birthday.role if pp.birthday else None,
                "plain": False,
            })
        return out

    def _plain_status(self, key: bytes, spec: PeerSpec) -> dict:
        peer = self.core.peers.get(key)
        ep = getattr(peer, "endpoint", None)
        direct = ep is not None and not isinstance(ep, RelayEndpoint)
        return {"public_key": key, "name": spec.name, "addresses": [str(a) for a in spec.addresses],
                "path": "direct" if direct else "relay",
                "endpoint": (ep.addr if isinstance(ep, SocketEndpoint) else ep) if direct else None,
                "latency": None, "reason": "plain WireGuard peer",
                "active": False, "candidates": [], "last_direct": None, "birthday": None, "plain": True,
                "last_handshake": getattr(peer, "last_handshake_wall", None),
                "rx_bytes": getattr(peer, "rx_bytes", 0), "tx_bytes": getattr(peer, "tx_bytes", 0)}

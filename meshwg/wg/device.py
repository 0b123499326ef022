"""WireGuardCore: the sans-IO WireGuard state machine (docs/core-api.md; WireGuard whitepaper §5-§6).

Inputs: receive_datagram, send_ip_packet, handle_timer (+ configuration calls). Outputs: datagrams_to_send,
tun_packets_to_write, pop_events, get_timer, drops; it implements the driver's contract
(meshwg.wg.driven.DrivenCore), receive_wireguard and on_earlier_deadline included. No clock, socket or OS
access: `now` is monotonic seconds supplied by the caller; wall time is now + wall_offset; randomness comes
from random_bytes.

The type-4 paths (send_ip_packet, the transport branch of receive_datagram) are the hot path: they inline
padding, sealing and the timer hooks and allocate only the output bytes.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections import Counter
from collections.abc import Callable, Iterable

from . import crypto, noise
from .acl import PeerFilter
from .acl import normalize as acl_normalize
from .allowed_ips import AllowedIPs, Network
from .constants import (
    COOKIE_REPLY_SIZE, DEFAULT_MTU, HANDSHAKE_INITIATION_RATE, INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET,
    INITIATION_SIZE, KEEPALIVE_TIMEOUT, LAST_MINUTE_HANDSHAKE_AGE, MAX_TIMER_HANDSHAKES, MSG_COOKIE_REPLY,
    MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT, NEW_HANDSHAKE_TIMEOUT, REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX_MS,
    RESPONSE_MAC1_OFFSET, RESPONSE_MAC2_OFFSET, RESPONSE_SIZE, UNDER_LOAD_AFTER_TIME, UNDER_LOAD_QUEUE_LENGTH,
    ZERO_KEYS_AFTER,
)
from .cookie import CookieChecker, RateLimiter, address_host
from .events import EndpointChanged, Event, HandshakeCompleted, HandshakeFailed, KeysZeroed
from .keypair import Keypair
from .peer import Peer

__all__ = ["WireGuardCore", "Peer"]

INF = math.inf
_TRANSPORT_HEADER = struct.Struct("<IIQ")
_INITIATION = struct.Struct("<II32s48s28s")  # up to mac1
_RESPONSE = struct.Struct("<III32s16s")  # up to mac1
_COOKIE_REPLY = struct.Struct("<II24s32s")
_MISS = object()
_transport_seal = crypto.transport_seal
_transport_open = crypto.transport_open

# Auto-detection of load when the shell does not report its backlog: this many handshake messages within
# one window counts as a full handshake queue (wireguard-go: 128 of 1024 queued).
AUTO_LOAD_WINDOW = 0.125
# resend_handshake: the least time between two initiations to a peer when news about its path, not the
# retransmit timer, asks for one. Far above the responder's flood rule (20 ms) and the 16.8 ms timestamp
# whitening, so the new initiation is accepted; and a response to the previous one has had a round trip's
# time to arrive (a re-send supersedes it).
HANDSHAKE_RESEND_MIN = 0.25


class WireGuardCore:
    def __init__(
        self,
        private_key: bytes | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        wall_offset: float = 0.0,
        mtu: int = DEFAULT_MTU,
        index_tag: int | None = None,
    ):
        self._random = random_bytes
        # A 16-bit tag in the top half of every receiver index we hand out (wire bytes 2-3), so a
        # kernel socket filter can drop blind floods naming indices we never issued. None: fully random.
        self.index_tag = index_tag
        self.wall_offset = wall_offset
        self.mtu = mtu
        self.peers: dict[bytes, Peer] = {}
        self.drops: Counter[str] = Counter()
        # The peers' packet filters' flow table events (meshwg.wg.acl: open_acl_flow, evict_acl_flow).
        self.acl_counters: Counter[str] = Counter()
        self.acl_mesh_nets: tuple = ()
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self._checker = CookieChecker(random_bytes)
        self._ratelimiter = RateLimiter()
        self._allowed = AllowedIPs()
        # The IPv4 address -> peer cache of AllowedIPs (cleared in place on every change), read
        # inline on the hot paths: each call saved is ~5 us of cold interpreter work after a wake-up.
        self._addr4_cache = self._allowed.v4_cache
        self._keypairs_by_index: dict[int, Keypair] = {}
        self._handshakes_by_index: dict[int, Peer] = {}
        self._out: list[tuple[bytes, object]] = []
        self._tun: list[bytes] = []
        self._events: list[Event] = []
        self._under_load_until = -INF
        self.auto_load_threshold: int | None = UNDER_LOAD_QUEUE_LENGTH
        self._load_window_start = -INF
        self._load_window_count = 0
        self._jitter_pool: list[int] = []
        # DrivenCore's hook, set by the driver. Never called: every deadline a packet input creates
        # here lies >= 1 s ahead (keepalive 10 s, rekey 5 s), which the driver's timer task sees anyway.
        self.on_earlier_deadline: Callable[[float], None] | None = None
        self.set_private_key(private_key)

    # ------------------------------------------------------------------ configuration

    def set_private_key(self, private_key: bytes | None) -> None:
        """Clamp and install our static key; recompute every peer's static-static DH; drop all sessions.
        The key it already has (compared clamped) changes nothing: `wg syncconf` re-sends it every time."""
        clamped = None if private_key is None else crypto.clamp(private_key)
        if clamped == self.private_key:
            return
        self.private_key = clamped
        self.public_key = None if clamped is None else crypto.dh_pub(clamped)
        self._checker.set_public_key(self.public_key)
        own = self.peers.pop(self.public_key, None) if self.public_key is not None else None
        if own is not None:  # a peer with our own key is meaningless (wireguard-go removes it too)
            self._forget_peer(own)
        for peer in self.peers.values():
            self._zero_sessions(peer)
            peer.static_static = self._static_static(peer.public_key)

    def _static_static(self, public_key: bytes) -> bytes | None:
        if self.private_key is None:
            return None
        try:
            return crypto.dh(self.private_key, public_key)
        except crypto.InvalidKey:
            return None

    def add_peer(self, public_key: bytes) -> Peer:
        if len(public_key) != 32:
            raise ValueError("a public key is 32 bytes")
        if public_key == self.public_key:
            raise ValueError("a peer cannot have this device's own public key")
        peer = self.peers.get(public_key)
        if peer is None:
            peer = self.peers[public_key] = Peer(public_key, self._allowed)
            peer.static_static = self._static_static(public_key)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            self._forget_peer(peer)

    def _forget_peer(self, peer: Peer) -> None:
        self._zero_sessions(peer)
        self._allowed.remove_peer(peer)
        peer.timers.stop()

    def set_preshared_key(self, peer: Peer, psk: bytes | None) -> None:
        if psk is not None and len(psk) != 32:
            raise ValueError("a preshared key is 32 bytes")
        peer.preshared_key = None if psk is None or psk == bytes(32) else psk

    def set_endpoint(self, peer: Peer, addr: object) -> None:
        peer.endpoint = addr

    def set_persistent_keepalive(self, peer: Peer, seconds: int, now: float) -> None:
        if seconds < 0 or seconds > 65535:
            raise ValueError("persistent keepalive is 0..65535 seconds")
        old, peer.persistent_keepalive = peer.persistent_keepalive, seconds
        if not seconds:
            peer.timers.persistent_keepalive = INF
        elif not old:
            self._send_keepalive(peer, now)  # turning it on sends one at once (wireguard-go uapi)
            peer.timers.persistent_keepalive = now + seconds

    def set_allowed_ips(self, peer: Peer, networks: Iterable[Network | str]) -> None:
        networks = list(networks)
        self._allowed.remove_peer(peer)
        for net in networks:
            self._allowed.insert(net, peer)

    def set_acl_mesh_nets(self, nets) -> None:
        """The mesh's prefixes (ip networks): inside them accept lists admit by host entries only (acl.table_for)."""
        self.acl_mesh_nets = tuple(nets)
        for peer in self.peers.values():
            if peer.acl is not None:
                peer.acl.set_mesh_nets(self.acl_mesh_nets)

    def set_peer_accept(self, peer: Peer, rules) -> None:
        """What the peer may send us (issue 13): an accept list [(proto, lo, hi, cidr)] compiled into its inbound
        filter (meshwg.wg.acl), or None for no policy (everything passes, no flow tracked). A new list keeps the
        flows we opened; the same list again changes nothing. ValueError for a malformed list."""
        if rules is None:
            peer.acl = None
        elif peer.acl is None:
            peer.acl = PeerFilter(rules, self.acl_counters, mesh_nets=self.acl_mesh_nets)
        elif acl_normalize(rules) != peer.acl.rules:
            peer.acl.set_rules(rules)

    def add_allowed_ip(self, peer: Peer, network: Network | str) -> None:
        self._allowed.insert(network, peer)

    def remove_allowed_ip(self, peer: Peer, network: Network | str) -> None:
        self._allowed.remove(network, peer)

    def lookup_peer_for(self, address) -> Peer | None:
        """The peer that allowed-IPs routes `address` to (an addition to the API, for shells and tests)."""
        return self._allowed.lookup(address)

    # ------------------------------------------------------------------ load input

    def note_handshake_backlog(self, queued: int, now: float) -> None:
        """Tell the core how many handshake messages (types 1-2) the shell has queued/read in its current
        batch. >= 128 puts the device under load for 1 s (wireguard-go IsUnderLoad): then handshakes need a
        valid mac2, others get a cookie reply, and valid ones are rate limited per source IP."""
        if queued >= UNDER_LOAD_QUEUE_LENGTH:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME

    def is_under_load(self, now: float) -> bool:
        return now < self._under_load_until

    def _count_handshake_arrival(self, now: float) -> None:
        threshold = self.auto_load_threshold
        if threshold is None:
            return
        if now - self._load_window_start > AUTO_LOAD_WINDOW:
            self._load_window_start, self._load_window_count = now, 0
        self._load_window_count += 1
        if self._load_window_count >= threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[bytes, object]]:
        out, self._out = self._out, []
        return out

    def tun_packets_to_write(self) -> list[bytes]:
        out, self._tun = self._tun, []
        return out

    def pop_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def get_timer(self) -> float:
        deadline = INF
        for peer in self.peers.values():
            t = peer.timers.next_deadline()
            if t < deadline:
                deadline = t
        return deadline

    # ------------------------------------------------------------------ send path (hot)

    def send_ip_packet(self, packet: bytes, now: float) -> None:
        if len(packet) >= 20 and packet[0] >> 4 == 4:
            peer = self._addr4_cache.get(packet[16:20], _MISS)
            if peer is _MISS:
                peer = self._allowed.lookup_dst(packet)
        else:
            peer = self._allowed.lookup_dst(packet)
        if peer is None:
            self.drops["no_route"] += 1
            return
        if peer.acl is not None:
            peer.acl.note_out(packet, now)
        kp = peer.keypairs.current
        if (peer.staged or kp is None or now - kp.created >= REJECT_AFTER_TIME
                or kp.send_counter >= REJECT_AFTER_MESSAGES):
            self._stage(peer, packet)
            self._send_staged(peer, now)
            return
        endpoint = peer.endpoint
        if endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        # Pad to a multiple of 16, capped at the MTU (wireguard-go calculatePaddingSize).
        n = len(packet)
        mtu = self.mtu
        last = n if n <= mtu else n % mtu
        padded = (last + 15) & ~15
        if padded > mtu:
            padded = mtu
        ctr = kp.send_counter
        kp.send_counter = ctr + 1
        msg = _transport_seal(kp.send_key, kp.header_prefix, ctr, packet, n + padded - last)
        self._out.append((msg, endpoint))
        peer.tx_bytes += len(msg)
        t = peer.timers
        t.send_keepalive = INF  # any authenticated packet sent
        if peer.persistent_keepalive:
            t.persistent_keepalive = now + peer.persistent_keepalive
        if t.new_handshake == INF:  # data sent: expect an answer within 15 s
            t.new_handshake = now + NEW_HANDSHAKE_TIMEOUT + self._jitter()
        if ctr >= REKEY_AFTER_MESSAGES or (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME):
            self._send_initiation(peer, now, False)

    def _stage(self, peer: Peer, packet: bytes) -> None:
        if len(peer.staged) == peer.staged.maxlen:
            self.drops["staged_overflow"] += 1  # deque drops the oldest
        peer.staged.append(packet)

    def _seal(self, peer: Peer, kp: Keypair, packet: bytes) -> None:
        if peer.endpoint is None:  # before sealing, as send_ip_packet does: no work or nonce spent on a drop
            self.drops["no_endpoint"] += 1
            return
        if packet:
            n = len(packet)
            mtu = self.mtu
            last = n if n <= mtu else n % mtu
            padded = min((last + 15) & ~15, mtu)
            if padded != last:
                packet = packet + bytes(padded - last)
        self._send_message(peer, kp.seal(packet))

    def _send_staged(self, peer: Peer, now: float) -> None:
        """wireguard-go SendStagedPackets: with a usable keypair send everything staged, else handshake."""
        kp = peer.keypairs.current
        if kp is None or now - kp.created >= REJECT_AFTER_TIME or kp.send_counter >= REJECT_AFTER_MESSAGES:
            self._send_initiation(peer, now, False)
            return
        if not peer.staged:
            return
        sent_data = False
        while peer.staged:
            packet = peer.staged.popleft()
            sent_data = sent_data or bool(packet)
            self._seal(peer, kp, packet)
        t = peer.timers
        t.any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        t.any_authenticated_packet_sent()
        if sent_data:
            t.data_sent(now, self._jitter)
        if kp.send_counter > REKEY_AFTER_MESSAGES or (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME):
            self._send_initiation(peer, now, False)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _jitter(self) -> float:
        # Drawn from a pool filled 64 at a time: in a ping-pong every data packet sent arms the
        # new-handshake timer, and one random_bytes call (a getrandom syscall) per packet shows.
        pool = self._jitter_pool
        if not pool:
            raw = self._random(128)
            pool.extend(int.from_bytes(raw[i:i + 2], "little") % REKEY_TIMEOUT_JITTER_MAX_MS
                        for i in range(0, 128, 2))
        return pool.pop() / 1000.0

    # ------------------------------------------------------------------ receive path

    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        n = len(data)
        if n < 32:
            kind = int.from_bytes(data[:4], "little") if n >= 4 else -1
        else:
            kind, index, counter = _TRANSPORT_HEADER.unpack_from(data)
            if kind == MSG_TRANSPORT:
                # Transport data: the hot path, kept inline.
                kp = self._keypairs_by_index.get(index)
                if kp is None:
                    self.drops["unknown_index"] += 1
                    return
                if now - kp.created >= REJECT_AFTER_TIME:
                    self.drops["expired_keypair"] += 1
                    return
                plain = _transport_open(kp.recv_key, data)
                if plain is None:
                    self.drops["decrypt"] += 1
                    return
                if not kp.replay.validate(counter):
                    self.drops["replay"] += 1
                    return
                self._after_transport(kp, plain, n, addr, now)
                return
        if kind == MSG_INITIATION or kind == MSG_RESPONSE:
            self._receive_handshake(data, kind, addr, now)
        elif kind == MSG_COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
        elif kind == -1:
            self.drops["short"] += 1
        else:
            self.drops["unknown_type"] += 1

    # DrivenCore: a datagram the driver already told apart as WireGuard. This core parses every datagram
    # as WireGuard anyway, so it is the same function (no extra call on the hot path).
    receive_wireguard = receive_datagram

    def _after_transport(self, kp: Keypair, plain: bytes, n: int, addr: object, now: float) -> None:
        """An authenticated, non-replayed transport packet: session, roaming and timer bookkeeping, then
        the inner packet checks (IP length trim, source address must route back to this peer)."""
        peer = kp.peer
        keypairs = peer.keypairs
        if kp is keypairs.next:
            self._confirm_next(peer, kp, now)
        if addr != peer.endpoint and peer.roaming:
            self._roam(peer, addr)
        peer.last_rx_addr = addr
        peer.rx_bytes += n
        t = peer.timers
        t.new_handshake = INF  # any authenticated packet received
        if peer.persistent_keepalive:
            t.persistent_keepalive = now + peer.persistent_keepalive
        # keepKeyFreshReceiving: an initiator whose key nears REJECT_AFTER_TIME tries once more.
        if not t.sent_lastminute_handshake:
            current = keypairs.current
            if current is not None and current.is_initiator and now - current.created > LAST_MINUTE_HANDSHAKE_AGE:
                t.sent_lastminute_handshake = True
                self._send_initiation(peer, now, False)
        if not plain:
            return  # keepalive
        if t.send_keepalive == INF:  # data received: answer within 10 s unless we send something
            t.send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            t.need_another_keepalive = True
        version = plain[0] >> 4
        size = len(plain)
        if version == 4:
            length = (plain[2] << 8) | plain[3] if size >= 20 else 0
            if length < 20 or length > size:
                self.drops["bad_inner_packet"] += 1
                return
            src_owner = self._addr4_cache.get(plain[12:16], _MISS)
            if src_owner is _MISS:
                src_owner = self._allowed.lookup_v4(plain[12:16])
        elif version == 6:
            length = 40 + ((plain[4] << 8) | plain[5]) if size >= 40 else size + 1
            if length > size:
                self.drops["bad_inner_packet"] += 1
                return
            src_owner = self._allowed.lookup_v6(plain[8:24])
        else:
            self.drops["bad_inner_packet"] += 1
            return
        if src_owner is not peer:
            self.drops["source_not_allowed"] += 1
            return
        if length != size:
            plain = plain[:length]
        if peer.acl is not None:  # after the source check: the filter trusts the inner source (issue 13)
            reason = peer.acl.check_in(plain, now)
            if reason is not None:
                self.drops[reason] += 1
                return
        self._tun.append(plain)

    def _roam(self, peer: Peer, addr: object) -> None:
        peer.endpoint = addr
        self._events.append(EndpointChanged(peer.public_key, addr))

    def _update_endpoint(self, peer: Peer, addr: object) -> None:
        peer.last_rx_addr = addr
        if peer.roaming and addr != peer.endpoint:
            self._roam(peer, addr)

    def _confirm_next(self, peer: Peer, kp: Keypair, now: float) -> None:
        dropped = peer.keypairs.confirm(kp)
        if dropped is None:
            return
        self._unindex(dropped)
        self._handshake_complete(peer, now)
        self._send_staged(peer, now)

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.timers.handshake_complete()
        peer.last_handshake_wall = now + self.wall_offset
        self._events.append(HandshakeCompleted(peer.public_key))

    def _unindex(self, keypairs: Iterable[Keypair]) -> None:
        for kp in keypairs:
            self._keypairs_by_index.pop(kp.local_index, None)

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._random(4), "little")
            if self.index_tag is not None:
                index = (index & 0xFFFF) | (self.index_tag << 16)
            if index not in self._keypairs_by_index and index not in self._handshakes_by_index:
                return index

    # ------------------------------------------------------------------ handshake

    def _receive_handshake(self, data: bytes, kind: int, addr: object, now: float) -> None:
        if kind == MSG_INITIATION:
            size, mac1_at, mac2_at = INITIATION_SIZE, INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET
        else:
            size, mac1_at, mac2_at = RESPONSE_SIZE, RESPONSE_MAC1_OFFSET, RESPONSE_MAC2_OFFSET
        if len(data) != size:
            self.drops["bad_size"] += 1
            return
        self._count_handshake_arrival(now)
        if not self._checker.check_mac1(data, mac1_at):
            self.drops["bad_mac1"] += 1
            return
        if now < self._under_load_until:
            if not self._checker.check_mac2(data, mac2_at, addr, now):
                receiver, nonce, enc = self._checker.create_reply(data, mac1_at, addr, now)
                self._out.append((_COOKIE_REPLY.pack(MSG_COOKIE_REPLY, receiver, nonce, enc), addr))
                self.drops["under_load_cookie_sent"] += 1
                return
            if not self._ratelimiter.allow(address_host(addr), now):
                self.drops["ratelimited"] += 1
                return
        if kind == MSG_INITIATION:
            self._consume_initiation(data, addr, now)
        else:
            self._consume_response(data, addr, now)

    def _consume_initiation(self, data: bytes, addr: object, now: float) -> None:
        _, sender, ephemeral, enc_static, enc_ts = _INITIATION.unpack_from(data)
        consumed = noise.consume_initiation(self.private_key, self.public_key, ephemeral, enc_static, enc_ts,
                                            self._static_static_of)
        if consumed is None:
            self.drops["handshake_auth"] += 1
            return
        peer = self.peers[consumed.remote_static]  # known: _static_static_of found it
        if consumed.payload <= peer.last_timestamp:
            self.drops["handshake_replay"] += 1
            return
        if now - peer.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
            self.drops["handshake_flood"] += 1
            return
        index = self._new_index()
        try:
            response = noise.create_response(consumed, crypto.clamp(self._random(32)), peer.preshared_key)
        except crypto.InvalidKey:
            self.drops["handshake_auth"] += 1
            return
        peer.last_timestamp = consumed.payload
        peer.last_initiation_consumed = now
        self._update_endpoint(peer, addr)
        t = peer.timers
        t.any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        t.any_authenticated_packet_received()
        # One handshake per peer: answering replaces any initiation of ours still in flight.
        self._clear_handshake(peer)
        t2, t1 = noise.transport_keys(response.chain_key)[::-1]
        kp = Keypair(t2, t1, index, sender, now, False, peer)
        self._unindex(peer.keypairs.install(kp))
        self._keypairs_by_index[index] = kp
        body = _RESPONSE.pack(MSG_RESPONSE, index, sender, response.ephemeral, response.encrypted_payload)
        msg = peer.cookie.add_macs(body, now)
        peer.last_sent_handshake = now
        self._send_message(peer, msg)
        t.session_derived(now)
        # The response is an authenticated packet sent too; its traversal hook already ran above.
        t.any_authenticated_packet_sent()

    def _static_static_of(self, remote_static: bytes) -> bytes | None:
        """noise.consume_initiation's lookup: the precomputed DH for a known peer, None otherwise."""
        peer = self.peers.get(remote_static)
        return None if peer is None else peer.static_static

    def _consume_response(self, data: bytes, addr: object, now: float) -> None:
        _, sender, receiver, ephemeral, enc_empty = _RESPONSE.unpack_from(data)
        peer = self._handshakes_by_index.get(receiver)
        if peer is None or peer.handshake_state is None:
            self.drops["unknown_index"] += 1
            return
        result = noise.consume_response(peer.handshake_state, self.private_key, ephemeral, enc_empty,
                                        peer.preshared_key)
        if result is None:
            self.drops["handshake_auth"] += 1
            return
        chain_key = result[0]
        self._clear_handshake(peer)
        t1, t2 = noise.transport_keys(chain_key)
        kp = Keypair(t1, t2, receiver, sender, now, True, peer)
        self._unindex(peer.keypairs.install(kp))
        self._keypairs_by_index[receiver] = kp
        self._update_endpoint(peer, addr)
        t = peer.timers
        t.any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        t.any_authenticated_packet_received()
        t.session_derived(now)
        self._handshake_complete(peer, now)
        self._send_keepalive(peer, now)  # staged packets, or a keepalive as key confirmation

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        if len(data) != COOKIE_REPLY_SIZE:
            self.drops["bad_size"] += 1
            return
        _, receiver, nonce, enc = _COOKIE_REPLY.unpack(data)
        peer = self._handshakes_by_index.get(receiver)
        if peer is None:
            kp = self._keypairs_by_index.get(receiver)
            peer = kp.peer if kp is not None else None
        if peer is None:
            self.drops["unknown_index"] += 1
            return
        if not peer.cookie.consume_reply(nonce, enc, now):
            self.drops["bad_cookie_reply"] += 1

    def _clear_handshake(self, peer: Peer) -> None:
        if peer.handshake_index is not None:
            self._handshakes_by_index.pop(peer.handshake_index, None)
        peer.handshake_state = None
        peer.handshake_index = None

    def _send_message(self, peer: Peer, msg: bytes) -> None:
        """Queue a finished message for the peer's endpoint; without one it is a no_endpoint drop."""
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        self._out.append((msg, peer.endpoint))
        peer.tx_bytes += len(msg)

    def _send_initiation(self, peer: Peer, now: float, is_retry: bool, min_interval: float = REKEY_TIMEOUT) -> None:
        t = peer.timers
        if not is_retry:
            t.handshake_attempts = 0
        if now - peer.last_sent_handshake < min_interval:
            return
        if self.private_key is None or peer.static_static is None:
            self.drops["no_key"] += 1
            return
        peer.last_sent_handshake = now
        self._clear_handshake(peer)
        index = self._new_index()
        init = noise.create_initiation(self.private_key, self.public_key, peer.public_key,
                                       crypto.clamp(self._random(32)), crypto.tai64n(now + self.wall_offset),
                                       static_static=peer.static_static)
        peer.handshake_state = init.state
        peer.handshake_index = index
        self._handshakes_by_index[index] = peer
        body = _INITIATION.pack(MSG_INITIATION, index, init.ephemeral, init.encrypted_static, init.encrypted_payload)
        self._send_message(peer, peer.cookie.add_macs(body, now))
        t.any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        t.any_authenticated_packet_sent()
        t.handshake_initiated(now, self._jitter)

    def initiate_handshake(self, peer: Peer, now: float) -> None:
        """Start a handshake now (subject to the 5 s rule); an addition to the API for shells and tests."""
        self._send_initiation(peer, now, False)

    def resend_handshake(self, peer: Peer, now: float) -> float | None:
        """The peer's path changed or just proved usable: if an initiation of ours is still unanswered,
        send a fresh one now instead of at its retransmit timer (up to 5 s + jitter away); the earlier
        ones most likely went where nothing listened. Returns None when no initiation is pending, `now`
        when one was sent, else the time from which a re-send is allowed (the last handshake message
        went out less than HANDSHAKE_RESEND_MIN ago): call again then. The attempt count is untouched
        (not a timer retry); the retransmit timer restarts from the re-send."""
        if peer.handshake_state is None or peer.timers.retransmit_handshake == INF:
            return None
        allowed = peer.last_sent_handshake + HANDSHAKE_RESEND_MIN
        if now < allowed:
            return allowed
        self._send_initiation(peer, now, True, HANDSHAKE_RESEND_MIN)
        return now if peer.last_sent_handshake == now else None

    # ------------------------------------------------------------------ timers

    def handle_timer(self, now: float) -> None:
        for peer in list(self.peers.values()):
            t = peer.timers
            if t.next_deadline() > now:
                continue
            if t.retransmit_handshake <= now:
                t.retransmit_handshake = INF
                self._retransmit_expired(peer, now)
            if t.send_keepalive <= now:
                t.send_keepalive = INF
                self._send_keepalive(peer, now)
                if t.need_another_keepalive:
                    t.need_another_keepalive = False
                    t.send_keepalive = now + KEEPALIVE_TIMEOUT
            if t.new_handshake <= now:
                t.new_handshake = INF
                self._send_initiation(peer, now, False)
            if t.zero_keys <= now:
                t.zero_keys = INF
                self._zero_sessions(peer)
                self._events.append(KeysZeroed(peer.public_key))
            if t.persistent_keepalive <= now:
                t.persistent_keepalive = INF
                if peer.persistent_keepalive:
                    self._send_keepalive(peer, now)

    def _retransmit_expired(self, peer: Peer, now: float) -> None:
        t = peer.timers
        if t.handshake_attempts > MAX_TIMER_HANDSHAKES:
            # Give up after 20 initiations (REKEY_ATTEMPT_TIME).
            t.send_keepalive = INF
            if peer.staged:
                self.drops["staged_handshake_failed"] += len(peer.staged)
                peer.staged.clear()
            if t.zero_keys == INF:
                t.zero_keys = now + ZERO_KEYS_AFTER
            self._events.append(HandshakeFailed(peer.public_key))
            return
        t.handshake_attempts += 1
        self._send_initiation(peer, now, True)

    def _zero_sessions(self, peer: Peer) -> None:
        """Erase keypairs, the handshake in flight and staged packets (wireguard-go ZeroAndFlushAll)."""
        self._unindex(peer.keypairs.clear())
        self._clear_handshake(peer)
        peer.staged.clear()

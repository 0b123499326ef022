"""Trio shells of the signal server: control (Noise IK + msgpack over TCP), UDP STUN + relay, TCP relay,
SQLite persistence, admin-change watcher and /metrics. The decisions live in the pure modules."""

from __future__ import annotations

import functools
import logging
import math
import os
import resource
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import trio

from meshwg.config.keys import key_to_base64
from meshwg.signaling import protocol as P
from meshwg.signaling import relay_wire as W
from meshwg.signaling.invite import join_hostport
from meshwg.signaling.noise import HandshakeError, Responder
from meshwg.io.dataplane import udp
from signal_server import metrics
from signal_server.conn_limits import Refusal, SourceLimits, relay_tcp_caps
from signal_server.directory import Directory, Node
from signal_server.invites import JoinRefused
from signal_server.lograte import RepeatLimiter, install_repeat_filter
from signal_server.punch import PunchCoordinator
from signal_server.ratelimit import KeyedLimiter, TokenBucket
from signal_server.relay import RelayCore
from signal_server.store import NodeRow, Store, wide_modes
from signal_server.stun_responder import WILDCARDS, StunResponder, StunSocket

log = logging.getLogger("signal")

MAX_SEAL_BLOB = 16 * 1024
RELAY_TCP_UNAUTH_BYTES = 4096  # a relay TCP connection without a session: a HELLO or two (~95 bytes each)


@dataclass
class ServerConfig:
    db: str
    control: list = field(default_factory=lambda: [("0.0.0.0", 7300)])
    udp: list = field(default_factory=lambda: [("0.0.0.0", 3478)])  # STUN + UDP relay ([] disables)
    # STUN-only alternate port on every udp address (RFC 5780 CHANGE-REQUEST): "auto" = main port + 1
    # (ephemeral when the main one is; skipped with a warning if taken), an int, or None (disabled).
    stun_alt_port: int | str | None = "auto"
    relay_tcp: list = field(default_factory=lambda: [("0.0.0.0", 7301)])  # [] disables
    metrics: list = field(default_factory=list)  # e.g. [("127.0.0.1", 9300)]
    advertise: str | None = None  # host put into invites/welcome when listening on a wildcard
    prefix4: str | None = None
    prefix6: str | None = None
    heartbeat: float = 10.0  # the node's heartbeat interval (told in the welcome)
    idle_timeout: float = 35.0  # a session with no frame for this long is closed
    handshake_timeout: float = 5.0
    send_timeout: float = 10.0  # a client that cannot take our bytes this long is closed
    coalesce: float = 0.05  # directory pushes at most this often...
    coalesce_per_node: float = 0.0002  # ...plus this much per connected node (0.2 s at 1000 nodes)...
    coalesce_max: float = 0.4  # ...but never slower than this
    max_unauthenticated: int = 512  # control connections not registered yet, all sources together...
    max_unauthenticated_per_source: int = 16  # ...and from one IPv4 address or IPv6 /64
    accept_rate: float = 10.0  # connections a second one source may open per listener, charged at accept...
    accept_burst: float = 40.0  # ...with this burst (a NATed site's nodes reconnecting after a restart)
    hello_timeout: float = 2.0  # the first control frame (HELLO) must come this soon (the rest: handshake_timeout)
    relay_tcp_max: int | None = None  # relay TCP connections in all; None: relay_tcp_fd_share of RLIMIT_NOFILE
    relay_tcp_max_per_source: int | None = None  # per IPv4 address or IPv6 /64; None: relay_tcp_max / 8 (>= 4)
    relay_tcp_fd_share: float = 0.25  # the other descriptors stay for the control listener and its sessions
    relay_hello_timeout: float = 3.0  # a relay TCP connection without a relay session this long is closed
    log_repeat_interval: float = 30.0  # the same log line (accept errors, ...) at most this often
    db_poll: float = 0.1
    control_enabled: bool = True  # False: `meshwg-signal relay` (relay + STUN only)
    synchronous: str = "NORMAL"  # SQLite: NORMAL survives kill -9; FULL also survives power loss
    init: bool = False  # create the database and a new server identity if `db` has none (`serve --init`)


@dataclass
class Bound:
    control: list = field(default_factory=list)
    udp: list = field(default_factory=list)
    stun_alt: list = field(default_factory=list)  # the alternate STUN ports (same order as udp)
    relay_tcp: list = field(default_factory=list)
    metrics: list = field(default_factory=list)


class Session:
    def __init__(self, key: bytes, node_id: int, stream, chan: P.SecureChannel) -> None:
        self.key = key
        self.node_id = node_id
        self.stream = stream
        self.chan = chan
        self.wake = trio.Event()
        self.queue: deque = deque()
        self.closing: str | None = None
        # Exists before the session's first await: a newer connection of the same key must be able to
        # end this one in any phase, also while its welcome or snapshot is still being sent.
        self.scope = trio.CancelScope()
        self.msg_bucket = TokenBucket(200.0, 400.0, time.monotonic())
        self.local_host = ""


class SignalServer:
    def __init__(self, config: ServerConfig) -> None:
        self.cfg = config
        # Raises StoreError (one line) for a database without an identity unless config.init.
        self.store = Store(config.db, synchronous=config.synchronous, init=config.init)
        self.server_sk = self.store.server_private_key()
        from meshwg.wg.crypto import dh_pub as public_key

        self.server_pk = public_key(self.server_sk)
        # The operator compares this with the key in invites: a wrong --db shows here first.
        log.info("%s server key %s (database %s)", "created a new" if self.store.created_identity else "using",
                 key_to_base64(self.server_pk), os.path.abspath(config.db))
        for name, mode in wide_modes(config.db):
            log.warning("%s is mode %04o: it holds the server's private key; chmod 600 it", name, mode)
        self.prefix4, self.prefix6 = self.store.prefixes(os.urandom, config.prefix4, config.prefix6)
        self.directory = Directory(mesh_nets=(self.prefix4, self.prefix6))
        self.punch = PunchCoordinator()
        self.relay = RelayCore(self.server_sk, os.urandom)
        self.sessions: dict[bytes, Session] = {}
        self.counters: Counter = Counter()
        # Failed handshakes/joins per source IP: an IP that used up its bucket is refused until it refills.
        self.failures = KeyedLimiter(5.0, 20.0, max_keys=50_000)
        self._db_lock = trio.Lock()
        self.bound = Bound()
        self._udp_socks: list[socket.socket] = []  # main ports: STUN + relay (relay dests index these)
        self._stun_socks: list[socket.socket] = []  # main then alternate ports, as the responder numbers them
        # Sockets on a wildcard address answer each node from the local address it wrote to (issue 17):
        # node (host, port) -> that address (meshwg.io.dataplane.udp, sticky source addresses).
        self._udp_sources: dict[tuple, tuple] = {}
        self._sticky_socks: set[socket.socket] = set()
        self.stun = StunResponder([])
        self.started = time.monotonic()
        self._dir_changed = trio.Event()
        self._reconcile(self.store.list_nodes())
        self._db_version = self.store.data_version()

    # --- helpers

    async def _db(self, fn, *args):
        async with self._db_lock:
            return await trio.to_thread.run_sync(fn, *args)

    def _failed(self, ip: str, now: float) -> None:
        self.failures.allow(ip, now)  # spends a token; the answer is moot, exhausted() does the refusing

    def _sync_relay_allowed(self) -> None:
        self.relay.set_allowed(self.directory.nodes.keys())

    def _wake_all(self) -> None:
        """The directory changed: the flusher will push it (coalesced) to every subscriber."""
        self._dir_changed.set()

    def gauges(self) -> dict:
        return {
            "nodes_registered": len(self.directory.nodes),
            "nodes_connected": len(self.sessions),
            "relay_sessions": len(self.relay.by_key),
            "relay_tcp_connections": self.relay_limits.active,
            "relay_tcp_connections_max": self.relay_limits.total,
            "unauthenticated_connections": self.control_limits.active,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }

    def render_metrics(self) -> str:
        return metrics.render(self.counters + self.relay.counters, self.gauges())

    # --- run

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            for sock in self._stun_socks or self._udp_socks:  # UDP sockets are ours; trio owns the listeners
                sock.close()

    def _setup_conn_limits(self) -> None:
        """Connection caps, from the config and the descriptor limit at start; repeated log lines limited."""
        cfg = self.cfg
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        total, per_source = relay_tcp_caps(soft, cfg.relay_tcp_fd_share, cfg.relay_tcp_max, cfg.relay_tcp_max_per_source)
        # A refused node retries when slots free up: within the HELLO deadline at the latest.
        retry = max(1, math.ceil(cfg.hello_timeout))
        self.control_limits = SourceLimits(cfg.max_unauthenticated, cfg.max_unauthenticated_per_source,
                                           cfg.accept_rate, cfg.accept_burst, cap_retry=retry)
        self.relay_limits = SourceLimits(total, per_source, cfg.accept_rate, cfg.accept_burst)
        self.log_repeat = RepeatLimiter(cfg.log_repeat_interval)
        # trio's accept loop logs a traceback per failed accept (10/s while descriptors are exhausted).
        install_repeat_filter("trio.serve_listeners", cfg.log_repeat_interval)

    async def _run(self, task_status) -> None:
        cfg = self.cfg
        self._setup_conn_limits()
        async with trio.open_nursery() as nursery:
            if cfg.control_enabled:
                for host, port in cfg.control:
                    ls = await trio.open_tcp_listeners(port, host=host)
                    self.bound.control += [l.socket.getsockname()[:2] for l in ls]
                    nursery.start_soon(trio.serve_listeners, self._handle_control, ls)
            for host, port in cfg.udp:
                sock = _udp_socket(host, port)
                self._udp_socks.append(sock)
                self.bound.udp.append(sock.getsockname()[:2])
                nursery.start_soon(self._udp_loop, len(self._udp_socks) - 1)
            alts = self._bind_stun_alt()
            self._stun_socks = self._udp_socks + alts
            self.bound.stun_alt = [s.getsockname()[:2] for s in alts]
            self.stun = StunResponder([StunSocket(a, False) for a in self.bound.udp]
                                      + [StunSocket(a, True) for a in self.bound.stun_alt])
            for i in range(len(self._udp_socks), len(self._stun_socks)):
                nursery.start_soon(self._stun_alt_loop, i)
            for host, port in cfg.relay_tcp:
                ls = await trio.open_tcp_listeners(port, host=host)
                self.bound.relay_tcp += [l.socket.getsockname()[:2] for l in ls]
                nursery.start_soon(trio.serve_listeners, self._handle_relay_tcp, ls)
            for host, port in cfg.metrics:
                ls = await trio.open_tcp_listeners(port, host=host)
                self.bound.metrics += [l.socket.getsockname()[:2] for l in ls]
                nursery.start_soon(metrics.serve_metrics, ls, self.render_metrics)
            self._publish_addresses()
            nursery.start_soon(self._housekeeping)
            nursery.start_soon(self._flusher)
            log.info(
                "serving: control %s, udp (stun+relay) %s, stun alternate %s, relay tcp %s, metrics %s; server key %s",
                self.bound.control, self.bound.udp, self.bound.stun_alt, self.bound.relay_tcp, self.bound.metrics,
                key_to_base64(self.server_pk),
            )
            task_status.started(self.bound)

    def _bind_stun_alt(self) -> list[socket.socket]:
        """The alternate STUN port on every udp address: all or none, so that a client told an
        OTHER-ADDRESS can count on both changes (a missing socket would fake a filtering NAT)."""
        want = self.cfg.stun_alt_port
        if want is None or not self._udp_socks:
            return []
        socks: list[socket.socket] = []
        try:
            for sock in self._udp_socks:
                host, port = sock.getsockname()[:2]
                alt = (port + 1 if port else 0) if want == "auto" else int(want)
                if alt > 65535:
                    raise OSError(f"no port above {port} for the alternate STUN port")
                socks.append(_udp_socket(host, alt))
        except OSError as exc:
            for s in socks:
                s.close()
            if want != "auto":
                raise
            log.warning("no alternate STUN port (%s): NAT filtering tests (CHANGE-REQUEST) unavailable", exc)
            return []
        return socks

    def _publish_addresses(self) -> None:
        """Let the admin CLI build invites and find /metrics without being told the ports."""
        import json

        ctl = _advertised(self.bound.control, self.cfg.advertise)
        self.store.meta_set("control_addrs", json.dumps(ctl))
        self.store.meta_set("metrics_addrs", json.dumps([join_hostport(h, p) for h, p in self.bound.metrics]))
        self._db_version = self.store.data_version()

    async def _housekeeping(self) -> None:
        last_expiry = 0.0
        while True:
            await trio.sleep(self.cfg.db_poll)
            try:
                version = await self._db(self.store.data_version)
                if version != self._db_version:
                    self._db_version = version
                    rows = await self._db(self.store.list_nodes)
                    self._reconcile(rows)
            except Exception:  # a locked/busy DB must not kill the server; retry next tick
                log.exception("reading admin changes failed; will retry")
                self.counters["db_errors"] += 1
            now = time.monotonic()
            if now - last_expiry >= 1.0:
                last_expiry = now
                for key in self.directory.expired(time.time()):
                    self._drop_node(key, "expired")
                self.relay.expire(now)

    def _reconcile(self, rows: list[NodeRow]) -> None:
        """Apply admin changes made by other processes (remove, expire, rename)."""
        wall = time.time()
        by_key = {r.key: r for r in rows}
        for key in list(self.directory.nodes):
            row = by_key.get(key)
            if row is None:
                self._drop_node(key, "removed")
            elif not row.live(wall):
                self._drop_node(key, "expired")
            else:
                self.directory.update(key, name=row.name, expires=row.expires)
        for key, row in by_key.items():
            if key not in self.directory.nodes and row.live(wall):
                self.directory.put(_node_from_row(row))
        self._sync_relay_allowed()
        self._wake_all()

    def _drop_node(self, key: bytes, reason: str) -> None:
        self.directory.remove(key)
        self.relay.drop_key(key)
        self.relay.allowed.discard(key)
        self.counters[f"nodes_{reason}"] += 1
        s = self.sessions.get(key)
        if s is not None:
            s.queue.append({"type": P.T_GONE, "reason": reason})
            s.closing = reason
            s.wake.set()
        log.info("node %s %s; peers notified", key_to_base64(key), reason)
        self._wake_all()

    # --- control connections

    async def _handle_control(self, stream) -> None:
        self.counters["control_connections"] += 1
        try:
            peer_ip = stream.socket.getpeername()[0]
            local_host = stream.socket.getsockname()[0]
        except OSError:
            await stream.aclose()
            return
        now = time.monotonic()
        # Charged at accept, before any work: caps per source and in all, an accept rate per source, and
        # the failure budget of the source.
        if self.failures.exhausted(peer_ip, now):
            refusal = Refusal("failures", 1)
        else:
            refusal = self.control_limits.admit(peer_ip, now)
        if refusal is not None:
            self._refuse_busy(stream, refusal)
            await stream.aclose()
            return
        session = None
        try:
            try:
                session = await self._authenticate(stream, peer_ip, trio.current_time() + self.cfg.handshake_timeout)
            except trio.TooSlowError:
                self.counters["control_handshake_timeout"] += 1
                self._failed(peer_ip, time.monotonic())
            finally:
                self.control_limits.release(peer_ip)
            if session is not None:
                session.local_host = local_host
                await self._run_session(session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
            self.counters["control_io_errors"] += 1
        except Exception:  # a bug in one connection's handling must not take the server down
            self.log_repeat.log(log, logging.ERROR, "control_internal", time.monotonic(),
                                "control connection failed", exc_info=True)
            self.counters["control_internal_errors"] += 1
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _refuse_busy(self, stream, refusal: Refusal) -> None:
        """Counts the refusal; tells the client when to retry where that costs nothing (no waiting on it)."""
        self.counters["control_refused_busy"] += 1  # every refusal; the reason in its own counter
        self.counters[f"control_refused_{refusal.reason}"] += 1
        _send_nowait(stream, P.busy_frame(refusal.retry_after))

    async def _read_frames(self, stream, decoder: P.FrameDecoder) -> bytes | None:
        """The one frame the client sends first; None for junk, b"" for a close before any byte."""
        silent = True
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return b"" if silent else None
            silent = False
            frames = decoder.feed_untrusted(data)
            if decoder.error:
                return None
            if frames:
                if len(frames) > 1 or decoder.buffered:
                    return None  # the client must wait for our answer; pipelining here is junk
                return frames[0]

    async def _authenticate(self, stream, peer_ip: str, deadline: float) -> Session | None:
        """Handshake + register. The deadline bounds the client's part only, not our DB queue under load."""
        now = time.monotonic()
        dec = P.FrameDecoder(512)
        # The HELLO comes at once from a real node; a connection that holds its slot in silence is let go
        # early (the handshake and the registration keep the whole deadline).
        with trio.move_on_at(min(deadline, trio.current_time() + self.cfg.hello_timeout)) as first:
            body = await self._read_frames(stream, dec)
        if first.cancelled_caught:
            self.counters["control_hello_timeout"] += 1
            raise trio.TooSlowError
        if body == b"":
            # A health check, a port scan, a node's own aborted attempt: it cost us one accept, already
            # charged. Counted as a failure it would let one host behind a shared address (an office
            # NAT, a load balancer) lock every node there out.
            self.counters["control_closed_silent"] += 1
            return None
        if body is None or not body.startswith(P.HELLO_MAGIC):
            self.counters["control_bad_hello"] += 1
            self._failed(peer_ip, now)
            return None
        responder = Responder(self.server_sk, os.urandom)
        try:
            client_key, _ = responder.read_message1_untrusted(body[len(P.HELLO_MAGIC):])
        except HandshakeError:
            self.counters["control_handshake_failed"] += 1
            self._failed(peer_ip, now)
            _send_nowait(stream, P.key_refused_frame())  # "not my key": a hint for the node's operator
            return None
        with trio.fail_at(deadline):
            await stream.send_all(P.frame(responder.write_message2(P.pack({"type": "hello", "v": P.PROTO_VERSION}))))
        chan = P.SecureChannel(responder.send, responder.recv, P.MAX_CLIENT_FRAME)
        # The first transport message must be a register.
        msg = None
        while msg is None:
            with trio.fail_at(deadline):
                data = await stream.receive_some(65536)
            if not data:
                return None
            msgs = chan.feed_untrusted(data)
            if chan.error or (msgs and msgs[0].get("type") != P.T_REGISTER):
                self.counters["control_bad_register"] += 1
                self._failed(peer_ip, now)
                return None
            msg = msgs[0] if msgs else None
        invite_id = msg.get("invite_id")
        secret = msg.get("secret")
        name = msg.get("name")
        if not (invite_id is None or isinstance(invite_id, str)) or not (secret is None or isinstance(secret, bytes)):
            invite_id = secret = None
        if not isinstance(name, str):
            name = None
        cands = P.candidates_untrusted(msg.get("candidates", []))
        try:
            row, created = await self._db(
                self.store.join, client_key, invite_id, secret, name, time.time(), self.prefix4, self.prefix6
            )
        except JoinRefused as exc:
            self.counters[f"join_refused_{exc.code}"] += 1
            self._failed(peer_ip, now)
            log.info("join refused for %s from %s: %s", key_to_base64(client_key), peer_ip, exc.message)
            with trio.move_on_after(self.cfg.send_timeout):
                await stream.send_all(chan.encode({"type": P.T_ERROR, "code": exc.code, "message": exc.message}))
            return None
        self.counters["joins_new" if created else "joins_returning"] += 1
        if created:
            log.info("node %s joined as %s (%s, %s)", key_to_base64(client_key), row.name, row.ipv4, row.ipv6)
        s = Session(client_key, row.node_id, stream, chan)
        s.initial_candidates = self._reported(cands or [])
        s.row = row
        return s

    def _welcome(self, s: Session) -> dict:
        host = self.cfg.advertise or s.local_host  # a wildcard bind is reached where this client reached us
        udp = _advertised(self.bound.udp, host)
        row = s.row
        return {
            "type": P.T_WELCOME, "proto": P.PROTO_VERSION, "node_id": row.node_id, "name": row.name,
            "ipv4": row.ipv4, "ipv6": row.ipv6, "prefix4": str(self.prefix4), "prefix6": str(self.prefix6),
            "stun": udp, "relay_udp": udp, "relay_tcp": _advertised(self.bound.relay_tcp, host),
            "heartbeat": self.cfg.heartbeat, "server_key": self.server_pk,
        }

    async def _run_session(self, s: Session) -> None:
        old = self.sessions.get(s.key)
        if old is not None:  # the newest connection of a key wins (a reconnect after a silent drop)
            old.closing = "replaced"
            # Also while the old one is still sending its welcome/snapshot: left running, it would later
            # subscribe (wiping this session's pending directory changes) and publish its stale
            # candidates over ours.
            old.scope.cancel()
        self.sessions[s.key] = s
        node = self.directory.nodes.get(s.key)
        if node is None:
            node = _node_from_row(s.row)
            self.directory.put(node)
            self.relay.allowed.add(s.key)
        try:
            with s.scope:
                with trio.fail_after(self.cfg.send_timeout):
                    await s.stream.send_all(s.chan.encode(self._welcome(s)))
                snapshot = self.directory.subscribe(s.key)
                await self._send_dir_full(s, snapshot)
                self.directory.update(s.key, online=True, candidates=s.initial_candidates)
                self._wake_all()
                async with trio.open_nursery() as n:
                    n.start_soon(self._guard, self._reader, s, s.scope)
                    n.start_soon(self._guard, self._writer, s, s.scope)
        finally:
            if self.sessions.get(s.key) is s:  # a replaced session must not touch its successor's state
                self.directory.unsubscribe(s.key)
                del self.sessions[s.key]
                if self.directory.update(s.key, online=False, candidates=[], observed=[]):
                    self._wake_all()
                with trio.CancelScope(shield=True):
                    try:
                        await self._db(self.store.touch, s.key, time.time())
                    except Exception:
                        self.counters["db_errors"] += 1

    async def _send_dir_full(self, s: Session, entries: list[bytes]) -> None:
        chunks = [entries[i : i + P.DIR_CHUNK] for i in range(0, len(entries), P.DIR_CHUNK)] or [[]]
        for i, chunk in enumerate(chunks):
            msg = {"type": P.T_DIR_FULL, "peers": chunk, "first": i == 0, "last": i == len(chunks) - 1}
            with trio.fail_after(self.cfg.send_timeout):
                await s.stream.send_all(s.chan.encode(msg))

    async def _guard(self, fn, s: Session, scope: trio.CancelScope) -> None:
        """One session's I/O failure ends that session only."""
        try:
            await fn(s, scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.counters["control_io_errors"] += 1
        scope.cancel()

    async def _reader(self, s: Session, scope: trio.CancelScope) -> None:
        while True:
            with trio.move_on_after(self.cfg.idle_timeout) as idle:
                data = await s.stream.receive_some(65536)
            if idle.cancelled_caught:
                self.counters["control_idle_timeout"] += 1
                break
            if not data:
                break
            msgs = s.chan.feed_untrusted(data)
            now = time.monotonic()
            for m in msgs:
                if not s.msg_bucket.take(now):
                    self.counters["control_closed_flood"] += 1
                    scope.cancel()
                    return
                self._on_message(s, m, now)
            if s.chan.error:
                self.counters[f"control_closed_{s.chan.error}"] += 1
                break
            if s.closing:
                return
        scope.cancel()

    def _enqueue(self, s: Session, msg: dict) -> None:
        if len(s.queue) >= 256:  # a node that does not read its control messages loses the oldest
            self.counters["control_queue_overflow"] += 1
            s.queue.popleft()
        s.queue.append(msg)
        s.wake.set()

    def _reported(self, cands: list) -> list:
        """What a node may say about its own candidates (Directory.reported); the rest is counted."""
        kept, refused = self.directory.reported(cands)
        if refused:
            self.counters["control_candidates_refused"] += refused
        return kept

    def _on_message(self, s: Session, m: dict, now: float) -> None:
        self.counters["control_messages"] += 1
        handler = self._HANDLERS.get(m["type"])  # the codec guarantees a str type
        if handler is None:
            self.counters["control_unknown_type"] += 1
            return
        handler(self, s, m, now)

    def _on_heartbeat(self, s: Session, m: dict, now: float) -> None:
        self._enqueue(s, {"type": P.T_HEARTBEAT_ACK, "seq": m.get("seq", 0)})

    def _on_candidates(self, s: Session, m: dict, now: float) -> None:
        cands = P.candidates_untrusted(m.get("candidates"))
        if cands is None:
            self.counters["control_bad_candidates"] += 1
            return
        if self.directory.update(s.key, candidates=self._reported(cands)):
            self._wake_all()

    def _on_punch_request(self, s: Session, m: dict, now: float) -> None:
        peer = m.get("peer")
        if not isinstance(peer, bytes) or len(peer) != 32:
            self.counters["control_bad_punch"] += 1
            return
        out, err = self.punch.plan(self.directory, s.key, peer, now)
        if err:
            self.counters[f"punch_{err}"] += 1
            self._enqueue(s, {"type": "punch_fail", "peer": peer, "reason": err})
        for key, msg in out:
            target = self.sessions.get(key)
            if target is not None:
                self._enqueue(target, msg)
        if out:
            self.counters["punches"] += 1

    def _on_seal_send(self, s: Session, m: dict, now: float) -> None:
        to, blob = m.get("to"), m.get("blob")
        if not isinstance(to, bytes) or not isinstance(blob, bytes) or len(blob) > MAX_SEAL_BLOB:
            self.counters["control_bad_sealed"] += 1
            return
        target = self.sessions.get(to)
        if target is None:
            self.counters["sealed_peer_offline"] += 1
            self._enqueue(s, {"type": "seal_fail", "to": to, "reason": "peer_offline"})
            return
        self.counters["sealed_forwarded"] += 1
        self._enqueue(target, {"type": P.T_SEALED, "from": s.key, "blob": blob})

    # A message type a node may send on an open session -> its handler; anything else is counted and dropped.
    _HANDLERS = {
        P.T_HEARTBEAT: _on_heartbeat,
        P.T_CANDIDATES: _on_candidates,
        P.T_PUNCH_REQUEST: _on_punch_request,
        P.T_SEAL_SEND: _on_seal_send,
    }

    def _coalesce_window(self) -> float:
        """Directory flush interval per session: grows with the mesh so total frames/s stay bounded
        (N sessions x 1/window), capped so an endpoint change still reaches everyone well within 1 s."""
        return min(self.cfg.coalesce_max, max(self.cfg.coalesce, len(self.sessions) * self.cfg.coalesce_per_node))

    async def _flusher(self) -> None:
        """Wakes the writers of sessions with pending directory changes, at most once per window:
        one change goes out at once, a burst (1000 joins) merges into few frames per session."""
        while True:
            await self._dir_changed.wait()
            self._dir_changed = trio.Event()
            for sess in list(self.sessions.values()):
                if self.directory.has_pending(sess.key):
                    sess.wake.set()
            await trio.sleep(self._coalesce_window())

    async def _writer(self, s: Session, scope: trio.CancelScope) -> None:
        while True:
            await s.wake.wait()
            s.wake = trio.Event()
            out = []
            while s.queue:  # control messages (punch, sealed, acks, gone) go out at once
                out.append(s.chan.encode(s.queue.popleft()))
            if not s.closing:
                ups, rems = self.directory.take_pending(s.key)
                for i in range(0, max(len(ups), 1), P.DIR_CHUNK):
                    chunk = ups[i : i + P.DIR_CHUNK]
                    if chunk or (i == 0 and rems):
                        out.append(s.chan.encode(
                            {"type": P.T_DIR_UPDATE, "upsert": chunk, "remove": rems if i == 0 else []}))
            if out:
                try:
                    with trio.fail_after(self.cfg.send_timeout):
                        await s.stream.send_all(b"".join(out))
                except trio.TooSlowError:
                    self.counters["control_closed_slow_client"] += 1
                    scope.cancel()
                    return
                self.counters["control_frames_sent"] += len(out)
            if s.closing:
                scope.cancel()
                return

    # --- UDP: STUN responder + relay

    async def _recv_loop(self, idx: int, sock, batch: int, bufsize: int, handle, after_batch=None) -> None:
        """Calls handle(idx, data, addr, now, wall) per datagram; the clocks are read once per batch.
        A wildcard socket (pktinfo on) remembers where each source wrote to, for _udp_send."""
        if udp.pktinfo_enabled(sock):
            self._sticky_socks.add(sock)
            recvfrom = functools.partial(udp.recvfrom_sticky, sock, bufsize, self._udp_sources)
        else:
            recvfrom = functools.partial(sock.recvfrom, bufsize)
        while True:
            await trio.lowlevel.wait_readable(sock)
            # Drain without paying the scheduler per datagram (README, "How it is built": hot path).
            now, wall = time.monotonic(), time.time()
            for _ in range(batch):
                try:
                    data, addr = recvfrom()
                except BlockingIOError:
                    break
                except OSError:
                    self.counters["udp_recv_errors"] += 1
                    continue
                handle(idx, data, addr[:2], now, wall)
            if after_batch is not None:
                after_batch()
            await trio.lowlevel.checkpoint()

    async def _udp_loop(self, idx: int) -> None:
        await self._recv_loop(idx, self._udp_socks[idx], 512, 65535, self._on_udp, self._publish_observed)

    async def _stun_alt_loop(self, idx: int) -> None:
        """An alternate STUN port: STUN only (the relay lives on the main ports)."""
        await self._recv_loop(idx, self._stun_socks[idx], 64, 2048,
                              lambda i, data, addr, now, _wall: self._on_stun(i, data, addr, now))

    def _on_udp(self, idx: int, data: bytes, addr, now: float, wall: float) -> None:
        if W.is_relay_untrusted(data):
            for frame, dest in self.relay.handle_untrusted(data, (idx, addr), now, wall, observed=addr):
                self._relay_send(frame, dest)
            return
        self._on_stun(idx, data, addr, now)

    def _on_stun(self, idx: int, data: bytes, addr, now: float) -> None:
        reply, counters = self.stun.handle_untrusted(idx, data, addr, now)
        for name in counters:
            self.counters[name] += 1
        if reply is not None:
            self._udp_send(self._stun_socks[reply.sock], reply.data, addr)

    def _publish_observed(self) -> None:
        """Relay sources seen in the batch become the nodes' "observed" candidates."""
        if self.relay.observed_events:
            changed = False
            for key, obs in self.relay.pop_observed():
                # update() is False for a key no longer in the directory (removed meanwhile)
                changed |= self.directory.set_observed(key, obs)
            if changed:
                self._wake_all()

    def _udp_send(self, sock, data: bytes, addr) -> None:
        try:
            udp.send_sticky(sock, [data], [], addr, self._udp_sources if sock in self._sticky_socks else None)
        except (BlockingIOError, OSError):
            self.counters["udp_send_errors"] += 1

    def _relay_send(self, frame: bytes, dest) -> None:
        if isinstance(dest, tuple):
            idx, addr = dest
            self._udp_send(self._udp_socks[idx], frame, addr)
        else:
            try:
                dest.send_nowait(frame)
            except trio.WouldBlock:
                self.counters["relay_tcp_queue_full"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # --- TCP relay fallback

    async def _handle_relay_tcp(self, stream) -> None:
        try:
            peer_ip = stream.socket.getpeername()[0]
        except OSError:
            await stream.aclose()
            return
        # Caps in all (a share of the descriptors) and per source, an accept rate per source: at accept.
        refusal = self.relay_limits.admit(peer_ip, time.monotonic())
        if refusal is not None:
            # Closed at once, no answer: a node's relay client reconnects later on its own.
            self.counters["relay_tcp_refused"] += 1
            self.counters[f"relay_tcp_refused_{refusal.reason}"] += 1
            await stream.aclose()
            return
        # The send channel is this connection's relay destination (hashed by identity, has send_nowait).
        conn, recv_ch = trio.open_memory_channel(512)
        try:
            async with trio.open_nursery() as n:
                async def writer():
                    async for frame in recv_ch:
                        with trio.fail_after(self.cfg.send_timeout):
                            await stream.send_all(W.tcp_frame(frame))
                n.start_soon(writer)
                await self._relay_tcp_reader(stream, conn)
                n.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            self.counters["relay_tcp_errors"] += 1
        finally:
            self.relay_limits.release(peer_ip)
            self.relay.drop_dest(conn)
            with trio.CancelScope(shield=True):
                await stream.aclose()


    async def _relay_tcp_reader(self, stream, conn) -> None:
        """Feeds one TCP connection's frames to the relay until it closes or idles. Until the relay grants
        it a session (HELLO_OK), a connection gets relay_hello_timeout, HELLO frames only and a few KB:
        an idle or junk connection would otherwise hold a descriptor for SESSION_TTL."""
        dec = W.TcpFrameDecoder()
        hello_by = trio.current_time() + self.cfg.relay_hello_timeout
        unauth_bytes, authed = 0, False
        while True:
            with trio.move_on_at(trio.current_time() + W.SESSION_TTL if authed else hello_by) as idle:
                data = await stream.receive_some(65536 if authed else 4096)
            if idle.cancelled_caught:
                self.counters["relay_tcp_idle_timeout" if authed else "relay_tcp_hello_timeout"] += 1
                return
            if not data:
                return
            unauth_bytes += 0 if authed else len(data)
            if unauth_bytes > RELAY_TCP_UNAUTH_BYTES:
                self.counters["relay_tcp_no_hello"] += 1
                return
            now, wall = time.monotonic(), time.time()
            for frame in dec.feed(data):
                if not authed and W.frame_type_untrusted(frame) != W.T_HELLO:
                    self.counters["relay_tcp_no_hello"] += 1
                    return
                for out, dest in self.relay.handle_untrusted(frame, conn, now, wall):
                    authed = authed or (dest is conn and W.frame_type_untrusted(out) == W.T_HELLO_OK)
                    self._relay_send(out, dest)


def _send_nowait(stream, data: bytes) -> None:
    """Best-effort send of a few bytes that never waits on the peer (a refusal must cost us nothing)."""
    try:
        os.write(stream.socket.fileno(), data)  # trio keeps the socket non-blocking
    except OSError:
        pass


def _advertised(addrs, host: str | None) -> list[str]:
    """host:port texts to hand out for bound addresses; a wildcard bind shows `host` instead (when set)."""
    return [join_hostport((host or h) if h in WILDCARDS else h, p) for h, p in addrs]


def _node_from_row(row: NodeRow) -> Node:
    return Node(row.node_id, row.key, row.name, row.ipv4, row.ipv6, expires=row.expires, tag=row.tag)


def _udp_socket(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if host in WILDCARDS:
        udp.enable_pktinfo(sock)  # answer from the address each node wrote to (_udp_send)
    sock.bind((host, port))
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    return sock

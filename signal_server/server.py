"""The signal server, composed: one trio shell per listener (control_listener: the control channel;
relay_udp: STUN + UDP relay and the alternate STUN ports; relay_tcp: the relay's TCP fallback; metrics)
around the pure cores (control_core, relay, stun_responder, directory), plus the follower of the store's
change feed. The decisions live in the pure modules; apply() carries out the control core's effects."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field

import trio

from meshwg import sdnotify
from meshwg.config.keys import key_to_base64
from meshwg.signaling.invite import join_hostport
from signal_server import admin, admin_socket, local_routes, metrics, multi_server
from signal_server import policy as acl_policy
from signal_server import service_notify
from signal_server import store_api as api
from signal_server.conn_limits import SourceLimits, relay_tcp_caps
from signal_server.control_core import (DIR_CHANGED, PLAIN_CHANGED, AdvertiseRoutes, Allow, ControlCore, Drop, Leave,
                                        Log, Send)
from signal_server.control_listener import ControlListener, Session, advertised
from signal_server.live_state import SharedDirectory
from signal_server.lograte import RepeatLimiter, install_repeat_filter
from signal_server.plain_ingress import PlainIngress
from signal_server.ratelimit import KeyedLimiter
from signal_server.relay import RelayCore, limit_kwargs
from signal_server.relay_tcp import RelayTcp
from signal_server.relay_udp import RelayUdp
from signal_server.regions import Regions
from signal_server.store import wide_modes
from signal_server.stun_responder import WILDCARDS

__all__ = ["Bound", "ServerConfig", "Session", "SignalServer"]

log = logging.getLogger("signal")
DB_RETRY = 0.5  # s between retries of a write that failed (the database is down or locked)


@dataclass
class ServerConfig:
    db: str
    control: list = field(default_factory=lambda: [("0.0.0.0", 7300)])
    udp: list = field(default_factory=lambda: [("0.0.0.0", 3478)])  # STUN + UDP relay ([] disables)
    # STUN-only alternate port on every udp address (RFC 5780 CHANGE-REQUEST): "auto" = main port + 1
    # (ephemeral when the main one is; skipped with a warning if taken), an int, or None (disabled).
    stun_alt_port: int | str | None = "auto"
    relay_tcp: list = field(default_factory=lambda: [("0.0.0.0", 7301)])  # [] disables
    # The plain-WireGuard port: phones with a stock WireGuard app reach their target nodes through it (None disables)
    plain_udp: tuple | None = ("0.0.0.0", 51820)
    # False (the default address): a port taken (the host's own WireGuard) is a warning and no plain port;
    # True (asked for): it is an error, as for the other listeners.
    plain_udp_strict: bool = False
    metrics: list = field(default_factory=list)  # e.g. [("127.0.0.1", 9300)]
    advertise: str | None = None  # host put into invites/welcome when listening on a wildcard
    prefix4: str | None = None
    prefix6: str | None = None
    heartbeat: float = 10.0  # the node's heartbeat interval (told in the welcome)
    dns_domain: str = "mesh.internal"  # nodes answer NAME.<this> (meshwg.mesh.dns_names); "" : names off
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
    relay_node_rate: float = 400.0  # Mbit/s relayed per node (issue 16; relay.limit_kwargs)
    relay_node_pps: float | None = None  # packets/s relayed per node; None: derived from relay_node_rate
    relay_total_rate: float = 0.0  # Mbit/s relayed in all; 0: no limit
    log_repeat_interval: float = 30.0  # the same log line (accept errors, ...) at most this often
    routes_interval: float = 0.05  # node advertisements are written at most this often (a burst merges)
    # How often the change feed is checked for other processes' writes (an admin CLI with no server socket, another
    # server): within 1 s of the write; 2 checks a second, not 10 (issue 15: admin changes through the socket apply at once).
    db_poll: float = 0.5
    control_enabled: bool = True  # False: `meshwg-signal relay` (relay + STUN only)
    synchronous: str = "NORMAL"  # SQLite: NORMAL survives kill -9; FULL also survives power loss
    init: bool = False  # create the database and a new server identity if `db` has none (`serve --init`)
    # The access policy file (issue 13; policy.py): None = everything allowed. Loaded at start (a bad one is
    # fatal), reloaded when it changes (checked every db_poll) or on SIGHUP (a bad one keeps the previous).
    policy: str | None = None
    stop_on_sigterm: bool = False  # `serve`/`relay`: SIGTERM ends the sessions (their last_seen written), logs, exits 0
    # The admin socket (admin_socket.py) the CLI's admin commands use while we run; None: none (`serve` sets it).
    admin_socket: str | None = None
    # Relays in regions (issue 14.3, regions.py): this server's relay's region and the regional relays
    # [(region, [udp (host, port)], [tcp (host, port)...])]; none: one relay, the welcome as before.
    region: str = "main"
    relays: list = field(default_factory=list)


def host_routes() -> list[tuple[str, str]]:
    """(destination, interface) of the host's routes in every table (Tailscale keeps its own in table 52):
    `ip -j route`, else /proc/net/route (IPv4 only); [] when neither can be read."""
    routes = []
    try:
        for family in ("-4", "-6"):
            r = subprocess.run(["ip", family, "-j", "route", "show", "table", "all"], capture_output=True,
                               text=True, timeout=5, check=True)  # an `ip` without -j fails: /proc instead
            routes += local_routes.parse_ip_json(r.stdout)
        return routes
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/net/route") as f:
            return local_routes.parse_proc_route(f.read())
    except OSError:
        return []


def host_addresses() -> list[tuple[str, str]]:
    """(address, interface) of the host's addresses (`ip -j address show`); [] when it cannot be read."""
    try:
        r = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return local_routes.parse_ip_addresses(r.stdout)


@dataclass
class Bound:
    control: list = field(default_factory=list)
    udp: list = field(default_factory=list)
    stun_alt: list = field(default_factory=list)  # the alternate STUN ports (same order as udp)
    relay_tcp: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    plain: list = field(default_factory=list)  # the plain-WireGuard port ([] when disabled)


def _addrs(addrs) -> str:
    """Bound addresses for a log line: host:port or [v6]:port, space-separated; "none"."""
    return " ".join(join_hostport(h, p) for h, p in addrs) or "none"


class SignalServer:
    def __init__(self, config: ServerConfig) -> None:
        self.cfg = config
        # Raises StoreError (one line) for a database without an identity unless config.init.
        self.store = api.open_store(config.db, synchronous=config.synchronous, init=config.init)
        self.server_sk = self.store.server_private_key()
        from meshwg.wg.crypto import dh_pub as public_key

        self.server_pk = public_key(self.server_sk)
        self.regions = Regions(self.server_sk, config.region, config.relays)
        # The operator compares this with the key in invites: a wrong --db shows here first.
        log.info("%s server key %s (database %s)", "created a new" if self.store.created_identity else "using",
                 key_to_base64(self.server_pk), api.db_label(config.db))
        for name, mode in wide_modes(config.db):
            log.warning("%s is mode %04o: it holds the server's private key; chmod 600 it", name, mode)
        self.prefix4, self.prefix6 = self.store.prefixes(os.urandom, config.prefix4, config.prefix6)
        self.directory = SharedDirectory(mesh_nets=(self.prefix4, self.prefix6))
        self.multi = None  # several servers on this database (multi_server.py), set below
        self.plain = PlainIngress()
        self.relay = RelayCore(self.server_sk, os.urandom, plain=self.plain, **limit_kwargs(
            config.relay_node_rate, config.relay_node_pps, config.relay_total_rate))
        self.sessions: dict[bytes, Session] = {}  # the control listener's; the core reads who is connected
        self.counters: Counter = Counter()
        self.core = ControlCore(self.directory, self.sessions, self.counters)
        self.punch = self.core.punch
        # Failed handshakes/joins per source IP: an IP that used up its bucket is refused until it refills.
        self.failures = KeyedLimiter(5.0, 20.0, max_keys=50_000)
        self._db_lock = trio.Lock()
        self.bound = Bound()
        self.control_listener = ControlListener(self)
        self.relay_udp = RelayUdp(self)
        self.relay_tcp_listener = RelayTcp(self, self.relay_udp.relay_send, self.relay_udp.relay_send_many)
        self.started = time.monotonic()
        self._routes_pending: dict[bytes, AdvertiseRoutes] = {}  # the newest advertisement of each node not written
        self._routes_wake = trio.Event()
        self._server_ips: set[str] = set()  # where nodes reach us (no route may contain one)
        self._public_dirty = True  # the directory changed: nodes' public endpoints may have (_publish_public)
        self._public_meta: str | None = None  # what _publish_public last wrote (None: not read yet)
        self._presence: tuple[frozenset, float] | None = None  # (keys, monotonic time) _publish_presence last wrote
        self._stopping = False  # SIGTERM came
        self.sd = sdnotify.take()  # systemd's notify socket (meshwg/sdnotify.py): READY, STATUS, STOPPING
        self._nursery = None  # _run's, while it runs
        self.admin_listener = None
        # The feed from here on; the full read below covers what came before (a change seen twice is harmless).
        self._seq = self.store.change_head()
        self.apply(self.core.resync(self.store.list_nodes(), time.time()))
        if multi_server.enabled(self.store, config):
            self.multi = multi_server.MultiServer(self)
            self.multi.load()
        self._policy_sig = None  # (mtime, size, inode) of the policy file when last read
        self._policy_lock = trio.Lock()
        if config.policy:
            self._policy_sig = _file_sig(config.policy)
            pf = self._read_policy(self.store.list_nodes(), self.store.list_invites())  # PolicyError: fatal
            self.apply(self.core.set_policy(pf))
            log.info("access policy %s: %d rules", os.path.abspath(config.policy), len(pf.rules))
        self._sync_relay_allowed()

    # --- helpers

    async def _db(self, fn, *args):
        """fn(*args) in a worker thread, one at a time. A database that misbehaves (PostgreSQL gone, SQLite locked
        past its busy timeout) raises StoreError, which every caller handles without ending a node's session."""
        async with self._db_lock:
            try:
                return await trio.to_thread.run_sync(fn, *args)
            except sqlite3.OperationalError as exc:  # "database is locked", a full disk, a vanished file
                raise api.StoreError(f"{api.db_label(self.cfg.db)}: {exc}") from exc

    def db_failed(self, what: str, exc: BaseException) -> None:
        """A database call failed: counted, and logged once per log_repeat_interval for each `what` (a traceback
        only for what is no database error: a bug)."""
        self.counters["db_errors"] += 1
        if isinstance(exc, api.StoreError):
            self.log_repeat.log(log, logging.WARNING, "db_" + what, time.monotonic(),
                                "database: %s failed (%s); sessions stay up, will retry", what, exc)
        else:
            self.log_repeat.log(log, logging.ERROR, "db_" + what, time.monotonic(), "%s failed; will retry", what,
                                exc_info=exc)

    def welcome_servers(self, host: str) -> list[str]:
        """The control addresses of every running server on this database, for a node's welcome (it keeps them and
        reconnects to another when its own dies): this one's first (a wildcard bind as the node reached it), then
        the others' records; [] with one server (SQLite)."""
        if self.multi is None:
            return []
        own = advertised(self.bound.control, self.cfg.advertise or host)
        return list(dict.fromkeys(own + self.multi.others))[:multi_server.MAX_WELCOME_SERVERS]

    def _failed(self, ip: str, now: float) -> None:
        self.failures.allow(ip, now)  # spends a token; the answer is moot, exhausted() does the refusing

    def _sync_relay_allowed(self) -> None:
        self.relay.set_allowed(k for k, n in self.directory.nodes.items() if k not in self.directory.plain)
        self._sync_plain()

    def _sync_plain(self) -> None:
        self.relay.set_plain(self.directory.plain.keys(), self.directory.plain_targets())

    def apply(self, effects) -> None:
        """Carries out the control core's effects."""
        plain_changed = False
        for e in effects:
            if e is DIR_CHANGED:
                self.control_listener.wake_all()
                self._public_dirty = True
                if self.multi is not None:
                    self.multi.kick()
            elif e is PLAIN_CHANGED:
                plain_changed = True  # once per batch: a resync brings every row at once
            elif isinstance(e, Send):
                s = self.sessions.get(e.to)
                if s is not None:
                    s.enqueue(e.msg, self.counters)
                elif self.multi is not None:  # a node on another server (a punch's other side)
                    self.multi.forward(e.to, e.msg)
            elif isinstance(e, Allow):
                self.relay.allowed.add(e.key)
            elif isinstance(e, Drop):
                self._routes_pending.pop(e.key, None)
                self._drop(e.key, e.reason)
            elif isinstance(e, AdvertiseRoutes):
                self._routes_pending[e.key] = e  # the newest replaces one not yet written
                self._routes_wake.set()
            elif isinstance(e, Log):
                log.log(e.level, "%s", e.text)
            elif isinstance(e, Leave) and self._nursery is not None:
                self._nursery.start_soon(self._leave, e.key)
        if plain_changed:
            self._sync_plain()

    def _drop(self, key: bytes, reason: str) -> None:
        self.relay.drop_key(key)
        self.relay.allowed.discard(key)
        s = self.sessions.get(key)
        if s is not None:
            s.gone(reason)
        log.info("%s %s %s; peers notified", "plain peer" if key in self.relay.plain_keys else "node",
                 key_to_base64(key), reason)

    # Entry points tests drive directly.
    async def _run_session(self, s: Session) -> None:
        await self.control_listener.run_session(s)

    def _on_udp(self, idx: int, data: bytes, addr, now: float, wall: float) -> None:
        self.relay_udp.on_udp(idx, data, addr, now, wall)

    def _publish_observed(self) -> None:
        self.relay_udp.publish_observed()

    def gauges(self) -> dict:
        acl = self.directory.acl
        return {
            "policy_rules": len(acl.pf.rules) if acl is not None else -1,  # -1: no policy, everything allowed
            "policy_accept_truncated": acl.truncated if acl is not None else 0,
            "nodes_registered": len(self.directory.nodes) - len(self.directory.plain),
            "plain_peers": len(self.directory.plain),
            "plain_targets": len(self.plain.targets),
            "plain_pending_handshakes": self.plain.pending_count,
            "plain_sessions": self.plain.pair_count,
            "nodes_connected": len(self.sessions),
            "relay_sessions": len(self.relay.by_key),
            "relay_tcp_connections": self.relay_limits.active,
            "relay_tcp_connections_max": self.relay_limits.total,
            "unauthenticated_connections": self.control_limits.active,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }

    def render_metrics(self) -> str:
        self.relay_udp.fold_counters()
        plain = Counter({f"plain_{k}": v for k, v in self.plain.counters.items()})  # the ingress's, apart
        return metrics.render(self.counters + self.relay.counters + plain, self.gauges())

    # --- run

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Bound before anything else: a second server on this database is refused here (OSError, one line).
        self.admin_listener = admin_socket.AdminListener(self.cfg.admin_socket) if self.cfg.admin_socket else None
        try:
            await self._run(task_status)
        finally:
            if self.admin_listener is not None:
                self.admin_listener.close()
            self.relay_udp.close()
            self._publish_no_presence()
            if self.multi is not None:
                self.multi.close()
        if self._stopping:
            log.info("stopped")

    def warn_route_overlaps(self) -> None:
        """One warning per host route that overlaps a mesh prefix, but those of a node of ours running on this host;
        the server starts all the same."""
        routes = host_routes()
        nodes = [a for n in self.store.list_nodes() for a in (n.ipv4, n.ipv6) if a]
        ours = local_routes.own_interfaces(host_addresses(), nodes) if nodes else frozenset()
        for prefix in (self.prefix4, self.prefix6):
            for line in local_routes.warnings(routes, prefix, ours):
                log.warning("%s", line)

    async def _stop_on_sigterm(self, scope: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                log.info("SIGTERM: shutting down (%d nodes connected)", len(self.sessions))
                self.sd.stopping()
                self._stopping = True
                scope.cancel()
                return

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
        cfg, bound = self.cfg, self.bound
        self._setup_conn_limits()
        if cfg.control_enabled:
            self.warn_route_overlaps()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # for work an effect starts (a node's leave)
            if cfg.stop_on_sigterm:
                await nursery.start(self._stop_on_sigterm, nursery.cancel_scope)
            if cfg.control_enabled:
                for host, port in cfg.control:
                    bound.control += await self.control_listener.listen(nursery, host, port)
            bound.udp, bound.stun_alt = self.relay_udp.bind(nursery, cfg.udp, cfg.stun_alt_port)
            for host, port in cfg.relay_tcp:
                bound.relay_tcp += await self.relay_tcp_listener.listen(nursery, host, port)
            bound.plain = self._bind_plain(nursery)
            for host, port in cfg.metrics:
                ls = await trio.open_tcp_listeners(port, host=host)
                bound.metrics += [l.socket.getsockname()[:2] for l in ls]
                nursery.start_soon(metrics.serve_metrics, ls, self.render_metrics)
            self._publish_addresses()
            if self.multi is not None:
                await nursery.start(self.multi.run)
            nursery.start_soon(self._housekeeping)
            if self.admin_listener is not None:
                await nursery.start(admin_socket.serve, self.admin_listener, admin_socket.server_handler(self))
                log.info("admin socket %s", self.admin_listener.path)
            if cfg.policy and cfg.control_enabled:
                await nursery.start(self._policy_on_sighup)
            nursery.start_soon(self._routes_writer)
            nursery.start_soon(self.regions.refresh_loop, self.sessions, self.counters)
            nursery.start_soon(self.control_listener.flusher)
            log.info(
                "serving: control %s, udp (stun+relay) %s, stun alternate %s, relay tcp %s, plain wireguard %s, "
                "metrics %s; server key %s",
                *(_addrs(a) for a in (bound.control, bound.udp, bound.stun_alt, bound.relay_tcp, bound.plain,
                                      bound.metrics)),
                key_to_base64(self.server_pk),
            )
            nursery.start_soon(service_notify.run, self, self.sd)   # READY=1: every listener is bound
            task_status.started(bound)

    def _bind_plain(self, nursery) -> list:
        try:
            return self.relay_udp.bind_plain(nursery, self.cfg.plain_udp)
        except OSError as exc:
            if self.cfg.plain_udp_strict:
                raise
            log.warning("no plain WireGuard port %s (%s): phones cannot reach nodes through this server; "
                        "choose one with --plain-udp", join_hostport(*self.cfg.plain_udp), exc)
            return []

    def _publish_addresses(self) -> None:
        """Let the admin CLI build invites and find /metrics without being told the ports. Only what this
        process serves: a relay-only process beside the server must not erase the server's addresses."""
        if self.bound.control:
            self.store.meta_set("control_addrs", json.dumps(advertised(self.bound.control, self.cfg.advertise)))
        if self.bound.metrics:
            self.store.meta_set("metrics_addrs", json.dumps([join_hostport(h, p) for h, p in self.bound.metrics]))
        if self.bound.plain:  # the Endpoint of plain peers' configs (`meshwg-signal plain add/config`)
            self.store.meta_set("plain_addrs", json.dumps(advertised(self.bound.plain, self.cfg.advertise)))
        if self.cfg.control_enabled:   # the DNS line of plain peers' configs ("": none)
            self.store.meta_set("dns_domain", self.cfg.dns_domain)
        if self.cfg.control_enabled:
            b = self.bound
            bound = [h for h, _ in (*b.control, *b.udp, *b.stun_alt, *b.relay_tcp, *b.plain) if h not in WILDCARDS]
            if self._add_server_ips([*bound, self.cfg.advertise or ""]):
                self.store.meta_set("server_addrs", json.dumps(sorted(self._server_ips)))

    async def _leave(self, key: bytes) -> None:
        """`meshwg leave`: the node's row goes as with `nodes remove`; its session hears GONE "left", peers the removal."""
        row = self.directory.nodes.get(key)
        if row is None:
            return
        try:
            await self._db(self.store.remove, row.node_id, time.time())
        except Exception:  # a busy database: the node hears nothing and reports that the leave failed
            log.exception("removing node %s at its request failed", row.name)
            self.counters["db_errors"] += 1
            return
        log.info("node %s (%s) left the mesh", row.name, row.ipv4)
        current = self.directory.nodes.get(key)
        if current is not None and current.node_id != row.node_id:
            return  # the key registered again while the removal was written: that new node stays
        self.apply(self.core.drop(key, "left"))

    # --- subnet routes and exit nodes

    def _add_server_ips(self, ips) -> bool:
        """Where nodes reach us (bound addresses, --advertise, the local address of each control session): the
        core refuses routes containing one. True when the set grew: the caller publishes it then (meta
        server_addrs, which `meshwg-signal routes approve` reads)."""
        new = {ip for ip in ips if ip and ip not in WILDCARDS} - self._server_ips
        if not new:
            return False
        self._server_ips |= new
        self.apply(self.core.set_server_ips(self._server_ips))
        return True

    async def note_local_address(self, host: str) -> None:
        """A control session reached us at `host`: one more address no route may contain."""
        if self._add_server_ips([host]):
            try:
                await self._db(self.store.meta_set, "server_addrs", json.dumps(sorted(self._server_ips)))
            except api.StoreError as exc:  # the session goes on; the next new address writes the whole set
                self.db_failed("recording the server's addresses", exc)

    async def _routes_writer(self) -> None:
        """Writes the nodes' advertisements (the store decides what its invite approves) and applies the rows:
        peers hear of a change at the next directory flush. At most one write round per routes_interval, so a
        node that keeps changing its advertisement costs a bounded share of the database."""
        while True:
            await self._routes_wake.wait()
            self._routes_wake = trio.Event()
            pending, self._routes_pending = self._routes_pending, {}
            failed = False
            for key, adv in pending.items():
                try:
                    row, plan = await self._db(self.store.advertise_routes, key, adv.routes, adv.exit_node,
                                               self.core.policy.forbidden)
                except Exception as exc:  # a busy database: tried again next round, unless a newer one came
                    self.db_failed("storing routes", exc)
                    self._routes_pending.setdefault(key, adv)
                    self._routes_wake.set()
                    failed = True
                    continue
                self.apply(self.core.routes_recorded(key, row, plan, time.time()))
            # A database that is down is tried again less often (the advertisements wait here, newest kept).
            await trio.sleep(DB_RETRY if failed else self.cfg.routes_interval)

    # --- the change feed and expiry

    async def _housekeeping(self) -> None:
        last_expiry = 0.0
        while True:
            await trio.sleep(self.cfg.db_poll)
            try:
                if self.multi is None:  # else read when notified (multi_server.MultiServer._follow)
                    await self._follow_changes()
                await self.check_policy()
                await self._publish_public()
                await self._publish_presence()
            except Exception as exc:  # a locked/busy DB must not kill the server; retry next tick
                self.db_failed("reading the change feed", exc)
            now = time.monotonic()
            if now - last_expiry >= 1.0:
                last_expiry = now
                self.apply(self.core.expire(time.time()))
                self.relay.expire(now)

    # --- the access policy (issue 13)

    def _read_policy(self, rows, invites) -> acl_policy.PolicyFile:
        """The policy file, checked against the database's nodes and invites; PolicyError (one line) otherwise."""
        path = self.cfg.policy
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError as exc:
            raise acl_policy.PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return acl_policy.load_bytes(data, path, [acl_policy.member_of(r) for r in rows],
                                     acl_policy.invite_tags(invites))

    async def check_policy(self, force: bool = False) -> None:
        """Reload the policy file when it changed (or `force`, on SIGHUP); a bad one is one log line and the
        previous policy stays."""
        if not (self.cfg.policy and self.cfg.control_enabled):
            return
        async with self._policy_lock:
            sig = _file_sig(self.cfg.policy)
            if sig == self._policy_sig and not force:
                return
            self._policy_sig = sig
            rows, invites = await self._db(lambda: (self.store.list_nodes(), self.store.list_invites()))
            try:
                pf = self._read_policy(rows, invites)
            except acl_policy.PolicyError as exc:
                self.counters["policy_reload_errors"] += 1
                log.warning("policy not reloaded, the previous one stays in force: %s", exc)
                return
            self.apply(self.core.set_policy(pf))
            log.info("access policy %s reloaded: %d rules", os.path.abspath(self.cfg.policy), len(pf.rules))

    async def _policy_on_sighup(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """SIGHUP reloads the policy file (installed before `started`: a SIGHUP from then on never kills us)."""
        started = False
        try:
            with trio.open_signal_receiver(signal.SIGHUP) as sighups:
                task_status.started()
                started = True
                async for _ in sighups:
                    try:
                        await self.check_policy(force=True)
                    except Exception:  # a busy database: the next change or SIGHUP tries again
                        log.exception("reloading the policy failed")
                        self.counters["policy_reload_errors"] += 1
        except RuntimeError:  # not the main thread (the server embedded in a thread): reload on change only
            if started:
                raise
            log.warning("SIGHUP cannot reach this server (not the main thread); the policy reloads when it changes")
            task_status.started()

    async def _publish_public(self) -> None:
        """Nodes' public endpoints into the database for `plain add/config --direct` (admin.PUBLIC_META: the CLI
        reads only the database), when the directory changed and they did."""
        if not (self._public_dirty and self.cfg.control_enabled):
            return
        from signal_server import admin

        if self._public_meta is None:
            self._public_meta = await self._db(self.store.meta_get, admin.PUBLIC_META) or ""
        new = admin.public_endpoints_json(self.directory.nodes.values(), self._public_meta)
        if new != self._public_meta:
            await self._db(self.store.meta_set, admin.PUBLIC_META, new)   # a failure: tried again next tick
            self._public_meta = new
        self._public_dirty = False

    async def _publish_presence(self) -> None:
        """Who is connected, into the database for `meshwg-signal nodes` (admin.PRESENCE_META): when the set
        changed (at most once a second under churn) and every PRESENCE_REFRESH s, which tells the CLI that a
        server is still running."""
        if not self.cfg.control_enabled:
            return
        keys, now = frozenset(self.sessions), time.monotonic()
        if self._presence is not None:
            age = now - self._presence[1]
            if age < 1.0 or (keys == self._presence[0] and age < admin.PRESENCE_REFRESH):
                return
        await self._db(self.store.meta_set, admin.PRESENCE_META, admin.presence_json(keys, time.time()))
        self._presence = (keys, now)

    def _publish_no_presence(self) -> None:
        """At shutdown: nobody is connected here any more (a killed server's record goes stale instead)."""
        if not self.cfg.control_enabled or self._presence is None:
            return
        try:
            self.store.meta_set(admin.PRESENCE_META, admin.presence_json((), time.time()))
        except Exception:  # a busy database: the record goes stale within admin.PRESENCE_STALE
            log.warning("could not record at shutdown that no node is connected", exc_info=True)

    async def _follow_changes(self, own: bool = False) -> None:
        """Applies what other processes changed (admin CLI, other servers): only the rows the feed names;
        the whole node table only after a RESYNC (we fell behind the feed's pruning). own: also what our own
        connection wrote (an admin socket request), which may_have_changes does not see."""
        if not await self._db(self.store.may_have_changes) and not own:
            return
        changes, seq = await self._db(self.store.changes_since, self._seq)
        self.counters["feed_changes"] += len(changes)
        if any(c.kind == api.RESYNC for c in changes):
            self.counters["feed_resyncs"] += 1
            rows = await self._db(self.store.list_nodes)
            self.apply(self.core.resync(rows, time.time()))
            self._sync_relay_allowed()
            if self.multi is not None:
                self.multi.apply_rows(await self._db(self.store.live_rows))
        else:
            keys = list(dict.fromkeys(c.key for c in changes if c.kind in api.NODE_KINDS and c.key))
            rows = await self._db(lambda: [self.store.get_node(k) for k in keys])
            wall = time.time()
            for key, row in zip(keys, rows):
                self.apply(self.core.apply_row(key, row, wall))
            live = multi_server.live_kinds(changes) if self.multi is not None else []
            if live:  # other servers' nodes: online, candidates, observed
                self.multi.apply_rows(await self._db(self.store.live_rows, live))
        self._seq = seq


def _file_sig(path: str):
    """What tells a changed file: (mtime, size, inode); None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino

"""`meshwg join`: the node agent's trio shell. One trio nursery owns everything; closing it removes everything.

The decisions are the agent core's (meshwg.mesh.agent_core, sans-IO): the one peer directory, what the
node gets from it, when to punch, which candidates to report, when to write the cache. This shell only
turns events into the core's inputs and its actions into I/O, through one door (`_step`): feed a batch,
carry out the actions in order, flush the driver once. One clock (`clock`, time.monotonic by default) is
the device's (its driver times the node), times every batch and the control client's retry; wall time is read
only to format the status.

Tasks: the mesh device (driver drain loops, UAPI, routes, birthday sockets, relay), the control
client (registration, directory, punch notices; reconnects with backoff by itself), the control
events, a Tick at the core's next deadline (punch requests, deferred cache writes; none while idle), a local-address
watcher (netlink events),
a watcher of the node's own endpoints (STUN results), the NAT probe (RFC 5780 filtering tests against the
server's STUN every NAT_PROBE_INTERVAL and when our addresses change: an open NAT makes our reflexive address
a "public" candidate; not run while the user gave a port forward or an exit node is in use), and the status socket.

Outage tolerance: the data plane never waits on the control channel. While the server is down the
tunnels keep their paths; a restart with the server down brings up the cached netmap.
"""

from __future__ import annotations

import base64
import functools
import logging
import math
import signal
import time

import trio

from meshwg import counters, sdnotify
from meshwg.control import ControlClient, ControlError, JoinRefusedError, ServerKeyMismatch, events as CE
from meshwg.control.entry_check import entry_accept_untrusted, entry_routes_untrusted, tags_untrusted
from meshwg.signaling.invite import Invite, join_hostport, split_hostport
from meshwg.signaling.protocol import KIND_RELAY
from meshwg.disco import netcheck as NC
from meshwg.io.agent import agent_state as S
from meshwg.io.agent import netcheck_probe, service_notify
from meshwg.io.ipc import status_server
from meshwg.io.agent.local_links import address_is_local, local_addresses, watch_changes
from meshwg.io.agent.mesh_shell import MeshDevice
from meshwg.io.agent.ping_shell import UserPingServer
from meshwg.io.oscfg.subnet_routes import SubnetRouting
from meshwg.io.agent.dns_server import DnsServer
from meshwg.io.oscfg import resolver as RESOLV
from meshwg.mesh import dns_names
from meshwg.mesh import agent_core as A
from meshwg.wg.acl import summary as acl_summary
from meshwg.mesh import node as N
from meshwg.mesh import routing as RT

log = logging.getLogger("meshwg.agent")

RECONNECT_BACKOFF_MAX = 8.0     # a returning server sees its nodes back within seconds
EVENT_BATCH = 256               # control events handed to the core in one batch at most
NAT_PROBE_INTERVAL = 300.0      # the NAT's filtering is probed again this often (and when our addresses change)
NAT_PROBE_TIMEOUT = 1.0         # seconds each STUN test of the probe waits
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


# The inputs after which names or our addresses may have changed (the DNS table is rebuilt then, not every tick).
_NAME_INPUTS = (A.CacheLoaded, CE.Connected, CE.DirectoryReset, CE.PeerChanged, CE.PeerRemoved, CE.SelfChanged)


class AgentError(Exception):
    pass


def _peer_to_json(p) -> dict:
    return {"key": base64.b64encode(p.key).decode(), "id": p.node_id, "name": p.name, "ipv4": p.ipv4,
            "ipv6": p.ipv6, "candidates": [list(c) for c in p.candidates], "online": p.online, "kind": p.kind,
            "routes": list(p.routes), "exit": p.exit_node, "tags": list(p.tags),
            **({} if p.accept is None else {"accept": [list(r) for r in p.accept]}),
            **({} if p.offers is None else {"offers": [list(r) for r in p.offers]})}


def _peer_from_json(d: dict):
    """A cached entry; None for a kind this node does not know (as the control client drops it). Caches written
    before plain peers existed hold nodes only."""
    kind = d.get("kind", "node")
    if kind not in CE.PEER_KINDS:
        return None
    # The accept list as the server sent it (absent: no policy), checked as an entry's (never allow-all if bad).
    accept, refused = entry_accept_untrusted(d["accept"]) if "accept" in d else (None, 0)
    offers, _ = entry_accept_untrusted(d["offers"]) if "offers" in d else (None, 0)  # counted when it arrived
    return CE.PeerInfo(base64.b64decode(d["key"]), int(d.get("id", 0)), str(d["name"]), str(d["ipv4"]),
                       str(d["ipv6"]), tuple(tuple(c) for c in d.get("candidates", [])), bool(d.get("online")), kind,
                       entry_routes_untrusted(d.get("routes")), d.get("exit") is True, accept,
                       tags_untrusted(d.get("tags")), refused, offers)


def _peers_from_json(entries) -> tuple:
    return tuple(p for p in map(_peer_from_json, entries) if p is not None)


def _welcome_to_json(w) -> dict:
    return {"node_id": w.node_id, "name": w.name, "ipv4": w.ipv4, "ipv6": w.ipv6, "prefix4": w.prefix4,
            "prefix6": w.prefix6, "stun": [list(a) for a in w.stun], "relay_udp": [list(a) for a in w.relay_udp],
            "relay_tcp": [list(a) for a in w.relay_tcp], "heartbeat": w.heartbeat,
            "server_key": base64.b64encode(w.server_key).decode(), "tags": list(w.tags), "dns_domain": w.dns_domain}


def _welcome_from_json(d: dict):
    return CE.Welcome(int(d["node_id"]), str(d["name"]), str(d["ipv4"]), str(d["ipv6"]), str(d.get("prefix4", "")),
                      str(d.get("prefix6", "")), tuple(tuple(a) for a in d.get("stun", [])),
                      tuple(tuple(a) for a in d.get("relay_udp", [])), tuple(tuple(a) for a in d.get("relay_tcp", [])),
                      float(d.get("heartbeat", 10.0)), base64.b64decode(d["server_key"]), tags_untrusted(d.get("tags")),
                      dns_names.dns_domain_untrusted(d.get("dns_domain")))


def cached_invite(cache: dict | None) -> Invite | None:
    """The server's addresses and key from a registered node's cache, as an invite with no secret."""
    try:
        ctl = cache["control"]
        addrs = tuple(str(a) for a in ctl["addrs"])
        for a in addrs:
            split_hostport(a)
        key = base64.b64decode(ctl["server_key"], validate=True)
    except (KeyError, TypeError, ValueError):
        return None
    if not addrs or len(key) != 32:
        return None
    return Invite(addrs, key, "", b"")


def _fmt_addr(a) -> str | None:
    """An (ip, port) endpoint as text; None for anything else (a relay endpoint, no endpoint)."""
    return join_hostport(str(a[0]), a[1]) if isinstance(a, tuple) and len(a) == 2 else None


class Agent:
    def __init__(self, invite: Invite, *, name: str | None, state_dir: str, iface: str, listen_port: int = 0,
                 status_dir: str = status_server.RUN_DIR, uapi_dir: str | None = None, clock=time.monotonic,
                 routing: dict | None = None, accept_dns: bool = False, dns_port: int = 53):
        self.invite = invite
        self.name = name
        self.state_dir = state_dir
        self.iface = iface
        self.listen_port = listen_port
        self.status_dir = status_dir
        self.uapi_dir = uapi_dir or status_dir
        self.clock = clock
        self.dev: MeshDevice | None = None
        self.client: ControlClient | None = None
        self.core: A.AgentCore | None = None
        self.fatal: str | None = None
        self._endpoints = trio.Event()   # the node's own endpoints changed: _endpoints_news is the latest
        self._endpoints_news: N.LocalEndpointsChanged | None = None
        self._tick_news = trio.Event()   # the core's deadline may have moved: the tick task reads it again
        self._tick_due = False           # ... or a Tick is due now (the device's news)
        self._step_lock = trio.Lock()
        self._cancel: trio.CancelScope | None = None
        # The routing choice: the saved one, with what the command line gave (routing: RoutingChoice fields).
        self._routing_overrides = dict(routing or {})
        self.subnet: SubnetRouting | None = None
        self.fwmark = 0              # the exit policy routing's mark, chosen the first time it is needed
        self.exit_name: str | None = None   # the exit node in use (None: none)
        self.exit_mtus: dict[str, int] = {}   # its default routes' MTU while it is relayed (SetExitMtus)
        self._reprobe = trio.Event()          # our addresses changed: probe the NAT again now
        self.pings = UserPingServer()         # `meshwg ping` requests waiting for their pong
        # Names (issue 15): the DNS server on our mesh addresses; with accept_dns the host's resolver asks it.
        self.dns = DnsServer(port=dns_port)
        self.resolver = RESOLV.SystemResolver(iface, state_dir) if accept_dns else None
        self._resolver_want: tuple = ("", None)
        self._resolver_news = trio.Event()

    # ---- main --------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        notifier = sdnotify.take()   # before any child process: none inherits $NOTIFY_SOCKET
        key = S.load_or_create_key(self.state_dir)
        cache = S.load_cache(self.state_dir)
        cached_port = int((cache or {}).get("listen_port", 0) or 0)
        self.dev = MeshDevice(self.iface, key, listen_port=self.listen_port or cached_port, uapi_dir=self.uapi_dir,
                              on_local_endpoints=self._on_local_endpoints, clock=self.clock)
        self.dev.on_user_ping = self.pings.done
        self.dev.on_news = self._on_device_news
        self.dev.relay.home_of, self.dev.relay.on_home = self._peer_relay_home, self._on_relay_home
        self._relay_home_news: tuple | None = None
        self._relay_home_event = trio.Event()
        self.core = A.AgentCore(self.dev.node, tuple(self.invite.addrs))
        self.subnet = SubnetRouting(self.dev.name, self.state_dir)
        status = None
        try:
            await trio.to_thread.run_sync(self.subnet.recover)   # first: undo what a crashed run left
            await self._dns_start()
            status = status_server.StatusListener(self.dev.name, self.status_dir)
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.dev.run)
                    await nursery.start(status_server.serve, status, self.handle_query)
                    await nursery.start(self.dns.run)
                    self.client = self._control_client(key, registered=cache is not None)
                    self.client.servers = S.cached_servers(cache, self.invite.server_key)  # other servers known
                    await self._step(await self._local_addresses())   # the registration's candidates
                    await self._step(A.SetRouting(self._initial_routing()))
                    nursery.start_soon(self._control_task)
                    if cache is not None:
                        peers = _peers_from_json(cache["peers"])
                        await self._step(A.CacheLoaded(_welcome_from_json(cache["welcome"]), peers, cached_port))
                    for task in (self._events_task, self._ticks, self._local_watch, self._endpoints_watch,
                                 self._signals, self._watch_device, self._nat_probe_task, self._resolver_task):
                        nursery.start_soon(task)
                    nursery.start_soon(service_notify.watch, self, notifier)   # systemd: READY/STATUS/STOPPING
                    nursery.start_soon(self._relay_home_watch)
                    task_status.started(self)
        finally:
            if status is not None:
                status.close()
            self.subnet.close()   # rules, nftables table, forwarding as they were
            if self.resolver is not None:
                self.resolver.close()   # the host's resolver as it was
            self.dev.close()
        if self.fatal:
            raise AgentError(self.fatal)

    def _control_client(self, key: bytes, registered: bool) -> ControlClient:
        # A node with a cached netmap was admitted before: a server that looks wrong (another key, no
        # record of us) is reported and retried, never obeyed. Our clock: status reads retry_at against it.
        return ControlClient(self.invite, key, name=self.name, backoff_max=RECONNECT_BACKOFF_MAX,
                             registered=registered, clock=self.clock)

    def stop(self, reason: str | None = None) -> None:
        if reason and not self.fatal:
            self.fatal = reason
        if self._cancel is not None:
            self._cancel.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("signal %d: shutting down", signum)
                self.stop()
                return

    async def _watch_device(self) -> None:
        await self.dev.device.stopped.wait()
        self.stop(f"interface {self.iface} went away ({self.dev.device.stop_reason})")

    async def _control_task(self) -> None:
        try:
            await self.client.run()
        except (JoinRefusedError, ServerKeyMismatch) as exc:  # only the fatal ones reach here
            self.stop(f"the signaling server refused this node: {exc}")
            return
        if self.client.left:   # `meshwg leave`: its reply goes out (status_server shields it), then we stop
            self.stop()
        elif self.fatal is None:
            self.stop("this node was removed from the mesh by the administrator")

    async def _leave(self) -> dict:
        """`meshwg leave` with the agent running: the server removes us; the agent stops (the command then removes
        the state directory's files)."""
        try:
            await self.client.leave()
        except ControlError as exc:
            return {"error": str(exc)}
        log.info("left the mesh at the user's request")
        return {"ok": True}

    # ---- the one door to the core ------------------------------------------------------------
    async def _step(self, *inputs) -> None:
        """Hand the core a batch of inputs, carry out its actions in order, then flush the driver once."""
        async with self._step_lock:
            batch = list(inputs)
            while batch:
                actions = self.core.apply(batch, self.clock())
                batch = []
                for act in actions:
                    follow = await self._carry_out(act)
                    if follow is not None:
                        batch.append(follow)
            await self.dev.driver.flush()
            if any(isinstance(i, (CE.PeerChanged, CE.DirectoryReset)) for i in inputs):
                self.dev.relay.homes_changed()   # a peer's home relay may have moved (issue 14.3)
            if any(isinstance(i, _NAME_INPUTS) for i in inputs):
                self._feed_dns()
        self._tick_news.set()   # the core's next deadline may have moved

    async def _carry_out(self, act):
        """One action as I/O; returns the input it gives back to the core, if any."""
        match act:
            case A.SetAddresses(addresses):
                await self.dev.set_addresses(list(addresses))
            case A.ConfigureRelay(server_key, udp, tcp, relays, cred):
                if relays:   # relays in regions (issue 14.3): the shell picks the home relay
                    self.dev.relay.configure_regions(relays, cred)
                else:
                    self.dev.relay.configure(server_key, udp, tcp)
            case A.SetRelayCredential(cred):
                self.dev.relay.set_credential(cred)
            case A.RelayServerRestarted():
                self.dev.relay.server_restarted()
            case A.RequestPunch(key):
                await self.client.request_punch(key)
            case A.RegisterCandidates(cands):
                self.client.candidates = list(cands)
            case A.ReportCandidates(cands):
                if await self.client.report_candidates(list(cands)):
                    return A.CandidatesAccepted(cands)
            case A.WriteCache():
                await self._write_cache(act)
            case A.Stop(reason):
                self.stop(reason)
            case A.Log(level, message):
                log.log(_LEVELS[level], "%s", message)
            case A.ReportRoutes(routes, exit_node):
                await self.client.report_routes(list(routes), exit_node)   # re-sent after the next welcome
            case A.Advertise():
                await self._apply_os()
            case A.UseExitNode(key, name):
                await self._use_exit(key, name)
            case A.SetRouteMtus(mtus):
                self.dev.set_route_mtus(dict(mtus))   # the device's route task applies it
            case A.SetExitMtus(mtus):
                self.exit_mtus = dict(mtus)
                if self.exit_name:                    # else kept for when the exit policy routing goes on
                    await self._apply_os()
            case A.PingSent() | A.PingRefused():
                self.pings.carry_out(act)
            case _:
                raise TypeError(f"unknown agent action {act!r}")
        return None

    # ---- names (issue 15) ---------------------------------------------------------------------
    async def _dns_start(self) -> None:
        """Undo what a crashed run left in the host's resolver, then read its nameservers (where plain peers'
        other queries go): the file as the host has it, not as we change it."""
        # Whether or not --accept-dns is given now: a crashed run that had it left the host's file changed.
        leftover = self.resolver or RESOLV.SystemResolver(self.iface, self.state_dir)
        await trio.to_thread.run_sync(leftover.recover)
        text = await trio.to_thread.run_sync(RESOLV._read, RESOLV.RESOLV_CONF)
        self.dns.upstreams = dns_names.upstreams_from_resolv_conf(text or "")
        self.dns.resolver.forward = bool(self.dns.upstreams)

    def _feed_dns(self) -> None:
        """After a step that may have changed names or addresses: the DNS server's table, and what the host's
        resolver should ask (our mesh IPv4, the domain)."""
        w, core = self.core.welcome, self.core
        domain = w.dns_domain if w is not None else ""
        self.dns.update(dns_names.table_from(domain, w, core.peers.values()), (w.ipv4, w.ipv6) if w else ())
        want = (domain, w.ipv4 if w and domain else None)
        if self.resolver is not None and want != self._resolver_want:
            self._resolver_want = want
            self._resolver_news.set()

    async def _resolver_task(self) -> None:
        while self.resolver is not None:
            await self._resolver_news.wait()
            self._resolver_news = trio.Event()
            await trio.to_thread.run_sync(self.resolver.apply, *self._resolver_want)

    # ---- events -> inputs --------------------------------------------------------------------
    async def _events_task(self) -> None:
        async for ev in self.client.events:
            batch = [ev]
            while len(batch) < EVENT_BATCH:   # whatever else is queued: one batch, one flush
                try:
                    batch.append(self.client.events.receive_nowait())
                except trio.WouldBlock:
                    break
            if any(isinstance(e, CE.Connected) for e in batch):
                self.invite = self.client.invite  # registered: the client has forgotten the secret
            await self._step(*batch)

    async def _ticks(self) -> None:
        """A Tick at the core's next deadline (none: no wake-up at all while idle, issue 15), re-read after every
        step (an input may move it) and at once on the device's news (a path changed, an idle peer got traffic,
        the MTU changed: what the core reads after a batch); never sooner than TICK_INTERVAL after the last."""
        last = -math.inf
        while True:
            now = self.clock()
            due = now if self._tick_due else self.core.next_deadline(now)
            due = max(due, last + A.TICK_INTERVAL)
            if due > now:
                self._tick_news = trio.Event()
                # The deadline is on self.clock; trio sleeps on its own clock.
                with trio.move_on_at(trio.current_time() + (due - now)):
                    await self._tick_news.wait()
                if self.clock() < due:
                    continue   # woken early: read the deadline again
            self._tick_due = False
            last = self.clock()
            await self._step(A.Tick())

    def _on_device_news(self) -> None:
        """The device's news (sync, from the driver's flush): a Tick now."""
        self._tick_due = True
        self._tick_news.set()

    async def _local_addresses(self) -> A.LocalAddresses:
        # Candidates: no VPN, tunnel or container interface (local_candidates); networks: every interface's.
        ips, cidrs = await trio.to_thread.run_sync(local_addresses, {self.dev.name})
        nets = []
        for c in cidrs:
            net = RT.network_text(c)
            if net is not None and net not in nets:
                nets.append(net)
        return A.LocalAddresses(tuple(ips), self.dev.port, tuple(nets))

    async def _local_watch(self) -> None:
        # On the kernel's address/link events (debounced; a slow periodic read as a safety net): a network switch
        # re-STUNs within a second, not at the next 10 s poll.
        await watch_changes(self._reread_local, on_default_route=self._default_route_changed)

    async def _default_route_changed(self) -> None:
        """A main-table default route came, went or changed, maybe with no address change (two links up, their
        metrics swapped): our way out, so our reflexive address, may have moved. STUN again, probe peers again, and
        from the kernel's choice of source address: a sticky one (meshwg.io.dataplane.udp) would keep the STUN
        servers and peers on the old link. Cleared in place (the compiled path holds the same dict); a peer still
        writing to an old address puts its entry back with its next datagram."""
        self.dev.driver.udp.sources.clear()
        await self._step(A.Restun())
        self._reprobe.set()

    async def _reread_local(self) -> None:
        before = self.dev.node.iface_endpoints
        await self._step(await self._local_addresses())
        if self.dev.node.iface_endpoints != before:
            self._reprobe.set()
            # The control connection's address went with the old network: reconnect now (the new candidates
            # are published through it), not when its heartbeats time out.
            ip = self.client.local_ip() if self.client else None
            if ip is not None and not await trio.to_thread.run_sync(address_is_local, ip):
                log.info("control: our address %s went away: reconnecting", ip)
                self.client.network_changed()

    async def _nat_probe_task(self) -> None:
        """The NAT's filtering, for the "public" candidate (the core decides): once the welcome names STUN servers,
        then every NAT_PROBE_INTERVAL or when our addresses change. Fresh sockets (netcheck_probe): filtering is the
        NAT's, not one socket's. Not while the user gave a port forward (it wins) or traffic leaves through an exit
        node (the probe would see the exit's NAT): the verdict is then dropped."""
        while True:
            w = self.core.welcome
            if w is None or not w.stun:
                await trio.sleep(1.0)
                continue
            if self.core.routing.public_endpoint is not None or self.exit_name is not None:
                await self._step(A.NatProbed(NC.UNKNOWN, NC.UNKNOWN))
            else:
                await self._step(await self._probe_nat(w.stun))
            with trio.move_on_after(NAT_PROBE_INTERVAL):
                await self._reprobe.wait()
            self._reprobe = trio.Event()

    async def _probe_nat(self, servers) -> A.NatProbed:
        try:
            rep = await netcheck_probe.probe_servers(servers, timeout=NAT_PROBE_TIMEOUT)
        except OSError as exc:
            log.info("NAT probe failed: %s", exc)
            rep = None
        if rep is None:
            return A.NatProbed(NC.UNKNOWN, NC.UNKNOWN)
        family = 6 if rep["server"].startswith("[") else 4
        return A.NatProbed(rep["mapping"], rep["filtering"], family)

    def _peer_relay_home(self, key: bytes):
        """A peer's home relay (its "relay" candidate, issue 14.3), or None; the relay shell checks it is one of the
        welcome's relays before it sends there."""
        peer = self.core.peers.get(key)
        for c in (peer.candidates if peer is not None else ()):
            if len(c) == 3 and c[2] == KIND_RELAY:
                return (c[0], c[1])
        return None

    def _on_relay_home(self, addr: tuple) -> None:
        """From the relay shell (sync): our home relay moved; the watcher tells the core (our candidates)."""
        self._relay_home_news = addr
        self._relay_home_event.set()

    async def _relay_home_watch(self) -> None:
        while True:
            await self._relay_home_event.wait()
            self._relay_home_event = trio.Event()
            await self._step(A.RelayHome(self._relay_home_news))

    def _on_local_endpoints(self, ev: N.LocalEndpointsChanged) -> None:
        """From the driver's flush (sync, maybe inside a step): the endpoints watcher takes it from here."""
        self._endpoints_news = ev
        self._endpoints.set()

    async def _endpoints_watch(self) -> None:
        while True:
            await self._endpoints.wait()
            self._endpoints = trio.Event()
            await self._step(self._endpoints_news)

    async def _write_cache(self, act: A.WriteCache) -> None:
        # The port too: peers' cached candidates stay right across a restart; and where the server is
        # (never the invite's secret), so a registered node restarts without its invite.
        save = functools.partial(
            S.save_cache, self.state_dir, _welcome_to_json(act.welcome), [_peer_to_json(p) for p in act.peers],
            listen_port=act.listen_port,
            control={"addrs": list(self.client.control_addrs() if self.client else self.invite.addrs),
                     "server_key": base64.b64encode(self.invite.server_key).decode()})
        try:
            await trio.to_thread.run_sync(save)
        except OSError as exc:
            log.warning("cannot write the netmap cache: %s", exc)

    # ---- subnet routes and exit nodes --------------------------------------------------------
    def _initial_routing(self) -> RT.RoutingChoice:
        choice = RT.choice_from_json_untrusted(S.load_routing(self.state_dir))
        choice = choice.overridden(self._routing_overrides)   # --exit-node none, --public-endpoint none clear
        self._save_routing(choice)
        return choice

    def _save_routing(self, choice: RT.RoutingChoice) -> None:
        try:
            S.save_routing(self.state_dir, choice.to_json())
        except OSError as exc:
            log.warning("cannot save the routing choice: %s", exc)

    async def _apply_os(self) -> None:
        """Forwarding and masquerade as the choice says, the exit policy routing as the exit node in use says."""
        choice = self.core.routing
        apply = functools.partial(self.subnet.apply, forwarding=choice.advertising, masquerade=choice.snat,
                                  exit_mark=self.fwmark if self.exit_name else None, routes=choice.advertise,
                                  advertise_exit=choice.advertise_exit, exit_mtus=self.exit_mtus)
        await trio.to_thread.run_sync(apply)

    async def _use_exit(self, key, name) -> None:
        """Mark our sockets before the rules send everything else into the tunnel; unmark after they left."""
        if key is not None:
            if not self.fwmark:
                self.fwmark = await trio.to_thread.run_sync(self.subnet.choose_mark)
            await self.dev.set_fwmark(self.fwmark)
            self.client.set_fwmark(self.fwmark)
            self.exit_name = name
            await self._apply_os()
            log.info("exit node %s: all traffic goes through it (fwmark/table %d)", name, self.fwmark)
        else:
            self.exit_name = None
            await self._apply_os()
            await self.dev.set_fwmark(0)
            self.client.set_fwmark(0)
        self._reprobe.set()   # the NAT probe runs only without an exit node in use

    async def _set_routing(self, req: dict) -> dict:
        """`meshwg set`: the new choice, checked by the core, applied, saved."""
        try:
            changes = {}
            if req.get("advertise_routes") is not None:
                changes["advertise"] = RT.parse_advertised(str(req["advertise_routes"]))
            if req.get("advertise_exit_node") is not None:
                changes["advertise_exit"] = RT.parse_on_off(str(req["advertise_exit_node"]), "--advertise-exit-node")
            if req.get("snat_routes") is not None:
                changes["snat"] = RT.parse_on_off(str(req["snat_routes"]), "--snat-routes")
            if req.get("exit_node") is not None:
                changes["exit_node"] = RT.parse_exit_node(str(req["exit_node"]))
            if req.get("public_endpoint") is not None:
                changes["public_endpoint"] = RT.parse_public_endpoint(str(req["public_endpoint"]))
        except ValueError as exc:
            return {"error": str(exc)}
        choice = self.core.routing.overridden(changes)
        refused = self.core.routing_refused(choice)
        if refused:
            return {"error": refused}
        await self._step(A.SetRouting(choice))
        self._save_routing(choice)
        if choice.public_endpoint is None:
            self._reprobe.set()   # the NAT probe may say where we are reachable instead
        return {"ok": True, "routing": self._routing_status()}

    def _routing_status(self) -> dict:
        choice = self.core.routing
        return {"advertise_routes": list(choice.advertise), "advertise_exit_node": choice.advertise_exit,
                "snat_routes": choice.snat, "forwarding": self.subnet.forwarding if self.subnet else False,
                "exit_node": choice.exit_node, "exit_node_in_use": self.exit_name,
                "public_endpoint": choice.public_endpoint,
                "public_candidates": [_fmt_addr(a) for a in self.core.public_endpoints()]}

    # ---- queries -----------------------------------------------------------------------------
    async def handle_query(self, req: dict) -> dict:
        op = req.get("op", "status")
        if op == "status":
            return self.status()
        if op == "netcheck":
            return await self.netcheck()
        if op == "set":
            return await self._set_routing(req)
        if op == "ping":
            return await self.pings.serve(req, self._step)
        if op == "leave":
            return await self._leave()
        return {"error": f"unknown op {op!r}"}

    def status(self) -> dict:
        now, wall = self.clock(), time.time()
        dev, node, core = self.dev, self.dev.node, self.core
        peers = []
        for st in dev.peer_status(now):
            lh = st.get("last_handshake")
            peers.append({
                "name": st["name"], "public_key": base64.b64encode(st["public_key"]).decode(),
                "addresses": st["addresses"], "online": _online(core.peers.get(st["public_key"])),
                "path": st["path"], "endpoint": _fmt_addr(st["endpoint"]) if st["path"] == "direct" else None,
                "latency_ms": None if st["latency"] is None else round(st["latency"] * 1000, 3),
                "relay_reason": st["reason"] or None, "active": st["active"],
                "last_direct": _fmt_addr(st.get("last_direct")),   # an idle peer shows where it was direct
                "last_handshake": lh, "last_handshake_ago": None if not lh else round(wall - lh, 1),
                "rx_bytes": st["rx_bytes"], "tx_bytes": st["tx_bytes"],
                "relay_tx_packets": dev.relay.tx_by_peer.get(st["public_key"], 0),
                "candidates": [_fmt_addr(c) for c in st["candidates"]], "birthday": st["birthday"],
                "plain": st["plain"],
                "routes": list(_info(core, st).routes), "exit_node": _info(core, st).exit_node,
                "exit_node_in_use": st["public_key"] == core.exit_key,
                "routed": [str(n) for n in (core.specs.get(st["public_key"]).addresses
                                            if st["public_key"] in core.specs else ()) if n.prefixlen < n.max_prefixlen],
                "tags": list(_info(core, st).tags),
                "accepts": _accepts(node.specs.get(st["public_key"])),
                "sends": _sends(_info(core, st)),
            })
        rep = node.last_report
        w = core.welcome
        # By component: a drop reason two components count (the main and a birthday socket) shows under each.
        merged = counters.merge(dev.component_counters())
        return {
            "interface": dev.name, "name": w.name if w else self.name, "tags": list(w.tags) if w else [],
            "public_key": base64.b64encode(node.public_key).decode(),
            "addresses": list(dev.addresses), "listen_port": dev.port,
            "control": self._control_status(now),
            "nat": {"mapping": rep.mapping if rep else None, "kind": node.local_nat,
                    "reflexive": [_fmt_addr(a) for a in node.reflexive]},
            "relay": dev.relay.status(),
            "routes": dev.route_status(),
            "routing": self._routing_status(),
            "dns": self.dns.status(),
            "local_endpoints": [_fmt_addr(a) for a in node.iface_endpoints],
            "drops": counters.drops(merged),
            "counters": merged,                       # `meshwg status -d` shows them
            "peers": sorted(peers, key=lambda p: p["name"]),
        }

    def _control_status(self, now: float) -> dict:
        c = self.client
        retry_at = c.retry_at if c else None   # on our clock: the client was given it
        return {"connected": self.core.connected, "servers": list(self.invite.addrs),
                "server": c.conn.addr if c and c.conn else None,  # the one connected to (several: issue 14)
                "reconnects": c.reconnects if c else 0, "failures": c.failures if c else 0,
                "last_error": c.last_error if c else None, "error_kind": c.last_error_kind if c else None,
                "retry_in": None if retry_at is None else round(max(0.0, retry_at - now), 1)}

    async def netcheck(self) -> dict:
        """Re-STUN now on the shared socket and report the NAT's behaviour and the relay latency."""
        node = self.dev.node
        before = node.last_report
        await self._step(A.Restun())
        with trio.move_on_after(N.STUN_TIMEOUT + 0.5):
            while node.last_report is before:
                await trio.sleep(0.05)
        rep = node.last_report
        relay = self.dev.relay.status()
        out = {"udp": bool(rep and rep.udp), "mapping": rep.mapping if rep else NC.UNKNOWN,
               "filtering": rep.filtering if rep else NC.UNKNOWN, "hard": bool(rep and rep.hard),
               "reflexive": [_fmt_addr(a) for a in (rep.reflexive if rep else [])],
               "stun_servers": [_fmt_addr(s) for s in node.stun_servers],
               "summary": rep.summary() if rep else "no STUN answer yet",
               "relay": relay, "relay_latency_ms": relay["latency_ms"]}
        return out


def _info(core, st: dict):
    """The directory entry of a status row (an empty one for a peer added by hand)."""
    return core.peers.get(st["public_key"]) or CE.PeerInfo(st["public_key"], 0, "", "", "", (), False)


def _accepts(spec) -> str | None:
    """What the node's filter lets the peer send us, as one short line (meshwg.wg.acl.summary); None: no policy."""
    if spec is None or spec.accept is None:
        return None
    return acl_summary(spec.accept)


def _sends(info) -> str | None:
    """What the directory says this node may send the peer, as one short line; None: it said nothing."""
    return None if info.offers is None else acl_summary(info.offers)


def _online(peer) -> bool | None:
    return None if peer is None else peer.online

"""`meshwg join`: the node agent. One trio nursery owns everything; closing it removes everything.

Tasks: the mesh device (driver drain loops, UAPI, routes, birthday sockets, relay), the control
client (registration, directory, punch notices; reconnects with backoff by itself), the directory ->
netmap task, a punch watcher (sends the punch requests meshwg.mesh.punch_policy decides: traffic to a
relayed peer starting, a peer's candidates appearing or changing), a local-address watcher (re-STUN on
network change), the candidate reporter (what and when: punch_policy too), the netmap cache writer and the
status socket.

Outage tolerance: the data plane never waits on the control channel. While the server is down the
tunnels keep their paths; a restart with the server down brings up the cached netmap.
"""

from __future__ import annotations

import base64
import logging
import signal
import time

import trio

from meshwg.control import ControlClient, JoinRefusedError, ServerKeyMismatch, events as CE
from meshwg.signaling.invite import Invite, join_hostport, split_hostport
from meshwg.disco import netcheck as NC
from meshwg.io.agent import agent_state as S
from meshwg.io.ipc import status_server
from meshwg.io.agent.mesh_shell import MeshDevice, interface_addresses
from meshwg.mesh import node as N
from meshwg.mesh.netmap import PeerSpec
from meshwg.mesh.peer_entry import entry_policy, host_cidr, peer_spec
from meshwg.mesh.punch_policy import PUNCH_WATCH_INTERVAL, CandidateReport, PathState, PunchPolicy, local_candidates

log = logging.getLogger("meshwg.agent")

LOCAL_WATCH_INTERVAL = 10.0     # how often interface addresses are re-read (network change -> re-STUN)
CACHE_MIN_INTERVAL = 2.0
RECONNECT_BACKOFF_MAX = 8.0     # a returning server sees its nodes back within seconds


class AgentError(Exception):
    pass


def _peer_to_json(p) -> dict:
    return {"key": base64.b64encode(p.key).decode(), "id": p.node_id, "name": p.name, "ipv4": p.ipv4,
            "ipv6": p.ipv6, "candidates": [list(c) for c in p.candidates], "online": p.online}


def _peer_from_json(d: dict):
    return CE.PeerInfo(base64.b64decode(d["key"]), int(d.get("id", 0)), str(d["name"]), str(d["ipv4"]),
                       str(d["ipv6"]), tuple(tuple(c) for c in d.get("candidates", [])), bool(d.get("online")))


def _welcome_to_json(w) -> dict:
    return {"node_id": w.node_id, "name": w.name, "ipv4": w.ipv4, "ipv6": w.ipv6, "prefix4": w.prefix4,
            "prefix6": w.prefix6, "stun": [list(a) for a in w.stun], "relay_udp": [list(a) for a in w.relay_udp],
            "relay_tcp": [list(a) for a in w.relay_tcp], "heartbeat": w.heartbeat,
            "server_key": base64.b64encode(w.server_key).decode()}


def _welcome_from_json(d: dict):
    return CE.Welcome(int(d["node_id"]), str(d["name"]), str(d["ipv4"]), str(d["ipv6"]), str(d.get("prefix4", "")),
                      str(d.get("prefix6", "")), tuple(tuple(a) for a in d.get("stun", [])),
                      tuple(tuple(a) for a in d.get("relay_udp", [])), tuple(tuple(a) for a in d.get("relay_tcp", [])),
                      float(d.get("heartbeat", 10.0)), base64.b64decode(d["server_key"]))


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
                 status_dir: str = status_server.RUN_DIR, uapi_dir: str | None = None):
        self.invite = invite
        self.name = name
        self.state_dir = state_dir
        self.iface = iface
        self.listen_port = listen_port
        self.status_dir = status_dir
        self.uapi_dir = uapi_dir or status_dir
        self.dev: MeshDevice | None = None
        self.client: ControlClient | None = None
        self.welcome = None
        self.directory: dict[bytes, object] = {}
        self._specs: dict[bytes, PeerSpec] = {}  # peer_spec() of each directory entry, kept in step
        self.connected = False
        self.fatal: str | None = None
        self.started_wall = time.time()
        self._cand_dirty = trio.Event()
        self._cache_dirty = trio.Event()
        self._punch = PunchPolicy()
        self._cand_report = CandidateReport()
        self._cancel: trio.CancelScope | None = None

    # ---- main --------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        key = S.load_or_create_key(self.state_dir)
        cache = S.load_cache(self.state_dir)
        port = self.listen_port or int((cache or {}).get("listen_port", 0) or 0)
        self.dev = MeshDevice(self.iface, key, listen_port=port, uapi_dir=self.uapi_dir,
                              on_local_endpoints=lambda ev: self._cand_dirty.set())
        status = None
        try:
            status = status_server.StatusListener(self.dev.name, self.status_dir)
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.dev.run)
                    await nursery.start(status_server.serve, status, self.handle_query)
                    await self._refresh_local()
                    # A node with a cached netmap was admitted before: a server that looks wrong
                    # (another key, no record of us) is reported and retried, never obeyed.
                    self.client = ControlClient(self.invite, key, name=self.name, candidates=self._candidates(),
                                                backoff_max=RECONNECT_BACKOFF_MAX, registered=cache is not None)
                    nursery.start_soon(self._control_task)
                    if cache is not None:
                        log.info("bringing up %d cached peers while the server answers", len(cache["peers"]))
                        await self._apply_welcome(_welcome_from_json(cache["welcome"]), from_cache=True)
                        self.directory = {p.key: p for p in map(_peer_from_json, cache["peers"])}
                        await self._apply_directory()
                    nursery.start_soon(self._events_task)
                    nursery.start_soon(self._punch_watch)
                    nursery.start_soon(self._local_watch)
                    nursery.start_soon(self._candidate_reporter)
                    nursery.start_soon(self._cache_writer)
                    nursery.start_soon(self._signals)
                    nursery.start_soon(self._watch_device)
                    task_status.started(self)
        finally:
            if status is not None:
                status.close()
            self.dev.close()
        if self.fatal:
            raise AgentError(self.fatal)

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
        if self.fatal is None:
            self.stop("this node was removed from the mesh by the administrator")

    # ---- control events ----------------------------------------------------------------------
    async def _events_task(self) -> None:
        async for ev in self.client.events:
            if isinstance(ev, CE.Connected):
                reconnected = self.welcome is not None and not self.connected
                self.connected = True
                self.invite = self.client.invite  # registered: the client has forgotten the secret
                await self._apply_welcome(ev.welcome)
                if reconnected:
                    log.info("control connection back")
                    # The server (and its relay) may have restarted: without a fresh hello the relay
                    # drops what peers send us until the periodic hello, up to HELLO_INTERVAL later.
                    self.dev.relay.server_restarted()
                    await self.dev.driver.flush()
                self._cand_dirty.set()
            elif isinstance(ev, CE.Disconnected):
                self.connected = False
                log.warning("control connection lost (%s); tunnels keep running, reconnecting", ev.reason)
            elif isinstance(ev, CE.DirectoryReset):
                self.directory = dict(ev.peers)
                await self._apply_directory()
            elif isinstance(ev, CE.PeerChanged):
                old = self.directory.get(ev.peer.key)
                self.directory[ev.peer.key] = ev.peer
                await self._apply_directory(ev.peer.key)
                self._punch.peer_changed(ev.peer.key, ev.peer.online, ev.peer.candidates,
                                         None if old is None else (old.online, old.candidates))
            elif isinstance(ev, CE.PeerRemoved):
                self.directory.pop(ev.key, None)
                await self._apply_directory(ev.key)
                self._punch.peer_removed(ev.key)
            elif isinstance(ev, CE.PunchNotice):
                self.directory[ev.peer.key] = ev.peer  # the freshest candidates the server has
                await self._apply_directory(ev.peer.key)
                now = time.monotonic()
                self.dev.node.punch(ev.peer.key, now)
                self._punch.punched(ev.peer.key, now)
                await self.dev.driver.flush()
            elif isinstance(ev, CE.PunchFailed):
                log.debug("punch to %s failed: %s", ev.key[:4].hex(), ev.reason)
            elif isinstance(ev, CE.Removed):
                self.stop(f"this node was removed from the mesh ({ev.reason})")

    async def _apply_welcome(self, w, from_cache: bool = False) -> None:
        changed = self.welcome is None or w != self.welcome
        self.welcome = w
        if not changed:
            return
        self.dev.node.set_mesh_prefixes((w.prefix4, w.prefix6))   # no disco probe goes into the mesh
        addrs = [a for a in (host_cidr(w.ipv4), host_cidr(w.ipv6)) if a]
        await self.dev.set_addresses(addrs)
        now = time.monotonic()
        if tuple(w.stun) != self.dev.node.stun_servers:
            self.dev.node.set_stun_servers(w.stun, now)
        self.dev.relay.configure(w.server_key, w.relay_udp, w.relay_tcp)
        await self.dev.driver.flush()
        if not from_cache:
            log.info("joined as %s: %s", w.name, ", ".join(addrs))
            self._cache_dirty.set()

    async def _apply_directory(self, changed: bytes | None = None) -> None:
        """Hand the directory to the node. `changed`: the one key just set or removed, so only its spec
        is rebuilt (one event must not cost O(peers) spec parsing); None: the whole directory is new."""
        # Cached entries too: nothing outside the mesh prefixes, nor a server's address, is routed.
        policy = entry_policy(self.welcome, tuple(self.invite.addrs) if self.invite else ())
        drops = self.dev.node.counters
        if changed is None:
            self._specs = {k: peer_spec(p, policy, drops) for k, p in self.directory.items()}
        elif changed in self.directory:
            self._specs[changed] = peer_spec(self.directory[changed], policy, drops)
        else:
            self._specs.pop(changed, None)
        self.dev.node.apply_netmap(self._specs, time.monotonic())
        await self.dev.driver.flush()
        self._cache_dirty.set()

    # ---- background duties -------------------------------------------------------------------
    async def _punch_watch(self) -> None:
        """Send the punch requests the policy asks for (a relayed peer with traffic, new candidates)."""
        while True:
            await trio.sleep(PUNCH_WATCH_INTERVAL)
            now = time.monotonic()
            paths = {k: PathState(pp.active(now), pp.direct(now)) for k, pp in self.dev.node.paths.items()}
            for key in self._punch.tick(now, self.connected, paths, self._peer_online):
                await self.client.request_punch(key)

    def _peer_online(self, key: bytes) -> bool:
        peer = self.directory.get(key)
        return peer is not None and peer.online

    async def _refresh_local(self) -> bool:
        ips = await trio.to_thread.run_sync(interface_addresses, {self.dev.name})
        before = self.dev.node.iface_endpoints
        self.dev.node.set_local_endpoints([(ip, self.dev.port) for ip in ips], time.monotonic())
        return self.dev.node.iface_endpoints != before

    async def _local_watch(self) -> None:
        while True:
            await trio.sleep(LOCAL_WATCH_INTERVAL)
            if await self._refresh_local():
                log.info("local addresses changed: re-STUN")
                self.dev.node.restun(time.monotonic())
                await self.dev.driver.flush()

    def _candidates(self) -> list:
        node = self.dev.node
        return local_candidates(node.reflexive, node.iface_endpoints, node.local_nat)

    async def _candidate_reporter(self) -> None:
        while True:
            await self._cand_dirty.wait()
            self._cand_dirty = trio.Event()
            cands = self._candidates()
            self.client.candidates = list(cands)  # re-sent at every reconnect
            if self._cand_report.due(cands, self.connected):
                if await self.client.report_candidates(cands):
                    self._cand_report.accepted(cands)
            await trio.sleep(0.05)

    async def _cache_writer(self) -> None:
        while True:
            await self._cache_dirty.wait()
            self._cache_dirty = trio.Event()
            if self.welcome is not None:
                data = ([_peer_to_json(p) for p in self.directory.values()], _welcome_to_json(self.welcome))
                try:
                    await trio.to_thread.run_sync(self._write_cache, *data)
                except OSError as exc:
                    log.warning("cannot write the netmap cache: %s", exc)
            await trio.sleep(CACHE_MIN_INTERVAL)

    def _write_cache(self, peers, welcome) -> None:
        # The port too: peers' cached candidates stay right across a restart; and where the server is
        # (never the invite's secret), so a registered node restarts without its invite.
        S.save_cache(self.state_dir, welcome, peers, listen_port=self.dev.port,
                     control={"addrs": list(self.invite.addrs),
                              "server_key": base64.b64encode(self.invite.server_key).decode()})

    # ---- queries -----------------------------------------------------------------------------
    async def handle_query(self, req: dict) -> dict:
        op = req.get("op", "status")
        if op == "status":
            return self.status()
        if op == "netcheck":
            return await self.netcheck()
        return {"error": f"unknown op {op!r}"}

    def status(self) -> dict:
        now, wall = time.monotonic(), time.time()
        dev, node = self.dev, self.dev.node
        online = {k: p.online for k, p in self.directory.items()}
        peers = []
        for st in dev.peer_status(now):
            lh = st.get("last_handshake")
            peers.append({
                "name": st["name"], "public_key": base64.b64encode(st["public_key"]).decode(),
                "addresses": st["addresses"], "online": online.get(st["public_key"]),
                "path": st["path"], "endpoint": _fmt_addr(st["endpoint"]) if st["path"] == "direct" else None,
                "latency_ms": None if st["latency"] is None else round(st["latency"] * 1000, 3),
                "relay_reason": st["reason"] or None, "active": st["active"],
                "last_handshake": lh, "last_handshake_ago": None if not lh else round(wall - lh, 1),
                "rx_bytes": st["rx_bytes"], "tx_bytes": st["tx_bytes"],
                "relay_tx_packets": dev.relay.tx_by_peer.get(st["public_key"], 0),
                "candidates": [_fmt_addr(c) for c in st["candidates"]], "birthday": st["birthday"],
            })
        rep = node.last_report
        w = self.welcome
        return {
            "interface": dev.name, "name": w.name if w else self.name,
            "public_key": base64.b64encode(node.public_key).decode(),
            "addresses": list(dev.addresses), "listen_port": dev.port,
            "control": self._control_status(),
            "nat": {"mapping": rep.mapping if rep else None, "kind": node.local_nat,
                    "reflexive": [_fmt_addr(a) for a in node.reflexive]},
            "relay": dev.relay.status(),
            "routes": dev.route_status(),
            "local_endpoints": [_fmt_addr(a) for a in node.iface_endpoints],
            "drops": {**node.drops, **dev.device.drop_counts()},  # discovery's, then the device's
            "peers": sorted(peers, key=lambda p: p["name"]),
        }

    def _control_status(self) -> dict:
        c = self.client
        retry_at = c.retry_at if c else None
        return {"connected": self.connected, "servers": list(self.invite.addrs),
                "reconnects": c.reconnects if c else 0, "failures": c.failures if c else 0,
                "last_error": c.last_error if c else None, "error_kind": c.last_error_kind if c else None,
                "retry_in": None if retry_at is None else round(max(0.0, retry_at - trio.current_time()), 1)}

    async def netcheck(self) -> dict:
        """Re-STUN now on the shared socket and report the NAT's behaviour and the relay latency."""
        node = self.dev.node
        before = node.last_report
        node.restun(time.monotonic())
        await self.dev.driver.flush()
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

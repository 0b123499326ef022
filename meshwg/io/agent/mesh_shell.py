"""The mesh device: a MeshNode driven by the device shells (TUN, shared UDP socket, UAPI, driver).

The MeshNode has the core's shape (receive_datagram, send_ip_packet, handle_timer, get_timer and
the three outputs), so the stock Driver drives it: the drain loops, batching and timer stay the
device's. This module adds what only the mesh needs:
  * the driver classifies each datagram on the shared socket once (meshwg.mesh.demux.dispatch): relay
    frames go to the relay shell, WireGuard, discovery and STUN to the MeshNode's input for that kind;
  * datagrams whose endpoint is a RelayEndpoint go through the relay, SocketEndpoint ones out of
    the birthday sockets (one epoll fd for all of them, so 256 sockets cost one trio wait);
  * node events: OS routes in step with RoutesChanged (`ip -batch`, off the event loop), birthday
    sockets opened/closed, local endpoint changes handed to the agent;
  * routes kept in step with the kernel: re-checked on route/link events and every
    ROUTE_RECHECK_PERIOD, missing ones re-added, a prefix routed through another interface left
    alone with one warning (meshwg.io.oscfg.route_plan decides, meshwg.io.oscfg.rtnl reads the kernel).
The WireGuardCore stays the UAPI handler's core, so `wg show` sees the real peers and counters.
One clock, the driver's (`clock=`, time.monotonic by default), times every input of the node and the relay.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import collections
import subprocess
import time

import trio

from meshwg import logfmt
from meshwg.io.oscfg import route_plan, rtnl
from meshwg.io.ipc import uapi_server
from meshwg.io.dataplane.device import Device, new_core
from meshwg.io.agent.relay_shell import RelayShell
from meshwg.io.dataplane.tun import Tun
from meshwg.io.dataplane.udp import SO_MARK as udp_socket_mark, recv_batch
from meshwg.mesh import demux
from meshwg.mesh import node as N

log = logging.getLogger("meshwg.mesh")

BIRTHDAY_MAX_SOCKETS = 256
ROUTE_QUEUE = 256
# A route removed without an event (IPv4 flushes a downed link's routes silently) or an event lost
# to a full socket buffer is put back this late at most.
ROUTE_RECHECK_PERIOD = 10.0
# At most one event-triggered check per this many seconds: if another agent keeps deleting our
# route, we re-add it at this pace instead of flapping it as fast as the events come.
ROUTE_EVENT_HOLDOFF = 1.0
_RECHECK = object()  # queued with RoutesChanged: "compare the routes with the kernel now"


def ip_batch(lines: list[str], *, warn: bool = True) -> str:
    """Run `ip -force -batch -` (one process for many changes; -force: go on after an error)."""
    if not lines:
        return ""
    proc = subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True)
    if proc.returncode != 0 and warn:
        log.warning("ip -batch: %s", proc.stderr.strip())
    return proc.stderr if proc.returncode != 0 else ""


def _main_table(prefixes) -> set[str]:
    """The prefixes routed in the main table: all but the default routes of an exit node, which go through
    policy routing only (meshwg.io.oscfg.subnet_routes), so the node's own traffic never follows them."""
    out = {route_plan.normalise(n) for n in prefixes}
    return {p for p in out if not p.endswith("/0")}


def _dev_names(devs) -> str:
    names = []
    for index in sorted(devs):
        try:
            names.append(socket.if_indextoname(index))
        except OSError:
            names.append(f"ifindex {index}")
    return ", ".join(names) or "no interface (blackhole/unreachable)"


class BirthdaySockets:
    """Extra UDP sockets for birthday-paradox punching, indexed 1..n as the MeshNode numbers them."""

    def __init__(self):
        self.socks: dict[int, socket.socket] = {}
        self.owners: dict[int, set] = {}
        self.ep = select.epoll()
        self._by_fd: dict[int, int] = {}
        self.counters: collections.Counter = collections.Counter()
        self.fwmark = 0   # SO_MARK: punching traffic stays out of an exit node's tunnel

    def set_fwmark(self, fwmark: int) -> None:
        self.fwmark = fwmark
        for s in self.socks.values():
            try:
                s.setsockopt(socket.SOL_SOCKET, udp_socket_mark, fwmark)
            except OSError:
                pass

    def open(self, owner: bytes, count: int) -> None:
        for i in range(1, min(count, BIRTHDAY_MAX_SOCKETS) + 1):
            if i not in self.socks:
                try:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                    if self.fwmark:
                        s.setsockopt(socket.SOL_SOCKET, udp_socket_mark, self.fwmark)
                    s.bind(("0.0.0.0", 0))
                except OSError as exc:
                    log.warning("birthday: cannot open socket %d: %s", i, exc)
                    break
                self.socks[i] = s
                self._by_fd[s.fileno()] = i
                self.ep.register(s.fileno(), select.EPOLLIN)
                self.counters["open_socket"] += 1
            self.owners.setdefault(i, set()).add(owner)

    def close_for(self, owner: bytes, keep: tuple) -> None:
        for i in list(self.socks):
            if i in keep:
                continue
            users = self.owners.get(i, set())
            users.discard(owner)
            if not users:
                self._close(i)

    def _close(self, i: int) -> None:
        s = self.socks.pop(i)
        self.owners.pop(i, None)
        fd = s.fileno()
        self._by_fd.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        s.close()
        self.counters["close_socket"] += 1

    def send(self, i: int, data: bytes, addr) -> None:
        s = self.socks.get(i)
        if s is None:
            self.counters["drop_send_error"] += 1
            return
        try:
            s.sendto(data, addr)
        except OSError:
            self.counters["drop_send_error"] += 1

    def ready(self) -> list[tuple[int, socket.socket]]:
        out = []
        for fd, _ in self.ep.poll(0):
            i = self._by_fd.get(fd)
            if i is not None:
                out.append((i, self.socks[i]))
        return out

    def close(self) -> None:
        for i in list(self.socks):
            self._close(i)
        self.ep.close()


class MeshDevice:
    """Owns the TUN, the shared UDP socket(s), the UAPI socket, the MeshNode and the relay shell."""

    def __init__(self, iface: str, private_key: bytes, *, listen_port: int = 0, uapi_dir: str = uapi_server.RUN_DIR,
                 on_local_endpoints=None, clock=time.monotonic):
        self.tun = Tun.open(iface)
        try:
            self.listener = uapi_server.UapiListener(self.tun.name, uapi_dir)
        except BaseException:
            self.tun.close()
            raise
        self.core = new_core(self.tun, private_key)
        try:
            self.node = N.MeshNode(self.core, private_key, os.urandom, wall_offset=self.core.wall_offset)
            # UAPI reads the core and changes it through the node, its one writer; the driver runs the node.
            try:
                self.device = Device(self.tun, self.listener, listen_port=listen_port, core=self.core,
                                     driven=self.node, writer=self.node, clock=clock)
            except OSError:
                if not listen_port:
                    raise
                self.device = Device(self.tun, self.listener, listen_port=0, core=self.core, driven=self.node,
                                     writer=self.node, clock=clock)
        except BaseException:
            self.listener.close()
            self.tun.close()
            raise
        self.driver = self.device.driver
        self.clock = self.driver.clock
        self.driver.endpoint_sender = self._send_to_endpoint
        self.driver.on_event = self._on_event
        # flush_io, not flush: after_rx runs once per TCP-relayed packet (see meshwg.io.dataplane.driver).
        self.relay = RelayShell(private_key, udp_send=self.driver.send_raw, deliver=self._deliver_relayed,
                                after_rx=self.driver.flush_io, clock=self.clock, endpoint_type=N.RelayEndpoint,
                                endpoint_for=self._relay_endpoint_for, watch_tcp=self.driver.watch_relay_tcp,
                                unwatch_tcp=self.driver.unwatch_relay_tcp)
        # Relayed transport data on the driver's compiled send and batch receive (the relay shell's route; the
        # TCP relay's socket read by the driver's data loop too).
        self.driver.relay_route = self.relay.route
        self.driver.relay_tcp_writer = self.relay  # its TCP sends on the compiled path too, while it allows
        self.driver.set_datagram_handlers(self.datagram_handlers())
        self.birthday = BirthdaySockets()
        self.on_local_endpoints = on_local_endpoints
        self.on_user_ping = None   # the node's UserPingDone events (`meshwg ping`) go there
        # Called (sync) when a path changed, an idle peer got traffic or the interface MTU changed: what the agent
        # core reads after a batch and its punch policy's deadline (the agent ticks then instead of polling).
        self.on_news = None
        self.device.on_mtu_changed = self._news
        self._routes_send, self._routes_recv = trio.open_memory_channel(ROUTE_QUEUE)
        self._routes: set[str] = set()  # prefixes the node wants routed through this device
        self._mtus: dict[str, int] = {}  # ... and the MTU of those to relayed peers (set_route_mtus)
        self._ifindex = socket.if_nametoindex(self.tun.name)
        self._conflicts_warned: set[str] = set()
        self._path_kind: dict[bytes, str] = {}  # peer key -> "relay" | "direct": the kind its last path log named
        self._last_route_error = ""
        self._adding: set[str] = set()  # what the last check failed to add (or some of it)
        self.route_counters: collections.Counter = collections.Counter()
        self.addresses: list[str] = []
        self._closed = False

    @property
    def name(self) -> str:
        return self.tun.name

    @property
    def port(self) -> int:
        return self.device.udp.port

    # ---- driver hooks (sync, hot path) ---------------------------------------------------------
    def datagram_handlers(self) -> dict:
        """Where the driver sends each kind of datagram from the shared socket (WireGuard: the node's
        receive_wireguard, the driver's default; a kind with none is dropped and counted by the driver)."""
        return {demux.RELAY: self.relay.handle_udp, demux.DISCO: self.node.receive_disco,
                demux.STUN: self.node.receive_stun}

    def _deliver_relayed(self, src: bytes, packet: bytes) -> None:
        self.node.receive_relay(src, packet, self.clock())

    def _relay_endpoint_for(self, key: bytes):
        """The endpoint the core gets relayed transport data from `key` with (what receive_relay gives it), when
        `key` is a mesh peer's; None for anyone else (a plain peer's PLAIN_SOURCE, a key we do not know)."""
        return N.RelayEndpoint(key) if key in self.node.paths else None

    def _send_to_endpoint(self, data: bytes, ep) -> None:
        if isinstance(ep, N.RelayEndpoint):
            self.relay.send(ep.peer_key, data)
        elif isinstance(ep, N.SocketEndpoint):
            self.birthday.send(ep.socket, data, ep.addr)

    def _on_event(self, ev) -> None:
        if isinstance(ev, N.RoutesChanged):
            try:
                self._routes_send.send_nowait(ev)
            except trio.WouldBlock:
                log.error("route queue full: routes may lag until the next change")
        elif isinstance(ev, N.OpenBirthdaySockets):
            self.birthday.open(ev.peer_key, ev.count)
        elif isinstance(ev, N.CloseBirthdaySockets):
            self.birthday.close_for(ev.peer_key, ev.keep)
        elif isinstance(ev, N.PeersChanged):
            self.relay.forget_endpoints()
            self._path_kind = {k: v for k, v in self._path_kind.items() if k in self.node.paths}
        elif isinstance(ev, N.PathChanged):
            self._log_path(ev)
            if isinstance(ev.endpoint, N.RelayEndpoint):
                self.relay.refresh()
            self._news()
        elif isinstance(ev, N.PeerActive):
            self._news()
        elif isinstance(ev, N.LocalEndpointsChanged):
            if self.on_local_endpoints is not None:
                self.on_local_endpoints(ev)
        elif isinstance(ev, N.UserPingDone):
            if self.on_user_ping is not None:
                self.on_user_ping(ev)

    def _news(self) -> None:
        if self.on_news is not None:
            self.on_news()

    def _log_path(self, ev) -> None:
        """INFO when the path changes kind (relay <-> direct), DEBUG for a new address of the same kind."""
        kind = logfmt.endpoint_kind(ev.endpoint)
        level = logfmt.path_change_level(self._path_kind.get(ev.peer_key), kind)
        self._path_kind[ev.peer_key] = kind
        if not log.isEnabledFor(level):
            return
        spec = self.node.specs.get(ev.peer_key)
        relay = self.relay
        mode = relay.mode
        addr = relay.tcp_addrs[0] if mode == "tcp" and relay.tcp_addrs else relay.relay_addr
        where = logfmt.format_endpoint(ev.endpoint, ("tcp" if mode == "tcp" else "udp", addr))
        log.log(level, "peer %s: path -> %s (%s)", logfmt.peer_label(spec and spec.name, ev.peer_key), where,
                ev.reason)

    # ---- OS configuration ---------------------------------------------------------------------
    async def set_fwmark(self, fwmark: int) -> None:
        """SO_MARK on every socket of ours that talks outside the mesh: the shared UDP socket (WireGuard, STUN,
        disco, UDP relay), the birthday sockets and the TCP relay (the control client is the agent's)."""
        await self.driver.rebind(self.port, fwmark)
        self.birthday.set_fwmark(fwmark)
        self.relay.set_fwmark(fwmark)

    async def set_addresses(self, addresses: list[str]) -> None:
        """Put the node's mesh addresses (CIDR) on the interface and bring it up."""
        old, new = set(self.addresses), set(addresses)
        lines = [f"address del {a} dev {self.name}" for a in old - new]
        lines += [f"address replace {a} dev {self.name}{' nodad' if ':' in a else ''}"
                  for a in sorted(new - old)]
        lines.append(f"link set dev {self.name} up")
        await trio.to_thread.run_sync(ip_batch, lines)
        self.addresses = list(addresses)

    def set_route_mtus(self, mtus: dict[str, int]) -> None:
        """The MTU the routes to relayed peers carry (prefix -> mtu, meshwg.mesh.path_mtu); every other route of
        ours none. The route task applies it (the one writer of our routes), at a check asked for now."""
        self._mtus = {route_plan.normalise(p): m for p, m in mtus.items()}
        try:
            self._routes_send.send_nowait(_RECHECK)
        except trio.WouldBlock:
            pass  # a full queue is processed anyway, with a dump

    def _route_line(self, verb: str, prefix: str, mtu: int | None = None) -> str:
        """`route add|change PREFIX dev IFACE [mtu N]`; mtu None: the one set_route_mtus wants."""
        mtu = self._mtus.get(prefix, 0) if mtu is None else mtu
        return f"route {verb} {prefix} dev {self.name}" + (f" mtu {mtu}" if mtu else "")

    async def _route_task(self) -> None:
        """The only task changing routes: the node's changes, event-triggered and periodic checks."""
        while True:
            batch = []
            with trio.move_on_after(ROUTE_RECHECK_PERIOD):
                batch.append(await self._routes_recv.receive())
            # Coalesce whatever else is queued into one dump and one `ip` run.
            while True:
                try:
                    batch.append(self._routes_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            adds, removes = set(), set()
            for ev in batch:
                if ev is not _RECHECK:
                    a, r = _main_table(ev.add), _main_table(ev.remove)
                    adds = (adds - r) | a
                    removes = (removes - a) | r
            removes &= self._routes
            self._routes = (self._routes - removes) | adds
            if self._routes or removes:
                await self._sync_routes(removes, adds)

    async def _sync_routes(self, removes: set[str], fresh: set[str]) -> None:
        """Delete `removes` where they are ours, add every wanted route the kernel lacks."""
        try:
            found = await trio.to_thread.run_sync(rtnl.dump_routes)
        except OSError as exc:
            # Without a view of the kernel, do what the node asked (as before) and retry the check later.
            self.route_counters["fail_route_check"] += 1
            log.warning("route check: %s", exc)
            lines = [f"route del {p} dev {self.name}" for p in sorted(removes)]
            lines += [self._route_line("add", p) for p in sorted(fresh)]
            await trio.to_thread.run_sync(ip_batch, lines)
            return
        ours = {r.prefix for r in found if self._ifindex in r.devs and r.table == route_plan.MAIN_TABLE}
        plan = route_plan.plan(self._routes, found, self._ifindex, mtus=self._mtus)
        # Re-added: ours before and gone now (not new, nor a prefix another interface just released,
        # nor one whose add failed last time, e.g. on a downed link: counted and logged once).
        restored = [p for p in plan.add
                    if p not in fresh and p not in self._conflicts_warned and p not in self._adding]
        self._warn_conflicts(plan.conflicts)
        # `add`, never `replace`: if someone routed the prefix since the dump, theirs stays.
        # In batch mode the family follows from the prefix (a "-4"/"-6" word is not accepted).
        lines = [f"route del {p} dev {self.name}" for p in sorted(removes & ours)]
        lines += [self._route_line("add", p) for p in plan.add]
        # `change` (never creates): a route deleted since the dump stays deleted. Without `mtu` it drops the metric.
        lines += [self._route_line("change", p, mtu) for p, mtu in plan.retune]
        self.route_counters["set_route_mtu"] += len(plan.retune)
        if restored:
            log.warning("routes through %s were removed by someone else; adding them back: %s",
                        self.name, " ".join(restored))
        self.route_counters["add_route"] += len(plan.add)
        self.route_counters["restore_route"] += len(restored)
        error = await trio.to_thread.run_sync(functools.partial(ip_batch, lines, warn=False))
        # The same failure every period (e.g. the link is down) is logged once.
        if error and error != self._last_route_error:
            log.warning("ip -batch: %s", error.strip())
        self._last_route_error = error
        self._adding = set(plan.add) if error else set()

    def route_status(self) -> dict:
        """For `meshwg status`: what the route task did, and the prefixes another interface holds."""
        c = self.route_counters
        return {"added": c["add_route"], "restored": c["restore_route"], "conflicts": c["warn_route_conflict"],
                "check_errors": c["fail_route_check"], "conflicting": sorted(self._conflicts_warned)}

    def _warn_conflicts(self, conflicts: tuple) -> None:
        """One warning per prefix while another interface holds it (again if it is lost and retaken)."""
        current = {prefix for prefix, _ in conflicts}
        for prefix, route in conflicts:
            if prefix not in self._conflicts_warned:
                self.route_counters["warn_route_conflict"] += 1
                log.warning("%s is routed through %s, not %s: leaving that route alone; the peer "
                            "owning it is unreachable at that prefix", prefix, _dev_names(route.devs), self.name)
        self._conflicts_warned = current

    async def _route_watch_task(self) -> None:
        """Ask the route task for a check when the kernel's routes for our prefixes or our link change."""
        try:
            sock = rtnl.event_socket()
        except OSError as exc:
            log.warning("no route events (%s): routes are checked every %.0f s only", exc, ROUTE_RECHECK_PERIOD)
            return
        with sock:
            while True:
                await trio.lowlevel.wait_readable(sock)
                if self._route_events_concern_us(sock):
                    try:
                        self._routes_send.send_nowait(_RECHECK)
                    except trio.WouldBlock:
                        pass  # a full queue is processed anyway, with a dump
                    await trio.sleep(ROUTE_EVENT_HOLDOFF)

    def _route_events_concern_us(self, sock: socket.socket) -> bool:
        hit = False
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return hit
            except OSError:
                return True  # ENOBUFS: events were lost; check
            hit = hit or rtnl.concerns(data, self._routes, self._ifindex)

    async def _birthday_task(self) -> None:
        node, flush = self.node, self.driver.flush
        while True:
            await trio.lowlevel.wait_readable(self.birthday.ep.fileno())
            for i, sock in self.birthday.ready():
                try:
                    datagrams = recv_batch(sock, 64, False)  # birthday sockets are IPv4
                except OSError:
                    continue
                now = self.clock()
                for data, addr in datagrams:
                    node.receive_datagram(data, addr, now, via=i)
            await flush()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.device.run)
            nursery.start_soon(self._route_task)
            nursery.start_soon(self._route_watch_task)
            nursery.start_soon(self._birthday_task)
            nursery.start_soon(self.relay.run)
            task_status.started()
            await self.device.stopped.wait()
            nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Remove the interface, the sockets and the UAPI socket (closing the TUN deletes its routes)."""
        if self._closed:
            return
        self._closed = True
        self.birthday.close()
        self.device.close()

    def peer_status(self, now: float) -> list[dict]:
        return self.node.status(now)

    def component_counters(self) -> dict:
        """Every counter of the mesh device by component, for meshwg.counters.merge (`meshwg status`)."""
        return {**self.node.component_counters(), **self.device.component_counters(), "relay": self.relay.counters,
                "routes": self.route_counters, "birthday": self.birthday.counters}

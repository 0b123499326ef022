"""One userspace WireGuard device: the core plus its TUN, UDP, driver and UAPI shells.

The Device is the UAPI handler: it turns a parsed `set` request (meshwg.config.uapi) into core
calls, and a snapshot of the core into a `get` reply. The mesh layer can reach the driver hooks
through `device.driver` (see meshwg.io.dataplane.driver).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import time

import trio

from meshwg import counters
from meshwg.config import uapi
from meshwg.config.uapi_apply import CoreWriter
from meshwg.io.ipc import uapi_server
from meshwg.io.oscfg import netlink_events as NE
from meshwg.io.dataplane.driver import Driver
from meshwg.io.dataplane.tun import Tun
from meshwg.io.dataplane.udp import UdpBind
from meshwg.wg.device import WireGuardCore

log = logging.getLogger(__name__)
MTU_POLL_INTERVAL = 2.0  # seconds, without link events; the MTU only shapes padding, so a change may take effect late
MTU_FALLBACK_INTERVAL = 60.0  # with link events (an MTU change is an RTM_NEWLINK): read anyway this often (a lost event)
# A benchmark knob (benchmarks/throughput --policy): a JSON accept list [[proto, lo, hi, cidr], ...] that every
# peer of a plain device gets after each UAPI set (issue 13's filter, meshwg.wg.acl). The stock `wg` that configures
# meshwg-tun has no field for one; unset (the default), no peer has a filter.
DEBUG_ACCEPT_ENV = "MESHWG_DEBUG_ACCEPT"


def new_core(tun: Tun, private_key: bytes | None = None) -> WireGuardCore:
    """A core for a device on `tun`: the TUN's MTU, OS randomness, the wall clock's offset from the
    monotonic one, and a random index tag for the socket filter."""
    try:
        mtu = tun.get_mtu()
    except OSError:
        mtu = 1420
    return WireGuardCore(private_key=private_key, random_bytes=os.urandom, wall_offset=time.time() - time.monotonic(),
                         mtu=mtu, index_tag=int.from_bytes(os.urandom(2), "little"))


def _open_link_events():
    """Link events only (an MTU change is an RTM_NEWLINK): address changes do not wake the follower."""
    return NE.open_socket(NE.RTMGRP_LINK)


class Device:
    def __init__(self, tun: Tun, listener: uapi_server.UapiListener | None, *, listen_port: int = 0,
                 core: WireGuardCore | None = None, driven=None, writer=None, clock=time.monotonic):
        """UAPI reads `core` and changes it through its one writer, `writer` (default: a CoreWriter; a mesh
        node for a mesh device); the driver drives `driven` (default: the core), e.g. a mesh node wrapping it. The socket filter gets the core's index tag either way. `clock` is the
        device's one clock (the driver's; UAPI changes are timed with it too)."""
        self.tun = tun
        self.listener = listener
        self.core = core or new_core(tun)
        self.writer = writer or CoreWriter(self.core)
        text = os.environ.get(DEBUG_ACCEPT_ENV) if writer is None else None
        self._debug_accept = json.loads(text) if text else None
        self.udp = UdpBind()
        self.udp.open(listen_port)
        self.driver = Driver(self.core if driven is None else driven, tun, self.udp, clock=clock,
                             index_tag=self.core.index_tag)
        self.stopped = trio.Event()
        self.stop_reason: str | None = None
        self._cancel = trio.CancelScope()
        self.on_mtu_changed = None  # called (sync) after the core took a new MTU (the mesh agent re-reads it)

    @property
    def name(self) -> str:
        return self.tun.name

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._cancel:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.driver.run)
                    if self.listener is not None:
                        await nursery.start(uapi_server.serve, self.listener, self)
                    nursery.start_soon(self._follow_mtu)
                    task_status.started()
                    await self._watch_driver()
                    nursery.cancel_scope.cancel()
            finally:
                self.stop(self.driver.stopped_reason or "stopped")

    async def _follow_mtu(self, open_events=None) -> None:
        """The core pads to the interface's MTU, which wg-quick and `meshwg up` set after the device
        started (and `ip link set mtu` may change any time): follow it, as wireguard-go does. Read again on the
        kernel's link events (debounced), with a slow periodic read as a safety net; every MTU_POLL_INTERVAL
        where netlink is unavailable. open_events: a link-event socket opener (tests); default netlink's."""
        sock = (open_events or _open_link_events)()
        period = MTU_POLL_INTERVAL if sock is None else MTU_FALLBACK_INTERVAL
        news = [trio.Event()]
        with sock if sock is not None else contextlib.nullcontext():
            async with trio.open_nursery() as nursery:
                if sock is not None:
                    nursery.start_soon(NE.watch, sock, lambda: news[0].set())
                while self._read_mtu():
                    with trio.move_on_after(period):
                        await news[0].wait()
                    news[0] = trio.Event()
                nursery.cancel_scope.cancel()

    def _read_mtu(self) -> bool:
        """The interface's MTU into the core; False once the interface is gone (the driver notices and stops)."""
        try:
            mtu = self.tun.get_mtu()
        except OSError:
            return False
        if mtu != self.core.mtu:
            log.info("%s: MTU %d", self.name, mtu)
            self.core.mtu = mtu
            if self.on_mtu_changed is not None:
                self.on_mtu_changed()
        return True

    async def _watch_driver(self) -> None:
        # The driver stops on its own only when the TUN goes away (`ip link del`).
        await self.driver.stopped.wait()
        log.info("%s: %s", self.name, self.driver.stopped_reason)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._cancel.cancel()
        self.stopped.set()

    def close(self) -> None:
        """Remove everything: UAPI socket file, UDP sockets, the TUN (closing it deletes the interface)."""
        if self.listener is not None:
            self.listener.close()
        self.udp.close()
        self.tun.close()

    def component_counters(self) -> dict[str, collections.Counter]:
        """Every counter of the device by component, in meshwg.counters' convention, for counters.merge:
        the core's drops, the driver's, TUN writes the kernel refused, and what the kernel dropped on our
        UDP sockets (junk refused by the socket filter, or a full receive buffer)."""
        return {"core": counters.as_drops(self.core.drops), "driver": self.driver.counters,
                "tun": collections.Counter(drop_write=self.tun.write_drops),
                "socket": collections.Counter(drop_kernel=self.udp.kernel_drops())}

    # The older drop view's names for the keys that had other ones (meshwg-tun's log, `meshwg status`).
    _LEGACY_DROP_NAMES = {"tun.drop_write": "tun_write", "socket.drop_kernel": "socket",
                          "driver.drop_send_error": "send_error", "driver.drop_send_no_socket": "send_no_socket",
                          "driver.drop_send_no_sender": "send_no_sender",
                          "driver.drop_send_raw_error": "send_raw_error", "driver.disable_gso": "gso_disabled"}

    def drop_counts(self) -> dict[str, int]:
        """Older view of the device's drops, kept for meshwg-tun's log: the
        core's reasons as they are (`unknown_index`), then the others under their former names
        (`tun_write`, `socket`, `send_error`, ...; the driver's other drops as named in its counters)."""
        counts = {k: v for k, v in self.core.drops.items() if v}
        merged = counters.merge({k: v for k, v in self.component_counters().items() if k != "core"})
        drops = counters.drops(merged)
        for key, n in merged.items():
            if key in self._LEGACY_DROP_NAMES:
                counts[self._LEGACY_DROP_NAMES[key]] = n
            elif key in drops:
                counts[key.partition(".")[2]] = n
        return counts

    # ---- UAPI handler ----------------------------------------------------------------------
    def uapi_get(self) -> str:
        return uapi.format_get_response(self.snapshot())

    def snapshot(self) -> uapi.DeviceSnapshot:
        peers = []
        for peer in self.core.peers.values():
            sec, nsec = uapi.handshake_time(peer.last_handshake_wall)
            endpoint = peer.endpoint if isinstance(peer.endpoint, tuple) else None
            peers.append(uapi.PeerSnapshot(
                public_key=peer.public_key, preshared_key=peer.preshared_key, endpoint=endpoint,
                last_handshake_time_sec=sec, last_handshake_time_nsec=nsec,
                tx_bytes=peer.tx_bytes, rx_bytes=peer.rx_bytes,
                persistent_keepalive_interval=peer.persistent_keepalive, allowed_ips=peer.allowed_ips))
        return uapi.DeviceSnapshot(private_key=self.core.private_key, listen_port=self.udp.port,
                                   fwmark=self.udp.fwmark, peers=peers)

    async def uapi_set(self, lines) -> int:
        """Apply a `set` request; 0 or a negative errno. A request that does not parse changes nothing."""
        try:
            request = uapi.parse_set_request_untrusted(lines, own_public_key=self.core.public_key)
        except uapi.UapiError as err:
            log.warning("uapi set: %s", err)
            return err.errno
        try:
            await self.apply(request)
        except OSError as err:
            log.warning("uapi set: %s", err)
            return -(err.errno or errno.EIO)
        except ValueError as err:
            log.warning("uapi set: %s", err)
            return uapi.EINVAL
        finally:
            await self.driver.flush()
        return 0

    async def apply(self, request: uapi.SetRequest) -> None:
        # The writer first: a request it refuses (ValueError) changes nothing, the socket included. What it
        # queues (a keepalive turned on) leaves at the flush after the rebind, from the new socket.
        self.writer.apply_set_request(request, self.driver.clock())
        if self._debug_accept is not None:
            for peer in self.core.peers.values():
                self.core.set_peer_accept(peer, self._debug_accept)
        if request.listen_port is not None or request.fwmark is not None:
            port = self.udp.port if request.listen_port is None else request.listen_port
            await self.driver.rebind(port, request.fwmark)

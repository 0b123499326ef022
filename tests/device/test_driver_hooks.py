"""The driver with a fake core, a socketpair as the TUN and loopback UDP: batching, hooks, timer, rebind."""

from __future__ import annotations

import math
import socket
from types import SimpleNamespace

import pytest
import trio

from meshwg.io.dataplane.device import Device
from meshwg.io.dataplane.driver import Driver
from meshwg.io.dataplane.tun import Tun
from meshwg.io.dataplane.udp import UdpBind
from meshwg.mesh import demux


class FakeCore:
    """Echo core: a TUN packet goes to `peer_addr` prefixed with a type-4 header; a type-4 datagram
    comes out of the TUN without it. One timer deadline that sends b"tick" when due."""

    on_earlier_deadline = None  # the driver's hook (meshwg.wg.driven.DrivenCore); this core never calls it

    def __init__(self, peer_addr):
        self.peer_addr = peer_addr
        self.out, self.tun, self.events = [], [], []
        self.received = []
        self.timer = math.inf
        self.ticks = 0

    def send_ip_packet(self, pkt, now):
        self.out.append((b"\x04\0\0\0" + pkt, self.peer_addr))

    def receive_datagram(self, data, addr, now):
        self.received.append((data, addr))
        self.tun.append(data[4:])

    receive_wireguard = receive_datagram

    def handle_timer(self, now):
        if now >= self.timer:
            self.timer = math.inf
            self.ticks += 1
            self.out.append((b"\x04\0\0\0tick", self.peer_addr))

    def datagrams_to_send(self):
        out, self.out = self.out, []
        return out

    def tun_packets_to_write(self):
        out, self.tun = self.tun, []
        return out

    def pop_events(self):
        out, self.events = self.events, []
        return out

    def get_timer(self):
        return self.timer


@pytest.fixture
def rig():
    """A far UDP end on loopback, a socketpair standing in for the TUN (test_side is the kernel's end),
    and the device's UDP sockets."""
    far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    far.bind(("127.0.0.1", 0))
    far.settimeout(5)
    tun_side, test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = UdpBind()
    udp.open(0)
    yield SimpleNamespace(far=far, tun=Tun.from_fd(tun_side.fileno(), "fake0"), test_side=test_side, udp=udp)
    udp.close()
    for sock in (far, tun_side, test_side):
        sock.close()


async def test_driver_moves_packets_and_calls_hooks(rig):
    far, test_side, udp = rig.far, rig.test_side, rig.udp
    core = FakeCore(far.getsockname())
    driver = Driver(core, rig.tun, udp, clock=trio.current_time, batch=8)
    others, relayed = [], []
    driver.set_datagram_handlers({demux.STUN: lambda data, addr, now: others.append((data, addr))})
    driver.endpoint_sender = lambda data, ep: relayed.append((data, ep))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(driver.run)
        # TUN -> core -> UDP, more packets than one batch.
        for i in range(20):
            test_side.send(b"pkt%02d" % i)
        got = [await trio.to_thread.run_sync(far.recvfrom, 100) for _ in range(20)]
        assert [d for d, _ in got] == [b"\x04\0\0\0pkt%02d" % i for i in range(20)]
        assert got[0][1][1] == udp.port
        # UDP -> core -> TUN; STUN goes to its handler instead of the core.
        # (Shaped to pass the socket filter: a transport message is >= 32 bytes, STUN has its cookie;
        # the junk in between is dropped by the kernel and reaches neither.)
        hello = b"hello".ljust(28, b".")
        stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"transaction!"
        far.sendto(b"\x04\0\0\0" + hello, ("127.0.0.1", udp.port))
        far.sendto(b"\x00\x01 junk", ("127.0.0.1", udp.port))
        far.sendto(stun, ("127.0.0.1", udp.port))
        with trio.fail_after(5):
            while True:
                try:
                    assert test_side.recv(100, socket.MSG_DONTWAIT) == hello
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
            while not others:
                await trio.sleep(0.01)
        assert others == [(stun, far.getsockname())]
        assert len(core.received) == 1
        # Raw datagrams share the socket; non-tuple endpoints use the pluggable sender.
        assert driver.send_raw(b"raw", far.getsockname())
        assert far.recvfrom(100) == (b"raw", ("127.0.0.1", udp.port))
        core.out.append((b"\x04\0\0\0via-relay", "relay:peer1"))
        await driver.flush()
        assert relayed == [(b"\x04\0\0\0via-relay", "relay:peer1")]
        # A timer set by control code is re-armed by flush() and fires.
        core.timer = trio.current_time() + 0.05
        await driver.flush()
        assert (await trio.to_thread.run_sync(far.recvfrom, 100))[0] == b"\x04\0\0\0tick"
        assert core.ticks == 1
        # Rebinding moves the socket; traffic continues from the new port.
        old = udp.port
        await driver.rebind(0)
        assert udp.port != old
        test_side.send(b"after")
        data, addr = await trio.to_thread.run_sync(far.recvfrom, 100)
        assert data == b"\x04\0\0\0after" and addr[1] == udp.port
        nursery.cancel_scope.cancel()


async def test_driver_stops_when_tun_disappears():
    tun_side, test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = UdpBind()
    udp.open(0)
    driver = Driver(FakeCore(("127.0.0.1", 9)), Tun.from_fd(tun_side.fileno(), "fake1"), udp, clock=trio.current_time)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(driver.run)
                test_side.close()  # reads now hit end of file: the driver stops by itself
        assert driver.stopped_reason == "tun closed"
        assert driver.stopped.is_set()
    finally:
        udp.close()
        tun_side.close()


async def test_device_drives_what_it_is_given_and_serves_the_core():
    """A mesh device hands Device its node: one driver, on the node, with the core's index tag."""
    tun_side, test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    node = FakeCore(("127.0.0.1", 9))
    device = Device(Tun.from_fd(tun_side.fileno(), "fake2"), None, driven=node)
    plain = Device(Tun.from_fd(test_side.fileno(), "fake3"), None)
    try:
        assert device.driver.core is node and device.core is not node
        assert device.driver.index_tag == device.core.index_tag
        assert plain.driver.core is plain.core
    finally:
        device.udp.close()
        plain.udp.close()
        tun_side.close()
        test_side.close()


class DeadlineCore(FakeCore):
    """A core that can create a near deadline from a packet input (as the mesh node defers a
    handshake re-send), announced through on_earlier_deadline, which the driver sets."""

    on_earlier_deadline = None

    def defer(self, delay: float) -> None:
        self.timer = trio.current_time() + delay
        if self.on_earlier_deadline is not None:
            self.on_earlier_deadline(self.timer)


async def test_a_deadline_announced_by_the_core_rearms_the_timer_at_once(rig):
    """Without a flush() (packet inputs are flushed with flush_io, which does not re-read the
    O(peers) timer) the deadline still fires on time, not at the timer task's next 1 s wake-up."""
    core = DeadlineCore(rig.far.getsockname())
    driver = Driver(core, rig.tun, rig.udp, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(driver.run)
        await trio.sleep(0.1)  # the timer task now sleeps its full TIMER_MAX_SLEEP
        start = trio.current_time()
        core.defer(0.05)
        assert (await trio.to_thread.run_sync(rig.far.recvfrom, 100))[0] == b"\x04\0\0\0tick"
        assert trio.current_time() - start < 0.4
        nursery.cancel_scope.cancel()


class MtuTun:
    """Just enough of a Tun for Device: its MTU, which the test changes, then removes."""

    def __init__(self, mtu: int):
        self.mtu, self.name, self.fd, self.write_drops = mtu, "fake0", -1, 0

    def get_mtu(self) -> int:
        if self.mtu is None:
            raise OSError("no such device")
        return self.mtu

    def close(self) -> None:
        pass


async def test_the_core_follows_the_interface_mtu(autojump_clock):
    """wg-quick and `meshwg up` set the MTU after the device started; the core pads to the current one."""
    tun = MtuTun(1420)
    device = Device(tun, None)
    try:
        assert device.core.mtu == 1420
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device._follow_mtu)
            tun.mtu = 1280
            await trio.sleep(5)
            assert device.core.mtu == 1280
            tun.mtu = None  # the interface went away: the follower ends, the core keeps its last MTU
            await trio.sleep(5)
        assert device.core.mtu == 1280
    finally:
        device.udp.close()


def test_drop_counts_gather_the_core_the_tun_and_the_driver():
    """What meshwg-tun logs and `meshwg status` shows: every dropped packet by reason, in one place."""
    tun = MtuTun(1420)
    device = Device(tun, None)
    try:
        assert device.drop_counts() == {}
        device.core.receive_datagram(b"\x04\0\0\0" + bytes(40), ("198.51.100.9", 4000), 1.0)
        tun.write_drops = 2
        device.driver.counters["drop_send_error"] += 3
        assert device.drop_counts() == {"unknown_index": 1, "tun_write": 2, "send_error": 3}
        # The same, in meshwg.counters' convention, by component.
        from meshwg import counters
        assert counters.merge(device.component_counters()) == {
            "core.drop_unknown_index": 1, "tun.drop_write": 2, "driver.drop_send_error": 3}
    finally:
        device.udp.close()


async def test_each_datagram_reaches_its_kinds_handler_once_and_unhandled_kinds_are_counted(rig):
    """Through the real socket (and its kernel filter): WireGuard to the core, STUN and relay frames to
    their handlers with the driver's `now`, discovery (no handler) dropped and counted by the driver."""
    core = FakeCore(rig.far.getsockname())
    driver = Driver(core, rig.tun, rig.udp, clock=lambda: 42.0)
    got = []
    driver.set_datagram_handlers({kind: (lambda k: lambda data, addr, now: got.append((k, data, now)))(kind)
                                  for kind in (demux.STUN, demux.RELAY)})
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"transaction!"
    relay = b"\xffMWR" + bytes(20)
    disco = b"MWDsco" + bytes(60)
    transport = b"\x04\0\0\0" + b"data".ljust(28, b".")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(driver.run)
        for data in (stun, transport, relay, disco):
            rig.far.sendto(data, ("127.0.0.1", rig.udp.port))
        with trio.fail_after(5):
            while len(got) < 2 or not core.received or not driver.counters["drop_disco_datagram"]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got == [(demux.STUN, stun, 42.0), (demux.RELAY, relay, 42.0)]
    assert [data for data, _ in core.received] == [transport]
    assert driver.counters["drop_disco_datagram"] == 1


def test_datagram_handlers_name_known_kinds_only():
    udp = UdpBind()
    try:
        driver = Driver(FakeCore(("127.0.0.1", 9)), None, udp)
        with pytest.raises(ValueError):
            driver.set_datagram_handlers({"wireguard ": lambda data, addr, now: None})
    finally:
        udp.close()

"""Issue 15, idle cost: the driver's timer sleeps until the core's deadline while no packet flows (re-armed by the
next packet batch), and the device follows its interface's MTU from link events instead of a 2 s poll."""

from __future__ import annotations

import math
import socket
import struct

import trio

from meshwg.io.dataplane.device import Device
from meshwg.io.dataplane.driver import Driver
from test_driver_hooks import FakeCore, MtuTun, rig  # noqa: F401  (the fixture)


class CountingCore(FakeCore):
    """Counts how often the driver reads its deadline; a TUN packet makes a deadline 1.5 s ahead that it
    announces to nobody (as WireGuard's data path does: keepalive, rekey; all >= 1 s ahead)."""

    def __init__(self, peer_addr):
        super().__init__(peer_addr)
        self.reads = 0
        self.fired_at: list[float] = []

    def get_timer(self):
        self.reads += 1
        return self.timer

    def send_ip_packet(self, pkt, now):
        super().send_ip_packet(pkt, now)
        self.timer = now + 1.5

    def handle_timer(self, now):
        if now >= self.timer:
            self.fired_at.append(now)
        super().handle_timer(now)


async def test_an_idle_driver_sleeps_until_the_deadline_and_a_packet_rearms_it(rig, autojump_clock):  # noqa: F811
    core = CountingCore(rig.far.getsockname())
    driver = Driver(core, rig.tun, rig.udp, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(driver.run)
        core.timer = trio.current_time() + 30.0
        await driver.flush()                        # re-arms the timer task: it reads the deadline once
        await trio.sleep(0.5)
        reads = core.reads
        await trio.sleep(29.0)
        assert core.reads == reads                  # not woken once in 29 s (the old cap: every second)
        await trio.sleep(1.0)
        assert len(core.fired_at) == 1              # ... and woken at the deadline
        await trio.sleep(60.0)                      # no deadline at all: asleep
        reads = core.reads
        await trio.sleep(60.0)
        assert core.reads == reads
        start = trio.current_time()
        rig.test_side.send(b"pkt")                  # a packet: the core's new deadline, 1.5 s ahead, unannounced
        await trio.sleep(5.0)
        assert len(core.fired_at) == 2
        assert core.fired_at[1] <= start + 1.5 + 1.0 + 1e-6   # found within the 1 s the cap gave before
        nursery.cancel_scope.cancel()


def newlink() -> bytes:
    """An RTM_NEWLINK message (nlmsghdr + an empty ifinfomsg), as the kernel sends on `ip link set mtu`."""
    return struct.pack("=IHHII", 32, 16, 0, 0, 0) + bytes(16)


async def test_the_core_follows_the_mtu_on_a_link_event_and_polls_no_more(autojump_clock):
    tun = MtuTun(1420)
    device = Device(tun, None)
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    reads, get_mtu = [], tun.get_mtu
    tun.get_mtu = lambda: (reads.append(trio.current_time()), get_mtu())[1]
    changed = []
    device.on_mtu_changed = lambda: changed.append(device.core.mtu)
    try:
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device._follow_mtu, lambda: ours)
                await trio.sleep(50.0)
                assert len(reads) == 1              # the first read only: no 2 s poll while events come
                tun.mtu = 1280
                t0 = trio.current_time()
                kernel.send(newlink())
                await trio.sleep(1.0)
                assert device.core.mtu == 1280 and changed == [1280]
                assert reads[-1] <= t0 + 1.0
                tun.mtu = None                      # the interface went away: the follower ends
                kernel.send(newlink())
        assert device.core.mtu == 1280
    finally:
        kernel.close()
        device.udp.close()


async def test_without_link_events_the_mtu_is_polled_every_2_s(autojump_clock):
    tun = MtuTun(1420)
    device = Device(tun, None)
    try:
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device._follow_mtu, lambda: None)
                await trio.sleep(10.0)
                tun.mtu = 1280
                await trio.sleep(2.0 + 1e-3)
                assert device.core.mtu == 1280
                tun.mtu = None
        assert device.core.mtu == 1280
    finally:
        device.udp.close()


def test_nothing_else_sleeps_with_a_1_s_cap():
    """The driver's idle fast path blocks until trio's next deadline; its cap is a safety net, not a tick."""
    from meshwg.io.dataplane import driver
    assert driver.IDLE_BLOCK_MAX >= 10.0
    assert math.isfinite(driver.IDLE_BLOCK_MAX)

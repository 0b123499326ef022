"""The driver's contract with its core (meshwg.wg.driven.DrivenCore): both cores it drives implement every
member with a signature the driver can call, a core missing one is caught, and the driver touches exactly
the contract's members, binding the per-packet ones once per run."""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import os
import socket

import pytest
import trio

from meshwg.io.dataplane.driver import Driver
from meshwg.mesh import demux
from meshwg.mesh.node import MeshNode
from meshwg.wg.device import WireGuardCore
from meshwg.wg.driven import DrivenCore
from test_driver_hooks import FakeCore, rig  # noqa: F401  (rig: a fixture; tests/device is on sys.path)

# The contract as the driver uses it, spelled out: a member added to or dropped from DrivenCore must be
# reflected here (and in docs/core-api.md).
MEMBERS = {"on_earlier_deadline", "receive_datagram", "receive_wireguard", "send_ip_packet", "handle_timer",
           "datagrams_to_send", "tun_packets_to_write", "pop_events", "get_timer"}
WG_TRANSPORT = b"\x04\0\0\0" + bytes(44)  # transport-shaped: passes the socket filter (no index tag)


def protocol_members(proto) -> tuple[set[str], dict[str, inspect.Signature]]:
    """(data members, {method: signature without self}) declared by a Protocol class."""
    data = set(proto.__annotations__)
    methods = {name: inspect.signature(fn).replace(parameters=list(inspect.signature(fn).parameters.values())[1:])
               for name, fn in vars(proto).items() if inspect.isfunction(fn) and not name.startswith("_")}
    return data, methods


def contract_gaps(core, proto=DrivenCore) -> list[str]:
    """What `core` lacks of `proto`: missing members, non-callable methods, methods the driver's positional
    call (one argument per protocol parameter) cannot bind to, a hook that is neither None nor callable.
    Deeper than isinstance() on a runtime_checkable Protocol, which only asks whether each name exists."""
    data, methods = protocol_members(proto)
    gaps = []
    for name in sorted(data):
        if not hasattr(core, name):
            gaps.append(f"{name}: missing")
        elif not (getattr(core, name) is None or callable(getattr(core, name))):
            gaps.append(f"{name}: neither None nor callable")
    for name, want in sorted(methods.items()):
        impl = getattr(core, name, None)
        if impl is None:
            gaps.append(f"{name}: missing")
            continue
        if not callable(impl):
            gaps.append(f"{name}: not callable")
            continue
        try:
            inspect.signature(impl).bind(*want.parameters)
        except TypeError as exc:
            gaps.append(f"{name}: cannot be called as {name}{want}: {exc}")
    return gaps


class Recording:
    """Forwards to a core and counts every attribute the driver reads or sets on it."""

    def __init__(self, core):
        object.__setattr__(self, "_core", core)
        object.__setattr__(self, "touched", collections.Counter())

    def __getattr__(self, name):
        self.touched[name] += 1
        return getattr(self._core, name)

    def __setattr__(self, name, value):
        self.touched[name] += 1
        setattr(self._core, name, value)


def test_the_contract_is_what_the_driver_uses():
    data, methods = protocol_members(DrivenCore)
    assert data | set(methods) == MEMBERS


def test_the_plain_core_implements_the_contract():
    core = WireGuardCore(os.urandom(32), random_bytes=os.urandom)
    assert contract_gaps(core) == []


def test_the_mesh_node_implements_the_contract():
    node = MeshNode(WireGuardCore(os.urandom(32), random_bytes=os.urandom), os.urandom(32), os.urandom)
    assert contract_gaps(node) == []


def test_the_plain_core_takes_wireguard_as_any_datagram():
    """receive_wireguard on the plain core is its receive_datagram: checked, dropped and counted alike."""
    core = WireGuardCore(os.urandom(32), random_bytes=os.urandom)
    assert WireGuardCore.receive_wireguard is WireGuardCore.receive_datagram  # no extra call per packet
    core.receive_wireguard(WG_TRANSPORT, ("127.0.0.1", 9), 1.0)
    core.receive_wireguard(b"\x01\0\0\0" + bytes(40), ("127.0.0.1", 9), 1.0)
    assert core.drops == {"unknown_index": 1, "bad_size": 1}


def _without(cls, name):
    return type(cls.__name__ + "Without_" + name, (), {k: v for k, v in vars(cls).items() if k != name})


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_a_core_missing_a_member_fails_the_check(name):
    core = _without(FakeCore, name)(("127.0.0.1", 9))
    assert contract_gaps(FakeCore(("127.0.0.1", 9))) == []
    assert contract_gaps(core) == [f"{name}: missing"]


def test_a_member_the_driver_cannot_call_fails_the_check():
    class Wrong(FakeCore):
        on_earlier_deadline = 0.5                                  # a hook that is not one
        get_timer = math.inf                                       # not callable

        def receive_wireguard(self, data, addr):                   # one parameter short
            pass

        def send_ip_packet(self, packet, now, peer):               # an extra one without default
            pass

        def receive_datagram(self, data, addr, now, via=None):     # an extra one with default: fine (the node)
            pass

    gaps = contract_gaps(Wrong(("127.0.0.1", 9)))
    assert [g.split(":")[0] for g in gaps] == ["on_earlier_deadline", "get_timer", "receive_wireguard",
                                               "send_ip_packet"]


@contextlib.asynccontextmanager
async def running(core, rig):
    """A driver on `core` with handlers for the other kinds set (WireGuard datagrams then go to
    receive_wireguard), running; yields it and the datagrams the handlers got."""
    driver = Driver(core, rig.tun, rig.udp, clock=trio.current_time)
    others = []
    driver.set_datagram_handlers({kind: lambda data, addr, now: others.append(data)
                                  for kind in (demux.STUN, demux.DISCO, demux.RELAY)})
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(driver.run)
        yield driver, others
        nursery.cancel_scope.cancel()


async def _recv_tun(test_side) -> bytes:
    with trio.fail_after(5):
        while True:
            try:
                return test_side.recv(100, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await trio.sleep(0.01)


async def test_the_driver_touches_the_contract_only_and_binds_inputs_once(rig):
    fake = FakeCore(rig.far.getsockname())
    core = Recording(fake)
    async with running(core, rig) as (driver, others):
        for i in range(5):
            rig.test_side.send(b"pkt%d" % i)
        got = [(await trio.to_thread.run_sync(rig.far.recvfrom, 100))[0] for _ in range(5)]
        assert got == [b"\x04\0\0\0pkt%d" % i for i in range(5)]
        for i in range(5):
            rig.far.sendto(WG_TRANSPORT[:-1] + bytes([i]), ("127.0.0.1", rig.udp.port))
            assert await _recv_tun(rig.test_side) == WG_TRANSPORT[4:-1] + bytes([i])
        fake.timer = trio.current_time() + 0.05
        await driver.flush()
        assert (await trio.to_thread.run_sync(rig.far.recvfrom, 100))[0] == b"\x04\0\0\0tick"
    assert set(core.touched) == MEMBERS
    # The per-packet inputs are looked up once per run, not per packet; the hook is set once.
    for name in ("on_earlier_deadline", "receive_datagram", "receive_wireguard", "send_ip_packet"):
        assert core.touched[name] == 1, name
    assert fake.on_earlier_deadline == driver._deadline_moved
    assert len(fake.received) == 5 and others == []


async def test_the_driver_drives_the_plain_core_through_the_contract(rig):
    """With datagram handlers set, a WireGuard datagram reaches the plain core through receive_wireguard
    (checked and counted there), and the driver owns the core's deadline hook."""
    core = WireGuardCore(os.urandom(32), random_bytes=os.urandom)
    async with running(core, rig) as (driver, others):
        assert core.on_earlier_deadline == driver._deadline_moved
        rig.far.sendto(WG_TRANSPORT, ("127.0.0.1", rig.udp.port))
        with trio.fail_after(5):
            while not core.drops:
                await trio.sleep(0.01)
        assert core.drops == {"unknown_index": 1} and others == []

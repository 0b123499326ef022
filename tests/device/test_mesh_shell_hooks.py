"""The mesh device's driver hooks: which handler each kind of datagram gets, and one clock, the driver's,
timing every input the shell hands the node (no TUN: a socketpair stands in for it)."""

from __future__ import annotations

import os
import socket

import pytest

from meshwg.io.agent import mesh_shell
from meshwg.io.dataplane.tun import Tun
from meshwg.mesh import demux


@pytest.fixture
def mesh_device(monkeypatch, tmp_path):
    tun_side, test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(mesh_shell.Tun, "open", classmethod(lambda cls, name: Tun.from_fd(tun_side.fileno(), name)))
    monkeypatch.setattr(mesh_shell.socket, "if_nametoindex", lambda name: 999)
    dev = mesh_shell.MeshDevice("mwgtest0", os.urandom(32), uapi_dir=str(tmp_path), clock=lambda: 1234.5)
    yield dev
    dev.close()
    test_side.close()


def test_the_driver_hands_each_kind_to_its_own_input(mesh_device):
    dev = mesh_device
    assert dev.driver._handlers == {demux.RELAY: dev.relay.handle_udp, demux.DISCO: dev.node.receive_disco,
                                    demux.STUN: dev.node.receive_stun}
    # WireGuard: the driver's default, the node's receive_wireguard (bound when the data loop starts).
    assert dev.driver.core is dev.node


def test_the_shell_times_the_node_with_the_drivers_clock(mesh_device, monkeypatch):
    dev = mesh_device
    assert dev.driver.clock() == 1234.5 and dev.device.driver is dev.driver
    seen = []
    monkeypatch.setattr(dev.node, "receive_relay", lambda src, data, now: seen.append(now))
    dev._deliver_relayed(b"k" * 32, b"\x04\0\0\0" + bytes(28))
    assert seen == [1234.5]


def test_the_mesh_devices_counters_by_component(mesh_device):
    """One merged view (meshwg.counters.merge) over the node, its codec, the device and the shells."""
    from meshwg import counters
    dev = mesh_device
    dev.node.receive_datagram(b"\xffMWR" + bytes(10), ("198.51.100.9", 4000), 1.0, via=1)
    dev.core.receive_datagram(b"\x04\0\0\0" + bytes(40), ("198.51.100.9", 4000), 1.0)
    dev.birthday.send(3, b"x", ("127.0.0.1", 9))  # no such socket: a lost datagram
    merged = counters.merge(dev.component_counters())
    assert merged == {"node.drop_relay_datagram": 1, "core.drop_unknown_index": 1, "birthday.drop_send_error": 1}
    assert set(dev.component_counters()) == {"node", "disco", "acl", "core", "driver", "tun", "socket", "relay",
                                             "routes", "birthday"}


async def test_birthday_socket_datagrams_are_timed_with_the_drivers_clock(mesh_device, monkeypatch):
    import trio
    dev = mesh_device
    seen = []
    monkeypatch.setattr(dev.node, "receive_datagram", lambda data, addr, now, via=None: seen.append((data, now, via)))
    dev.birthday.open(b"k" * 32, 1)
    port = dev.birthday.socks[1].getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as far:
        far.sendto(b"MWDsco" + bytes(60), ("127.0.0.1", port))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev._birthday_task)
            with trio.fail_after(5):
                while not seen:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert seen == [(b"MWDsco" + bytes(60), 1234.5, 1)]


def test_the_relay_shell_runs_on_the_drivers_clock(mesh_device, monkeypatch):
    """Its hello time, the policy's deadlines and `now` from the driver's handle_udp are on one clock."""
    dev = mesh_device
    monkeypatch.setattr(dev.relay, "udp_send", lambda data, addr: True)   # nothing leaves the test
    dev.relay.configure(b"s" * 32, [("192.0.2.1", 3478)], [])
    assert dev.relay.session.last_hello == 1234.5


def test_status_shows_every_drop_by_component_and_the_full_view(mesh_device):
    """`meshwg status`: "drops" and "counters" come from the one merged view (meshwg.counters.merge), so the
    same reason counted by the main socket's driver and by a birthday socket shows twice, each named."""
    from meshwg.io.agent.agent import Agent
    from meshwg.mesh.agent_core import AgentCore
    from meshwg.signaling.invite import Invite

    dev = mesh_device
    agent = Agent(Invite(("192.0.2.1:7300",), bytes(range(32)), "", b""), name=None, state_dir="/nonexistent",
                  iface="unused0", clock=dev.clock)
    agent.dev, agent.core = dev, AgentCore(dev.node, ("192.0.2.1:7300",))
    dev.driver.counters["drop_send_error"] += 2          # the main socket refused two datagrams
    dev.birthday.send(3, b"x", ("127.0.0.1", 9))          # no such birthday socket: a lost datagram
    dev.relay.counters["send_hello_udp"] += 1
    st = agent.status()
    assert st["drops"] == {"driver.drop_send_error": 2, "birthday.drop_send_error": 1}
    assert st["counters"] == {"driver.drop_send_error": 2, "birthday.drop_send_error": 1, "relay.send_hello_udp": 1}

"""The TCP relay's receive on the compiled path (issue 16, TCP RTT): the driver reads the relay's stream, RECV frames
of transport data from a known peer go to the core in one batch (fastio.node_relay_split_tcp), everything else to
the relay shell's Python path, which checks and counts it. Frames split across reads arrive whole; a bad frame in
the middle of a read is counted and the frames after it still arrive; an unknown sender never takes the fast path
and never raises. A socketpair stands in for the relay's TCP connection."""

from __future__ import annotations

import os
import socket
import struct
from collections import Counter

import pytest
import trio

from meshwg.control.relay_client import RelaySession
from meshwg.io.agent.relay_shell import RelayShell
from meshwg.io.dataplane.driver import Driver
from meshwg.io.dataplane.fastio import fastio
from meshwg.mesh.node import RelayEndpoint
from meshwg.signaling import relay_wire as W

pytestmark = pytest.mark.skipif(fastio is None, reason="the compiled drain is not built")

PEER = bytes(range(1, 33))
STRANGER = bytes(range(101, 133))
TRANSPORT = b"\x04\0\0\0" + bytes(range(12)) + bytes(40)   # 56 bytes: a transport message's shape


def recv_frame(key: bytes, packet: bytes) -> bytes:
    return W.tcp_frame(W.MAGIC + bytes([W.T_RECV]) + key + packet)


class FakeCore:
    """What flush_io and the driver's TCP read call on a core: records what it is handed."""

    def __init__(self) -> None:
        self.received: list = []

    def receive_datagram(self, data, endpoint, now) -> None:
        self.received.append((data, endpoint))

    def datagrams_to_send(self) -> list:
        return []

    def tun_packets_to_write(self) -> list:
        return []

    def pop_events(self) -> list:
        return []


class FakeTcpClient:
    def __init__(self) -> None:
        self.session = RelaySession(os.urandom(32), os.urandom(32), os.urandom)


@pytest.fixture
def rig():
    """(driver, shell, core, delivered, the relay's end of the socketpair); the driver watches the node's end."""
    core = FakeCore()
    driver = Driver(core, tun=None, udp=None)
    delivered: list = []
    shell = RelayShell(os.urandom(32), udp_send=lambda data, addr: True,
                       deliver=lambda src, packet: delivered.append((src, packet)), after_rx=None,
                       endpoint_type=RelayEndpoint, endpoint_for=lambda key: RelayEndpoint(key) if key == PEER else None,
                       watch_tcp=driver.watch_relay_tcp, unwatch_tcp=driver.unwatch_relay_tcp)
    driver.relay_route = shell.route
    shell.tcp = FakeTcpClient()
    node_end, relay_end = socket.socketpair()
    node_end.setblocking(False)
    closed: list = []
    assert driver.watch_relay_tcp(node_end.fileno(), b"", shell._tcp_frames, closed.append)
    yield driver, shell, core, delivered, relay_end, closed
    driver.unwatch_relay_tcp()
    node_end.close()
    relay_end.close()


async def read(driver) -> int:
    with trio.fail_after(5):
        return await driver._read_relay_tcp(*driver._relay_tcp)


async def test_known_peer_on_the_fast_path_after_its_first_recv(rig):
    driver, shell, core, delivered, relay, _ = rig
    relay.sendall(recv_frame(PEER, TRANSPORT))
    await read(driver)
    # The first RECV from a peer is learnt through the Python path (as over UDP), the next ones skip it.
    assert delivered == [(PEER, TRANSPORT)] and core.received == []
    relay.sendall(recv_frame(PEER, TRANSPORT) * 3)
    await read(driver)
    assert len(delivered) == 1 and len(core.received) == 3
    assert core.received[0][0] == TRANSPORT and core.received[0][1].peer_key == PEER
    assert shell.counters["recv_tcp"] == 4 and shell.counters["recv_tcp_fast"] == 3


async def test_frames_split_across_reads_arrive_whole(rig):
    driver, shell, core, delivered, relay, _ = rig
    shell._endpoints[PEER] = RelayEndpoint(PEER)
    packets = [TRANSPORT + bytes([i]) * i for i in range(1, 6)]
    stream = b"".join(recv_frame(PEER, p) for p in packets)
    # Cuts inside a length prefix, inside a header and inside a payload.
    cuts = [1, 2 + 3, 2 + 40, len(stream) - 7, len(stream)]
    start = 0
    for cut in cuts:
        relay.sendall(stream[start:cut])
        start = cut
        await read(driver)
    assert [data for data, _ in core.received] == packets
    assert delivered == [] and shell.counters["drop_tcp_bad_frame"] == 0


async def test_a_bad_frame_in_the_middle_is_counted_and_the_rest_arrive(rig):
    driver, shell, core, delivered, relay, _ = rig
    shell._endpoints[PEER] = RelayEndpoint(PEER)
    junk = [W.tcp_frame(b"\x00MWR\x04" + PEER + TRANSPORT),      # wrong MAGIC
            W.tcp_frame(W.MAGIC + bytes([W.T_RECV]) + PEER[:20]),  # too short for a RECV
            W.tcp_frame(b"")]                                    # empty
    relay.sendall(recv_frame(PEER, TRANSPORT) + b"".join(junk) + recv_frame(PEER, TRANSPORT + b"!"))
    await read(driver)
    assert [data for data, _ in core.received] == [TRANSPORT, TRANSPORT + b"!"]
    assert shell.counters["drop_tcp_bad_frame"] == 3 and delivered == []


async def test_an_unknown_sender_never_takes_the_fast_path(rig):
    driver, shell, core, delivered, relay, _ = rig
    shell._endpoints[PEER] = RelayEndpoint(PEER)
    relay.sendall(recv_frame(STRANGER, TRANSPORT) * 2 + recv_frame(PEER, TRANSPORT))
    await read(driver)
    # The stranger's frames go to the Python path (the node checks the key and drops and counts there), never
    # to the core as a peer's transport data, and are not learnt as a peer's.
    assert delivered == [(STRANGER, TRANSPORT)] * 2
    assert core.received == [(TRANSPORT, shell._endpoints[PEER])]
    assert STRANGER not in shell._endpoints


async def test_eof_reports_the_close_and_unwatches(rig):
    driver, shell, core, delivered, relay, closed = rig
    relay.shutdown(socket.SHUT_WR)
    await read(driver)
    assert len(closed) == 1 and isinstance(closed[0], EOFError)
    assert driver._relay_tcp is None


def test_split_keeps_the_checks_of_the_udp_receive():
    """fastio.node_relay_split_tcp alone: a RECV of transport data from a known key is split; a handshake inside,
    another frame type, an unknown key, a short frame come back whole; a partial frame is not consumed."""
    from meshwg.io.dataplane import udp
    endpoints = {PEER: RelayEndpoint(PEER)}
    route = udp.RelayRoute(RelayEndpoint, {}, endpoints, Counter())
    handshake = b"\x01\0\0\0" + bytes(144)
    frames = [recv_frame(PEER, TRANSPORT), recv_frame(PEER, handshake), recv_frame(STRANGER, TRANSPORT),
              W.tcp_frame(W.MAGIC + bytes([W.T_NOTICE]) + bytes(40)), recv_frame(PEER, TRANSPORT[:31])]
    partial = recv_frame(PEER, TRANSPORT)[:9]
    data = b"".join(frames) + partial
    datagrams, others, used = fastio.node_relay_split_tcp(route.capsule, data)
    assert datagrams == [(TRANSPORT, endpoints[PEER])]
    assert others == [f[2:] for f in frames[1:]]
    assert used == len(data) - len(partial)
    assert struct.unpack("!H", data[used:used + 2])[0] == len(recv_frame(PEER, TRANSPORT)) - 2

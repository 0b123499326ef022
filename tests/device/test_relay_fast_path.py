"""Relayed traffic on the mesh device's compiled path (issue 16), end to end on loopback: the driver runs the node
with a relay on 127.0.0.1 (signal_server.relay.RelayCore answering the hello). After the relay shell's Python
path has seen a peer once (its first RECV, its first send), the peer's relayed transport data reaches the core
from the driver's batch receive and leaves framed from its batch send, counted as such; a RECV from another
address never does (the shell drops and counts it). No TUN: a socketpair stands in for it."""

from __future__ import annotations

import os
import socket
import time

import pytest
import trio

from meshwg.io.agent import mesh_shell
from meshwg.io.dataplane.fastio import fastio
from meshwg.io.dataplane.tun import Tun
from meshwg.mesh.netmap import PeerSpec
from meshwg.mesh.node import RelayEndpoint
from meshwg.signaling import relay_wire as W
from meshwg.wg import crypto
from signal_server.relay import RelayCore

pytestmark = pytest.mark.skipif(fastio is None, reason="the compiled drain is not built")

SERVER_SK = bytes(range(100, 132))
SERVER_PK = crypto.dh_pub(crypto.clamp(SERVER_SK))
PEER = crypto.dh_pub(crypto.clamp(bytes(range(33, 65))))
TRANSPORT = b"\x04\0\0\0" + bytes(range(60))
NOW = 1234.5


@pytest.fixture
def mesh_device(monkeypatch, tmp_path):
    tun_side, test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(mesh_shell.Tun, "open", classmethod(lambda cls, name: Tun.from_fd(tun_side.fileno(), name)))
    monkeypatch.setattr(mesh_shell.socket, "if_nametoindex", lambda name: 999)
    node_sk = os.urandom(32)
    dev = mesh_shell.MeshDevice("mwgtest0", node_sk, uapi_dir=str(tmp_path), clock=lambda: NOW)
    dev.node.apply_netmap({PEER: PeerSpec.make(PEER, "b", ["100.64.0.2/32"], [])}, NOW)
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.1", 0))
    relay.setblocking(False)
    core = RelayCore(SERVER_SK, os.urandom)
    core.set_allowed([crypto.dh_pub(crypto.clamp(node_sk)), PEER])
    yield dev, relay, core
    dev.close()
    relay.close()
    test_side.close()


async def _relay_frames(relay: socket.socket, count: int, kind: int) -> list[tuple[bytes, tuple]]:
    """The next `count` frames of type `kind` the relay gets (a peer's fall-back to the relay re-sends a HELLO)."""
    out = []
    with trio.fail_after(5):
        while len(out) < count:
            await trio.lowlevel.wait_readable(relay)
            data, src = relay.recvfrom(70000)
            if data[4] == kind:
                out.append((data, src))
    return out


async def _until(predicate) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.005)


async def test_relayed_transport_data_reaches_the_core_and_leaves_on_the_compiled_path(mesh_device, monkeypatch):
    dev, relay, relay_core = mesh_device
    fast_in, slow_in = [], []
    monkeypatch.setattr(dev.node, "receive_wireguard", lambda data, addr, now: fast_in.append((data, addr)))
    monkeypatch.setattr(dev.node, "receive_relay", lambda src, data, now: slow_in.append((src, data)))
    node_addr = ("127.0.0.1", dev.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.driver.run)
        dev.relay.configure(SERVER_PK, [relay.getsockname()], [])     # the HELLO
        [(hello, src)] = await _relay_frames(relay, 1, W.T_HELLO)
        for frame, dst in relay_core.handle_untrusted(hello, src, NOW, time.time()):
            relay.sendto(frame, dst)                                   # HELLO_OK
        await _until(dev.relay.ready)
        await _relay_frames(relay, 1, W.T_SEND)                        # the shell's confirm

        # In: the first RECV through the shell (which learns the peer), the next ones compiled.
        for _ in range(6):
            relay.sendto(W.encode_recv(PEER, TRANSPORT), node_addr)
        await _until(lambda: len(slow_in) + len(fast_in) >= 6)
        assert slow_in == [(PEER, TRANSPORT)]
        assert fast_in == [(TRANSPORT, RelayEndpoint(PEER))] * 5
        # A RECV from another address: the shell's, which drops and counts it.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.2", 0))
            stranger.sendto(W.encode_recv(PEER, TRANSPORT), node_addr)
            await _until(lambda: dev.relay.counters["drop_not_from_relay"] == 1)
        assert len(fast_in) == 5 and len(slow_in) == 1

        # Out: the first send through the shell (which caches the header), then a batch compiled.
        dev.relay.send(PEER, b"first")
        batch = [(TRANSPORT, RelayEndpoint(PEER))] * 5
        monkeypatch.setattr(dev.node, "datagrams_to_send", lambda: [batch.pop() for _ in range(len(batch))])
        await dev.driver.flush_io()
        token = dev.relay.session.token
        got = [data for data, _ in await _relay_frames(relay, 6, W.T_SEND)]
        assert got == [W.encode_send(token, PEER, b"first")] + [W.encode_send(token, PEER, TRANSPORT)] * 5
        nursery.cancel_scope.cancel()
    counters = dev.relay.counters
    assert (counters["recv_udp"], counters["recv_udp_fast"], counters["send_udp"], counters["send_udp_fast"]) == \
        (1, 5, 1, 5)
    assert dev.relay.tx_by_peer[PEER] == 6

"""The plain-WireGuard port end to end on loopback (issue 12): a real server, a "phone" (the project's WireGuard
core sending from its own UDP socket to the server's plain port, as a stock WireGuard app does), and a home node
whose relay session (UDP or TCP, the project's relay client) carries the phone's datagrams to a second WireGuard
core that holds the phone as a peer. The server never decrypts: a handshake that completes and data that
arrives both ways went through it intact."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import pathlib
import time

import pytest
import trio
from relay_node import UdpRelayNode
from sig_helpers import new_key, start_server, wait_until

from meshwg.control import ControlConnection
from meshwg.control.relay_client import open_tcp_relay
from meshwg.signaling import relay_wire as W
from meshwg.wg.crypto import clamp, dh_pub
from meshwg.wg.device import WireGuardCore
from meshwg.wg.events import HandshakeCompleted
from signal_server import admin

_spec = importlib.util.spec_from_file_location(
    "_wg_pair", pathlib.Path(__file__).resolve().parents[1] / "wg" / "wg_pair.py")
_wg_pair = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_wg_pair)
ipv4_packet = _wg_pair.ipv4_packet

RELAY = "relay"  # the node core's endpoint for its plain peers


class TcpRelayNode:
    def __init__(self, client) -> None:
        self.client = client

    async def recv(self) -> tuple[bytes, bytes]:
        with trio.fail_after(3):
            return await self.client.receive()

    async def send(self, dst: bytes, packet: bytes) -> None:
        await self.client.send(dst, packet)


async def relay_node(h, sk: bytes, transport: str):
    if transport == "udp":
        return await UdpRelayNode(sk, h.server.server_pk, h.udp).start()
    return TcpRelayNode(await open_tcp_relay(*h.relay_tcp, sk, h.server.server_pk, os.urandom))


class Phone:
    """A stock WireGuard app: one UDP socket, every peer's Endpoint the server's plain port."""

    def __init__(self, sk: bytes, server_plain) -> None:
        self.core = WireGuardCore(sk, os.urandom, wall_offset=time.time())
        self.server_plain = server_plain
        self.sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)

    async def start(self) -> "Phone":
        await self.sock.bind(("127.0.0.1", 0))
        return self

    def peer(self, node_key: bytes, node_ip: str) -> None:
        p = self.core.add_peer(node_key)
        self.core.set_endpoint(p, self.server_plain)
        self.core.set_allowed_ips(p, [ipaddress.ip_network(node_ip + "/32")])

    async def flush(self) -> int:
        out = self.core.datagrams_to_send()
        for data, addr in out:
            assert addr == self.server_plain
            await self.sock.sendto(data, addr)
        return len(out)

    async def receive(self) -> bytes:
        """One datagram from the server's plain port, into the core."""
        with trio.fail_after(3):
            data, src = await self.sock.recvfrom(65535)
        assert src[:2] == self.server_plain  # replies come from the port the phone sends to
        self.core.receive_datagram(data, src[:2], trio.current_time())
        return data


class Node:
    """A node's WireGuard core holding plain peers, reached over its relay session."""

    def __init__(self, sk: bytes, relay) -> None:
        self.core = WireGuardCore(sk, os.urandom, wall_offset=time.time())
        self.relay = relay

    def peer(self, phone_key: bytes, phone_ip: str) -> None:
        p = self.core.add_peer(phone_key)
        self.core.set_endpoint(p, RELAY)
        self.core.set_allowed_ips(p, [ipaddress.ip_network(phone_ip + "/32")])

    async def receive(self) -> bytes:
        """One relayed datagram into the core; it must come from PLAIN_SOURCE."""
        src, data = await self.relay.recv()
        assert src == W.PLAIN_SOURCE
        self.core.receive_datagram(data, RELAY, trio.current_time())
        return data

    async def flush(self, phone_key: bytes) -> int:
        out = self.core.datagrams_to_send()
        for data, addr in out:
            assert addr == RELAY
            await self.relay.send(phone_key, data)
        return len(out)


async def nothing_arrives(receive, seconds: float = 0.3) -> None:
    with trio.move_on_after(seconds):
        got = await receive()
        pytest.fail(f"a datagram arrived: {got[:8]!r}")


async def lab(nursery, tmp_path, transport: str = "udp"):
    h = await start_server(nursery, tmp_path, plain_udp=("127.0.0.1", 0))
    inv = h.invite(reusable=True)
    keys = {}
    for name in ("home", "other"):
        sk = clamp(new_key())
        conn = await ControlConnection.open(inv, sk, name=name)
        keys[name] = (sk, conn.welcome.ipv4)
        await conn.aclose()  # the relay admits registered nodes; the control session is not needed here
    nodes = {name: Node(sk, await relay_node(h, sk, transport)) for name, (sk, _) in keys.items()}
    row = admin.add_plain(h.admin, name="phone", to=["home"], wall=time.time())
    await wait_until(lambda: h.server.plain.targets == {dh_pub(keys["home"][0])}, timeout=1.0)
    phone = await Phone(row.private_key, h.plain).start()
    for name, (sk, ip) in keys.items():
        phone.peer(dh_pub(sk), ip)
        nodes[name].peer(row.key, row.ipv4)
    return h, phone, nodes, row, {name: ip for name, (_, ip) in keys.items()}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_phone_reaches_its_target_node_through_the_relay_and_back(nursery, tmp_path, transport):
    h, phone, nodes, row, ips = await lab(nursery, tmp_path, transport)
    home = nodes["home"]
    now = trio.current_time
    up = ipv4_packet(row.ipv4, ips["home"], b"phone to home")
    phone.core.send_ip_packet(up, now())
    assert await phone.flush() == 1  # the handshake initiation (the packet waits for the session)
    initiation = await home.receive()
    assert initiation[0] == 1 and len(initiation) == 148
    assert await home.flush(row.key) == 1  # the response, sent to the phone's key through the relay
    response = await phone.receive()
    assert response[0] == 2
    assert HandshakeCompleted(home.core.public_key) in phone.core.pop_events()
    assert await phone.flush() == 1  # the waiting packet
    assert (await home.receive())[0] == 4
    assert home.core.tun_packets_to_write() == [up]
    assert HandshakeCompleted(row.key) in home.core.pop_events()
    down = ipv4_packet(ips["home"], row.ipv4, b"home to phone")
    home.core.send_ip_packet(down, now())
    assert await home.flush(row.key) == 1
    assert (await phone.receive())[0] == 4
    assert phone.core.tun_packets_to_write() == [down]
    # more data both ways on the learned index pair
    for i in range(5):
        phone.core.send_ip_packet(ipv4_packet(row.ipv4, ips["home"], b"%d" % i), now())
        await phone.flush()
        await home.receive()
        home.core.send_ip_packet(ipv4_packet(ips["home"], row.ipv4, b"%d" % i), now())
        await home.flush(row.key)
        await phone.receive()
    assert len(home.core.tun_packets_to_write()) == 5 and len(phone.core.tun_packets_to_write()) == 5
    c, r = h.server.plain.counters, h.server.relay.counters
    assert (c["forward_initiation"], c["forward_response"]) == (1, 1)
    assert c["forward_transport_to_node"] == 6 and c["forward_transport_to_plain"] == 6
    assert r["forwarded_from_plain_packets"] == 7 and r["forwarded_to_plain_packets"] == 7
    assert not [k for k in c if k.startswith("drop_")]
    # the other node saw none of it
    await nothing_arrives(nodes["other"].relay.recv, 0.1)
    # the counters are in /metrics
    text = h.server.render_metrics()
    assert "meshwg_signal_plain_forward_initiation_total 1" in text
    assert "meshwg_signal_forwarded_from_plain_packets_total 7" in text
    assert "meshwg_signal_plain_peers 1" in text and "meshwg_signal_plain_sessions 1" in text


async def test_an_initiation_for_a_node_that_no_plain_peer_may_reach_never_leaves_the_server(nursery, tmp_path):
    h, phone, nodes, row, ips = await lab(nursery, tmp_path)
    phone.core.send_ip_packet(ipv4_packet(row.ipv4, ips["other"], b"to other"), trio.current_time())
    assert await phone.flush() == 1
    # neither node's relay session gets anything (the other node's mac1 is no target)
    async with trio.open_nursery() as n:
        for node in nodes.values():
            n.start_soon(nothing_arrives, node.relay.recv)
    assert h.server.plain.counters["drop_init_no_target"] == 1
    assert h.server.relay.counters["forwarded_from_plain_packets"] == 0


async def test_junk_on_the_plain_port_is_dropped_and_counted(nursery, tmp_path):
    h, phone, nodes, row, ips = await lab(nursery, tmp_path)
    for junk in (b"", b"x", b"\x04\x00\x00\x00" + bytes(28), b"\x09" * 200, bytes(148)):
        await phone.sock.sendto(junk, h.plain)
    async with trio.open_nursery() as n:
        for node in nodes.values():
            n.start_soon(nothing_arrives, node.relay.recv)
    c = h.server.plain.counters
    assert sum(v for k, v in c.items() if k.startswith("drop_")) >= 4  # an empty datagram may not be delivered
    assert not [k for k in c if k.startswith("forward_")]


async def test_a_node_send_to_a_plain_key_it_has_no_session_with_goes_nowhere(nursery, tmp_path):
    """A SEND to a plain peer's key is for the plain port (not an absent relay peer); with no index pair learned
    from a handshake the ingress has nowhere to send it."""
    h, phone, nodes, row, ips = await lab(nursery, tmp_path)
    await nodes["other"].relay.send(row.key, b"\x04\x00\x00\x00" + bytes(28))
    with trio.move_on_after(0.3):
        await phone.receive()
        pytest.fail("a node reached a phone without a handshake")
    assert h.server.relay.counters["drop_plain_unrouted"] == 1
    assert h.server.relay.counters["drop_peer_absent"] == 0
    assert h.server.plain.counters["drop_node_unknown_index"] == 1


async def test_a_plain_key_gets_no_relay_session(nursery, tmp_path):
    h, phone, nodes, row, ips = await lab(nursery, tmp_path)
    with pytest.raises(PermissionError):
        await open_tcp_relay(*h.relay_tcp, row.private_key, h.server.server_pk, os.urandom)
    assert row.key not in h.server.relay.by_key


async def test_a_taken_plain_port_is_a_warning_by_default_and_an_error_when_asked_for(nursery, tmp_path, caplog):
    import socket

    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        with caplog.at_level("WARNING", logger="signal"):
            h = await start_server(nursery, tmp_path, plain_udp=taken.getsockname())
        assert h.plain is None and h.admin.meta_get("plain_addrs") is None
        assert any("no plain WireGuard port" in r.getMessage() for r in caplog.records)
        refused = False
        try:
            await start_server(nursery, tmp_path, plain_udp=taken.getsockname(), plain_udp_strict=True)
        except* OSError:
            refused = True
        assert refused
    finally:
        taken.close()


async def test_a_cookie_reply_to_plain_source_reaches_the_phone(nursery, tmp_path):
    """Under load the node's WireGuard answers an initiation with a cookie reply to its source, which for a
    plain peer is PLAIN_SOURCE (it does not know the peer yet); the relay routes it by receiver index."""
    h, phone, nodes, row, ips = await lab(nursery, tmp_path)
    home = nodes["home"]
    now = trio.current_time
    home.core.note_handshake_backlog(200, now())  # under load: an initiation without mac2 gets a cookie
    phone.core.send_ip_packet(ipv4_packet(row.ipv4, ips["home"], b"x"), now())
    await phone.flush()
    await home.receive()
    out = home.core.datagrams_to_send()
    assert [d[0] for d, _ in out] == [3]
    await home.relay.send(W.PLAIN_SOURCE, out[0][0])
    reply = await phone.receive()
    assert reply[0] == 3 and phone.core.peers[home.core.public_key].cookie.cookie is not None
    assert h.server.plain.counters["forward_cookie_to_plain"] == 1

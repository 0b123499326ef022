"""Sticky source addresses on the signal server (issue 17): its sockets on a wildcard address answer
each node from the local address the node wrote to (127.0.0.1 and 127.0.0.2 are both on lo; the kernel's
own choice for an answer to 127.0.0.1 is 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import time

import trio
from sig_helpers import start_server

from meshwg.control import ControlConnection
from meshwg.control.relay_client import RelaySession
from meshwg.disco import stun
from meshwg.wg.crypto import clamp, dh_pub


async def test_the_signal_servers_wildcard_socket_answers_stun_from_the_address_written_to(nursery, tmp_path):
    """meshwg-signal on 0.0.0.0: a STUN request to 127.0.0.2 is answered from 127.0.0.2 (old code:
    from 127.0.0.1), one to 127.0.0.1 from 127.0.0.1."""
    h = await start_server(nursery, tmp_path, udp=[("0.0.0.0", 0)], stun_alt_port=None)
    port = h.udp[1]
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await client.bind(("127.0.0.1", 0))
    with client:
        for local in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
            await client.sendto(stun.build_binding_request(b"\x07" * 12), (local, port))
            with trio.fail_after(3):
                _, source = await client.recvfrom(2048)
            assert source == (local, port)
    h.admin.close()


class _Node:
    """A relay client on 127.0.0.1 writing to `server` (one of the server's loopback addresses)."""

    def __init__(self, sk: bytes, server_pk: bytes, server) -> None:
        self.pub = dh_pub(clamp(sk))
        self.rs = RelaySession(sk, server_pk, os.urandom)
        self.server = server
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def recv_event(self):
        """The next relay event and the address it came from."""
        with trio.fail_after(3):
            while True:
                data, source = await self.sock.recvfrom(65535)
                if (event := self.rs.handle_untrusted(data, time.monotonic())) is not None:
                    return event, source


async def test_the_relay_forwards_to_each_node_from_the_address_that_node_wrote_to(nursery, tmp_path):
    """Two nodes on one wildcard relay socket, one writing to 127.0.0.2, the other to 127.0.0.3: each
    hears its relay answers and relayed packets from the address it wrote to (old code: 127.0.0.1)."""
    h = await start_server(nursery, tmp_path, udp=[("0.0.0.0", 0)], stun_alt_port=None)
    port, pk = h.udp[1], h.server.server_pk
    nodes, conns = [], []
    for local in ("127.0.0.2", "127.0.0.3"):
        sk = os.urandom(32)
        conns.append(await ControlConnection.open(h.invite(), sk))
        node = _Node(sk, pk, (local, port))
        await node.sock.bind(("127.0.0.1", 0))
        await node.sock.sendto(node.rs.hello(time.monotonic(), time.time()), node.server)
        event, source = await node.recv_event()
        assert event[0] == "ready" and source == node.server
        nodes.append(node)
    a, b = nodes
    packet = b"\x04\0\0\0" + os.urandom(100)
    await a.sock.sendto(a.rs.encode_send(b.pub, packet), a.server)
    assert await b.recv_event() == (("recv", a.pub, packet), b.server)
    await b.sock.sendto(b.rs.encode_send(a.pub, packet), b.server)
    assert await a.recv_event() == (("recv", b.pub, packet), a.server)
    for conn in conns:
        await conn.aclose()
    for node in nodes:
        node.sock.close()
    h.admin.close()

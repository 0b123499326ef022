"""Sticky source addresses on the signal server (issue 17): its sockets on a wildcard address answer
each node from the local address the node wrote to (127.0.0.1 and 127.0.0.2 are both on lo; the kernel's
own choice for an answer to 127.0.0.1 is 127.0.0.1)."""

from __future__ import annotations

import socket

import trio
from sig_helpers import start_server

from meshwg.disco import stun


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

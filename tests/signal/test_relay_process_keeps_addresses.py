"""A `meshwg-signal relay` (control listener off) beside the server on one database must not erase what the
server published: `invite create` reads the control addresses from there by default."""

from __future__ import annotations

import json

import trio
from sig_helpers import START_DEADLINE, start_server

from signal_server.server import ServerConfig, SignalServer


async def test_a_relay_only_process_leaves_the_servers_control_addresses(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    published = json.loads(h.admin.meta_get("control_addrs"))
    assert published == [f"127.0.0.1:{h.control[1]}"]

    relay = SignalServer(ServerConfig(db=h.db, control_enabled=False, udp=[("127.0.0.1", 0)],
                                      relay_tcp=[], metrics=[], plain_udp=None))
    with trio.fail_after(START_DEADLINE):
        await nursery.start(relay.run)
    assert json.loads(h.admin.meta_get("control_addrs")) == published
    h.admin.close()

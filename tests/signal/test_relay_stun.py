"""Relay (UDP + TCP fallback) and the STUN responder, on loopback."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import trio
from relay_node import UdpRelayNode
from sig_helpers import harness, new_key, wait_until, start_task  # noqa: F401 (fixture)

from meshwg.control import ControlConnection
from meshwg.signaling import relay_wire as W
from meshwg.control.relay_client import open_tcp_relay
from meshwg.disco import stun


async def registered(h):
    sk = new_key()
    conn = await ControlConnection.open(h.invite(), sk)
    return sk, conn


async def test_udp_relay_forwards_and_refuses_unregistered(harness):
    pk = harness.server.server_pk
    (ska, ca), (skb, cb) = await registered(harness), await registered(harness)
    a = await UdpRelayNode(ska, pk, harness.udp).bind()
    b = await UdpRelayNode(skb, pk, harness.udp).bind()
    ev_a = await a.hello()
    assert ev_a[0] == "ready" and ev_a[1] == ("127.0.0.1", a.sock.getsockname()[1])  # observed address
    assert (await b.hello())[0] == "ready"
    wg_packet = b"\x04\x00\x00\x00" + os.urandom(100)  # opaque to the relay
    await a.sock.sendto(a.rs.encode_send(b.rs_pub if hasattr(b, "rs_pub") else _pub(skb), wg_packet), harness.udp)
    kind, src, pkt = await b.event()
    assert (kind, src, pkt) == ("recv", _pub(ska), wg_packet)
    # the server attaches the relay-observed UDP address to the directory as an "observed" candidate
    await wait_until(lambda: ("127.0.0.1", a.sock.getsockname()[1], "observed")
                     in harness.server.directory.nodes[_pub(ska)].entry()["cand"] or
                     ["127.0.0.1", a.sock.getsockname()[1], "observed"] in harness.server.directory.nodes[_pub(ska)].entry()["cand"])

    # an unregistered key is refused at hello and cannot send
    intruder = await UdpRelayNode(new_key(), pk, harness.udp).bind()
    e = await intruder.hello()
    assert e[0] == "notice" and e[1] == W.N_NOT_REGISTERED
    # forged frame with a guessed token from another address: not forwarded
    await intruder.sock.sendto(W.encode_send(os.urandom(8), _pub(skb), b"junk"), harness.udp)
    e = await intruder.event()
    assert e[0] == "notice" and e[1] == W.N_REHELLO
    with trio.move_on_after(0.2):
        await b.event()
        pytest.fail("relay forwarded a packet from an unregistered sender")
    c = harness.server.relay.counters
    assert c["refused_unregistered"] >= 1 and c["refused_no_session"] >= 1 and c["forwarded_packets"] == 1

    # after removal the node's relay session is gone too
    harness.admin.remove(1, time.time())
    await wait_until(lambda: _pub(ska) not in harness.server.relay.by_key)
    await ca.aclose()
    await cb.aclose()


async def test_tcp_relay_fallback_interoperates_with_udp(harness):
    pk = harness.server.server_pk
    (ska, _), (skb, _) = await registered(harness), await registered(harness)
    a = await UdpRelayNode(ska, pk, harness.udp).bind()
    assert (await a.hello())[0] == "ready"
    tb = await open_tcp_relay(*harness.relay_tcp, skb, pk, os.urandom)
    await a.sock.sendto(a.rs.encode_send(_pub(skb), b"udp->tcp"), harness.udp)
    with trio.fail_after(2):
        assert await tb.receive() == (_pub(ska), b"udp->tcp")
    await tb.send(_pub(ska), b"tcp->udp")
    assert await a.event() == ("recv", _pub(skb), b"tcp->udp")
    with pytest.raises(PermissionError):
        await open_tcp_relay(*harness.relay_tcp, new_key(), pk, os.urandom)
    await tb.aclose()


async def test_relay_rate_limit(harness):
    pk = harness.server.server_pk
    (ska, _), (skb, _) = await registered(harness), await registered(harness)
    harness.server.relay.pkt_limit.rate = 10
    harness.server.relay.pkt_limit.burst = 20
    a = await UdpRelayNode(ska, pk, harness.udp).bind()
    b = await UdpRelayNode(skb, pk, harness.udp).bind()
    await a.hello()
    await b.hello()
    for _ in range(100):
        await a.sock.sendto(a.rs.encode_send(_pub(skb), b"x"), harness.udp)
    got = 0
    with trio.move_on_after(0.5):
        while True:
            await b.event()
            got += 1
    assert 15 <= got <= 30
    assert harness.server.relay.counters["drop_rate_limited"] >= 70


async def test_standalone_relay_follows_the_shared_db(harness, nursery):
    """`meshwg-signal relay` mode: no control listener; registered keys come from the same DB file."""
    from signal_server.server import ServerConfig, SignalServer

    (ska, ca), (skb, cb) = await registered(harness), await registered(harness)
    relay = SignalServer(ServerConfig(db=harness.db, control_enabled=False, udp=[("127.0.0.1", 0)], relay_tcp=[],
                                      plain_udp=None,
                                      db_poll=0.05))
    bound = await start_task(nursery, relay.run)
    assert bound.control == [] and relay.server_pk == harness.server.server_pk
    a = await UdpRelayNode(ska, relay.server_pk, bound.udp[0]).bind()
    b = await UdpRelayNode(skb, relay.server_pk, bound.udp[0]).bind()
    assert (await a.hello())[0] == "ready" and (await b.hello())[0] == "ready"
    await a.sock.sendto(a.rs.encode_send(_pub(skb), b"hi"), bound.udp[0])
    assert await b.event() == ("recv", _pub(ska), b"hi")
    harness.admin.remove(2, time.time())  # removal in the DB reaches the standalone relay too
    await wait_until(lambda: _pub(skb) not in relay.relay.by_key and _pub(skb) not in relay.relay.allowed)
    await ca.aclose()
    await cb.aclose()


def _pub(sk):
    from meshwg.wg.crypto import clamp, dh_pub as public_key

    return public_key(clamp(sk))


# --- STUN


async def test_stun_responder_with_our_codec_v4_and_v6(nursery, tmp_path):
    from sig_helpers import start_server

    h = await start_server(nursery, tmp_path, udp=[("127.0.0.1", 0), ("::1", 0)])
    for fam, host, addr in ((trio.socket.AF_INET, "127.0.0.1", h.server.bound.udp[0]),
                            (trio.socket.AF_INET6, "::1", h.server.bound.udp[1])):
        s = trio.socket.socket(fam, trio.socket.SOCK_DGRAM)
        await s.bind((host, 0))
        txid = os.urandom(12)
        await s.sendto(stun.build_binding_request(txid), addr[:2])
        with trio.fail_after(2):
            data, _ = await s.recvfrom(2048)
        assert stun.parse_binding_response_untrusted(data) == (txid, (host, s.getsockname()[1]))
        s.close()
    h.admin.close()


async def test_stun_parsed_by_aiostun(harness):
    import aiostun

    port = harness.udp[1]

    def query():
        async def q():
            async with aiostun.Client(host="127.0.0.1", port=port) as client:
                return await client.get_mapped_address()
        return asyncio.run(q())

    mapped = await trio.to_thread.run_sync(query)
    assert mapped["ip"] == "127.0.0.1" and 0 < mapped["port"] < 65536, mapped


async def test_stun_parsed_by_stun_client_binary(harness):
    from sig_helpers import require_real_components

    require_real_components("stun")
    port = harness.udp[1]
    r = await trio.run_process(["stun", f"127.0.0.1:{port}", "-v", "-p", "0"], capture_stdout=True, capture_stderr=True, check=False)
    out = r.stdout.decode() + r.stderr.decode()
    assert "MappedAddress = 127.0.0.1:" in out, out
    assert harness.server.counters["stun_classic_requests"] >= 1

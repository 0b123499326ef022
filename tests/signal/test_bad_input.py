"""Malformed frames, oversized messages, slow clients and bogus join floods never hurt the server."""

from __future__ import annotations

import os
import socket
import struct

import trio
from sig_helpers import harness, new_key, start_server, wait_until, start_task  # noqa: F401 (fixture)

from meshwg.control import ControlClient, ControlConnection
from meshwg.signaling import protocol as P
from meshwg.signaling.noise import Initiator
from signal_server.server import ServerConfig, SignalServer


async def raw_session(h, sk=None):
    """A registered connection driven by hand (to send what a real client never would)."""
    conn = await ControlConnection.open(h.invite(), sk or new_key())
    return conn


async def test_garbage_oversized_and_malformed_frames(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, handshake_timeout=0.5)
    good = ControlClient(h.invite(reusable=True), new_key())
    await start_task(nursery, good.run)
    c = h.server.counters

    async def send_and_expect_close(payload: bytes):
        s = await trio.open_tcp_stream(*h.control)
        await s.send_all(payload)
        with trio.fail_after(2):
            while await s.receive_some(4096):
                pass
        await s.aclose()

    await send_and_expect_close(os.urandom(300))  # random bytes instead of a hello
    await send_and_expect_close(struct.pack("!I", 100 << 20))  # 100 MiB announced frame
    await send_and_expect_close(P.frame(P.HELLO_MAGIC + os.urandom(150)))  # hello that does not authenticate
    await send_and_expect_close(b"")  # silent client: closed after the handshake timeout
    assert c["control_bad_hello"] >= 2 and c["control_handshake_failed"] >= 1 and c["control_handshake_timeout"] >= 1

    # after authentication: an oversized frame, a frame that fails AEAD, a non-msgpack plaintext
    conn = await raw_session(h)
    await conn.stream.send_all(struct.pack("!I", P.MAX_CLIENT_FRAME + 1000) + b"x" * 100)
    with trio.fail_after(2):
        while await conn.stream.receive_some(4096):
            pass
    conn = await raw_session(h)
    await conn.stream.send_all(P.frame(os.urandom(64)))
    with trio.fail_after(2):
        while await conn.stream.receive_some(4096):
            pass
    conn = await raw_session(h)
    await conn.stream.send_all(conn.chan.encode_packed(b"\xc1\xc1 not msgpack"))
    with trio.fail_after(2):
        while await conn.stream.receive_some(4096):
            pass
    conn = await raw_session(h)  # wrong field types are ignored and counted, the session survives
    await conn.send({"type": P.T_CANDIDATES, "candidates": [["not-an-ip", 1]]})
    await conn.send({"type": P.T_PUNCH_REQUEST, "peer": 7})
    await conn.send({"type": "from-the-future", "x": 1})
    await conn.heartbeat(1)
    await wait_until(lambda: c["control_unknown_type"] >= 1 and c["control_bad_candidates"] >= 1)
    assert c["control_closed_frame_too_large"] == 1 and c["control_closed_bad_auth"] == 1
    assert c["control_closed_malformed"] == 1
    assert good.reconnects == 0 and good.public_key in h.server.sessions
    assert h.admin.integrity_ok()
    h.admin.close()


async def test_message_flood_closes_only_the_flooder(harness, nursery):
    good = ControlClient(harness.invite(), new_key())
    await start_task(nursery, good.run)
    conn = await raw_session(harness)
    try:
        for i in range(2000):
            await conn.heartbeat(i)
    except (trio.BrokenResourceError, OSError):
        pass
    await wait_until(lambda: harness.server.counters["control_closed_flood"] == 1)
    assert good.public_key in harness.server.sessions and good.reconnects == 0


async def test_slow_client_is_closed(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, send_timeout=0.5)
    slow = await raw_session(h)
    slow.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    from meshwg.wg.crypto import dh_pub as public_key

    slow_pub = public_key(slow.private_key)
    sender = await raw_session(h)
    blob = b"\x00" * (15 * 1024)
    with trio.fail_after(20):
        while h.server.counters["control_closed_slow_client"] == 0:
            for _ in range(20):  # stay under the per-session message rate limit
                await sender.send({"type": P.T_SEAL_SEND, "to": slow_pub, "blob": blob})
            await trio.sleep(0.12)
    await wait_until(lambda: slow_pub not in h.server.sessions)
    await sender.heartbeat(1)  # the well-behaved sender is still served
    with trio.fail_after(2):
        while True:
            data = await sender.stream.receive_some(65536)
            assert data
            if any(m["type"] == P.T_HEARTBEAT_ACK for m in sender.chan.feed_untrusted(data)):
                break
    h.admin.close()


async def test_bogus_join_flood(harness, nursery):
    """Hundreds of failed joins (bad handshakes, forged invites) from one source; good nodes are unaffected."""
    good = ControlClient(harness.invite(reusable=True), new_key())
    await start_task(nursery, good.run)

    async def bogus(i):
        try:
            s = trio.socket.socket()
            await s.bind(("127.0.0.2", 0))
            await s.connect(harness.control)
            st = trio.SocketStream(s)
            if i % 2:
                await st.send_all(P.frame(P.HELLO_MAGIC + os.urandom(120)))
            else:  # a valid handshake with a forged invite secret
                ini = Initiator(new_key(), harness.server.server_pk, os.urandom)
                await st.send_all(P.frame(P.HELLO_MAGIC + ini.write_message1(b"")))
                dec = P.FrameDecoder(1024)
                frames = []
                while not frames:
                    d = await st.receive_some(4096)
                    if not d:
                        return
                    frames = dec.feed_untrusted(d)
                if P.busy_retry_untrusted(frames[0]) is not None:
                    return  # refused as busy (per-source cap, accept rate): that is the point too
                ini.read_message2_untrusted(frames[0])
                ch = P.SecureChannel(ini.send, ini.recv, P.MAX_SERVER_FRAME)
                await st.send_all(ch.encode({"type": P.T_REGISTER, "invite_id": "deadbeef", "secret": os.urandom(16)}))
            with trio.move_on_after(2):
                while await st.receive_some(4096):
                    pass
            await st.aclose()
        except (OSError, trio.BrokenResourceError):
            pass  # the server may reset us: that is the point

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for i in range(300):
                n.start_soon(bogus, i)
    c = harness.server.counters
    assert c["control_refused_busy"] > 0  # the source got blocked after its failure budget
    assert c.get("join_refused_invite_invalid", 0) >= 1
    # a legitimate node from another source joins at once, the connected one never noticed
    conn = await ControlConnection.open(harness.invite(), new_key())
    assert conn.welcome.node_id == 2
    assert good.reconnects == 0
    assert harness.admin.integrity_ok() and len(harness.admin.list_nodes()) == 2


def test_failure_block_survives_a_flood_of_source_ips(tmp_path):
    """Past the limiter's key cap, a blocked source stays blocked: many fresh source IPs must not reset it."""
    server = SignalServer(ServerConfig(db=str(tmp_path / "signal.db"), init=True))
    for _ in range(20):
        server._failed("192.0.2.66", 0.0)
    assert server.failures.exhausted("192.0.2.66", 0.0)
    for i in range(50_010):  # past the 50,000-key cap
        server._failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 0.1)
    assert server.failures.exhausted("192.0.2.66", 0.1)
    assert not server.failures.exhausted("192.0.2.66", 5.0)  # the block still ends by refilling
    server.store.close()

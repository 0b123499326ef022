"""Control server behaviour over loopback: joins, invites, directory, punch, sealed messages, admin changes."""

from __future__ import annotations

import json
import time

import pytest
import trio
from follow import follow
from sig_helpers import harness, new_key, start_server, wait_until, start_task  # noqa: F401 (fixture)

from meshwg.control import ControlClient, ControlConnection, JoinRefusedError, ServerKeyMismatch
from meshwg.control import client as ev
from meshwg.signaling.invite import Invite
from meshwg.signaling.noise import Initiator
from meshwg.signaling import protocol as P
from signal_server.admin import create_invite


async def join(h, inv=None, **kw):
    inv = inv or h.invite()
    return await ControlConnection.open(inv, new_key(), **kw)


async def test_join_with_valid_invite(harness):
    conn = await join(harness, name="Laptop One")
    w = conn.welcome
    assert w.node_id == 1 and w.name == "laptop-one"
    assert w.ipv4.startswith("100.") and w.ipv6.startswith("fd")
    assert w.stun == (harness.udp,) and w.relay_tcp == (harness.relay_tcp,)
    from meshwg.wg.crypto import dh_pub as public_key

    row = harness.admin.get_node(public_key(conn.private_key))
    assert row is not None and row.ipv4 == w.ipv4
    await conn.aclose()


@pytest.mark.parametrize("case", ["expired", "expired_reusable", "revoked", "reused", "forged_secret", "forged_key"])
async def test_bad_invites_fail_clearly(harness, case):
    inv = harness.invite(expires=time.time() + 3600)
    if case == "expired":
        inv = harness.invite(expires=time.time() - 1)
    elif case == "expired_reusable":  # it admitted a node while valid; expired, it admits no other
        inv = harness.invite(reusable=True, expires=time.time() + 0.5)
        c = await ControlConnection.open(inv, new_key())
        await c.aclose()
        await trio.sleep(0.6)
    elif case == "revoked":
        harness.admin.revoke_invite(inv.invite_id)
    elif case == "reused":
        c = await ControlConnection.open(inv, new_key())
        await c.aclose()
    elif case == "forged_secret":
        inv = Invite(inv.addrs, inv.server_key, inv.invite_id, b"\x00" * 16)
    elif case == "forged_key":
        inv = Invite(inv.addrs, new_key(), inv.invite_id, inv.secret)
    expected = {"expired": "invite_expired", "expired_reusable": "invite_expired", "revoked": "invite_revoked",
                "reused": "invite_used", "forged_secret": "invite_invalid"}
    if case == "forged_key":
        with pytest.raises(ServerKeyMismatch, match="pinned"):
            await ControlConnection.open(inv, new_key())
    else:
        with pytest.raises(JoinRefusedError) as info:
            await ControlConnection.open(inv, new_key())
        assert info.value.code == expected[case]
        words = {"expired": "expired", "expired_reusable": "expired", "revoked": "revoked", "reused": "already used",
                 "forged_secret": "forged"}
        assert words[case] in str(info.value)
    assert len(harness.admin.list_nodes()) == (1 if case in ("reused", "expired_reusable") else 0)


async def test_cannot_register_another_nodes_key(harness):
    """The handshake proves possession: presenting a victim's public key without its private key fails."""
    victim = await join(harness)
    from meshwg.wg.crypto import dh_pub as public_key

    victim_pub = public_key(victim.private_key)
    stream = await trio.open_tcp_stream(*harness.control)
    ini = Initiator(new_key(), harness.server.server_pk, lambda n: b"\x01" * n)
    ini.s_pub = victim_pub  # claim the victim's identity; our ss DH still uses our own private key
    await stream.send_all(P.frame(P.HELLO_MAGIC + ini.write_message1(b"")))
    with trio.fail_after(2):  # refused with "not my key" (it could not open message 1), then closed
        assert await stream.receive_some(100) == P.key_refused_frame()
        assert await stream.receive_some(100) == b""
    assert harness.server.counters["control_handshake_failed"] == 1
    # and an attacker's own valid key only ever registers itself
    other = await join(harness)
    assert public_key(other.private_key) != victim_pub and other.welcome.node_id == 2
    await victim.aclose()
    await other.aclose()


async def test_directory_updates_removal_and_rename(harness, nursery):
    inv = harness.invite(reusable=True)
    clients = [ControlClient(inv, new_key(), name=f"n{i}", candidates=[("192.168.1.%d" % i, 51820, "local")]) for i in range(3)]
    for c in clients:
        await start_task(nursery, c.run)
    keys = [c.public_key for c in clients]
    views = [follow(nursery, c) for c in clients]
    await wait_until(lambda: all(len(v.directory) == 2 and all(p.online for p in v.directory.values()) for v in views))
    assert views[0].directory[keys[1]].candidates == (("192.168.1.1", 51820, "local"),)

    # endpoint change propagates
    await clients[2].report_candidates([("10.0.0.9", 4000, "local"), ("203.0.113.7", 60000, "stun")])
    await wait_until(lambda: all(v.directory[keys[2]].candidates[-1] == ("203.0.113.7", 60000, "stun") for v in views[:2]))

    # admin rename (another DB connection, like the CLI) reaches peers
    harness.admin.rename(2, "renamed")
    await wait_until(lambda: views[0].directory[keys[1]].name == "renamed")

    # removal reaches every peer within 1 s and the removed node is told and stops
    t0 = time.monotonic()
    harness.admin.remove(3, time.time())
    await wait_until(lambda: keys[2] not in views[0].directory and keys[2] not in views[1].directory, timeout=1.0)
    assert time.monotonic() - t0 < 1.0
    removed_events = []
    while True:
        try:
            e = views[2].events.receive_nowait()
        except trio.WouldBlock:
            break
        removed_events.append(e)
    assert any(isinstance(e, ev.Removed) and e.reason == "removed" for e in removed_events)

    # a removed key cannot come back with the old (reusable) invite, only with a new one
    with pytest.raises(JoinRefusedError) as info:
        await ControlConnection.open(inv, clients[2].private_key)
    assert info.value.code == "key_removed"
    back = await ControlConnection.open(harness.invite(), clients[2].private_key)
    assert back.welcome.node_id == 4
    await back.aclose()


async def test_expired_node_dropped_and_refused(harness, nursery):
    inv = harness.invite(reusable=True)
    a, b = ControlClient(inv, new_key()), ControlClient(inv, new_key())
    await start_task(nursery, a.run)
    await start_task(nursery, b.run)
    va = follow(nursery, a)
    await wait_until(lambda: b.public_key in va.directory)
    harness.admin.expire(2, time.time())
    await wait_until(lambda: b.public_key not in va.directory, timeout=1.0)
    conn = await ControlConnection.open(inv, b.private_key)  # a valid invite re-admits, same addresses
    assert conn.welcome.node_id == 2
    await conn.aclose()


async def test_punch_and_sealed_messages(harness, nursery):
    inv = harness.invite(reusable=True)
    a = ControlClient(inv, new_key(), candidates=[("192.0.2.1", 1111, "stun")])
    b = ControlClient(inv, new_key(), candidates=[("198.51.100.2", 2222, "stun")])
    await start_task(nursery, a.run)
    await start_task(nursery, b.run)
    va, vb = follow(nursery, a), follow(nursery, b)
    await wait_until(lambda: b.public_key in va.directory and va.directory[b.public_key].online)

    async def next_of(view, kind):
        with trio.fail_after(2):
            async for e in view.events:
                if isinstance(e, kind):
                    return e

    await a.request_punch(b.public_key)
    pa, pb = await next_of(va, ev.PunchNotice), await next_of(vb, ev.PunchNotice)
    assert pa.role == "initiator" and pa.peer.candidates == (("198.51.100.2", 2222, "stun"),)
    assert pb.role == "responder" and pb.peer.key == a.public_key

    await a.send_sealed(b.public_key, b"call me maybe")
    m = await next_of(vb, ev.SealedMessage)
    assert m.sender == a.public_key and m.plaintext == b"call me maybe"


async def test_reconnect_with_backoff_resyncs(harness, nursery):
    inv = harness.invite(reusable=True)
    a = ControlClient(inv, new_key(), backoff_initial=0.05)
    b = ControlClient(inv, new_key())
    await start_task(nursery, a.run)
    await start_task(nursery, b.run)
    va, vb = follow(nursery, a), follow(nursery, b)
    await wait_until(lambda: b.public_key in va.directory)
    # the server drops a's connection; a reconnects (no invite needed) and gets a fresh directory
    harness.server.sessions[a.public_key].scope.cancel()
    await wait_until(lambda: a.reconnects >= 1 and a.conn is not None and a.public_key in harness.server.sessions)
    await wait_until(lambda: b.public_key in va.directory and vb.directory[a.public_key].online)


async def test_heartbeats_keep_idle_session_alive(nursery, tmp_path):
    from sig_helpers import start_server

    h = await start_server(nursery, tmp_path, idle_timeout=0.8)
    a = ControlClient(h.invite(), new_key(), heartbeat=0.25)
    await start_task(nursery, a.run)
    await trio.sleep(2.0)  # well past the idle timeout
    assert a.reconnects == 0 and a.public_key in h.server.sessions
    # a session that stops heartbeating is closed by the server
    silent = await ControlConnection.open(h.invite(), new_key())
    await wait_until(lambda: h.server.counters["control_idle_timeout"] >= 1, timeout=3)
    await silent.aclose()
    h.admin.close()


@pytest.mark.parametrize("advertise", [None, "signal.example"])
async def test_wildcard_binds_are_advertised_by_a_reachable_host(nursery, tmp_path, advertise):
    """Invites get --advertise for a wildcard control bind; the welcome gets it too, else the host the client reached."""
    wild = [("0.0.0.0", 0)]
    h = await start_server(nursery, tmp_path, control=wild, udp=wild, relay_tcp=wild, advertise=advertise)
    ctl, udp, tcp = h.control[1], h.udp[1], h.relay_tcp[1]
    assert json.loads(h.admin.meta_get("control_addrs")) == [f"{advertise or '0.0.0.0'}:{ctl}"]
    inv = create_invite(h.admin, wall=time.time(), addrs=[f"127.0.0.1:{ctl}"])
    conn = await ControlConnection.open(inv, new_key())
    host = advertise or "127.0.0.1"
    w = conn.welcome
    assert w.stun == w.relay_udp == ((host, udp),) and w.relay_tcp == ((host, tcp),)
    await conn.aclose()
    h.admin.close()

"""RelayCore's documented limits and lifetimes, as a node and an attacker see them (issue 18 item 3): the
120 s HELLO clock skew and its replay window, the session TTL in the HELLO_OK and when a session stops
forwarding, the per-key packet/byte/HELLO budgets, the size cap, CONFIRM, the observed address published only
after the confirming SEND, the per-source and global junk budgets (and the proven-source exemption and its
600 s lifetime), the notice budget, membership changes and TCP connections going away. Bounds are literals
from relay.py's and relay_wire.py's documentation and the defaults a relay runs with."""

from __future__ import annotations

import gc
import struct
import weakref

from nacl.public import Box, PrivateKey, PublicKey

from meshwg.signaling import relay_wire as W
from meshwg.wg.crypto import clamp, dh_pub as public_key
from signal_server.relay import RelayCore

WALL0 = 1_700_000_000.0
A_SRC, B_SRC, ATTACKER = (0, ("198.51.100.1", 4000)), (0, ("198.51.100.2", 4000)), (0, ("203.0.113.66", 6666))
SERVER_SK = clamp(bytes(range(1, 33)))
SERVER_PK = public_key(SERVER_SK)
SK_A, SK_B, SK_C = clamp(bytes(32 * [0xA1])), clamp(bytes(32 * [0xB2])), clamp(bytes(32 * [0xD4]))
PK_A, PK_B, PK_C = public_key(SK_A), public_key(SK_B), public_key(SK_C)
SK_OF = {PK_A: SK_A, PK_B: SK_B, PK_C: SK_C}
MAX_PACKET = 65535 - 64  # relay_wire's documented cap


class Conn:
    """A TCP connection object as the relay shell passes it (compared by identity)."""


def _random():
    n = [0]

    def rb(k):
        n[0] += 1
        return (n[0].to_bytes(4, "big") * (k // 4 + 1))[:k]
    return rb


_nonces = iter(range(1, 1 << 40))


def hello(key: bytes, wall: float, nonce: bytes | None = None) -> bytes:
    nonce = nonce or next(_nonces).to_bytes(24, "big")
    plain = struct.pack("!Q", int(round(wall * 1000))) + b"r" * 8
    return W.MAGIC + bytes([W.T_HELLO]) + key + bytes(Box(PrivateKey(SK_OF[key]), PublicKey(SERVER_PK)).encrypt(plain, nonce))


def junk_hello(key: bytes, i: int = 0) -> bytes:
    return W.MAGIC + bytes([W.T_HELLO]) + key + i.to_bytes(W.HELLO_LEN - 37, "big")


def core(**kw) -> RelayCore:
    c = RelayCore(SERVER_SK, _random(), **kw)
    c.set_allowed({PK_A, PK_B, PK_C})
    return c


def ok_token(out, key: bytes):
    """The token of a HELLO_OK the node accepts, else None."""
    if len(out) != 1:
        return None
    parsed = W.parse_hello_ok_untrusted(SK_OF[key], SERVER_PK, out[0][0])
    return parsed and parsed[0]


def notice(out):
    return W.parse_notice_untrusted(out[0][0]) if len(out) == 1 else None


def join(c: RelayCore, key: bytes, src, now: float = 0.0, observed=None) -> bytes:
    out = c.handle_untrusted(hello(key, WALL0 + now), src, now, WALL0 + now, observed)
    token = ok_token(out, key)
    assert token is not None and out[0][1] is src
    return token


def send(c, token, dst, packet, src, now=0.0):
    return c.handle_untrusted(W.encode_send(token, dst, packet), src, now, WALL0 + now)


def delivered(out, src_key, packet, dest) -> bool:
    return out == [(W.encode_recv(src_key, packet), dest)]


# --- HELLO: clock skew, replay, TTL, budget


def test_a_hello_stamped_up_to_120s_off_is_accepted_beyond_is_stale():
    c = core()
    for off in (120.0, -120.0):
        assert ok_token(c.handle_untrusted(hello(PK_A, WALL0 + off), A_SRC, 0.0, WALL0), PK_A)
    for off in (120.01, -120.01):
        out = c.handle_untrusted(hello(PK_B, WALL0 + off), B_SRC, 0.0, WALL0)
        assert notice(out) == (W.N_STALE_HELLO, PK_B) and out[0][1] is B_SRC
    assert c.counters["drop_hello_stale"] == 2 and c.counters["hello_ok"] == 2


def test_a_replayed_hello_is_refused_while_its_stamp_is_still_fresh():
    c = core()
    frame = hello(PK_A, WALL0)
    assert ok_token(c.handle_untrusted(frame, A_SRC, 0.0, WALL0), PK_A)
    for later in (0.0, 60.0, 119.0):  # the stamp is still within 120 s: only the replay cache stops it
        out = c.handle_untrusted(frame, ATTACKER, later, WALL0 + later)
        assert notice(out) == (W.N_STALE_HELLO, PK_A)
    assert c.counters["hello_ok"] == 1 and c.counters["drop_hello_stale"] == 3


def test_hello_ok_carries_the_session_ttl_and_the_observed_address():
    for ttl, kw in ((90, {}), (30, {"session_ttl": 30.0})):
        c = core(**kw)
        out = c.handle_untrusted(hello(PK_A, WALL0), A_SRC, 0.0, WALL0, ("198.51.100.1", 4000))
        assert W.parse_hello_ok_untrusted(SK_A, SERVER_PK, out[0][0])[1:] == (ttl, ("198.51.100.1", 4000))
        token = W.parse_hello_ok_untrusted(SK_A, SERVER_PK, out[0][0])[0]
        assert len(token) == 8


def test_a_session_forwards_until_its_ttl_then_asks_for_a_new_hello():
    c = core(session_ttl=30.0)
    ta, tb = join(c, PK_A, A_SRC), join(c, PK_B, B_SRC)
    assert delivered(send(c, ta, PK_B, b"p", A_SRC, 30.0), PK_A, b"p", B_SRC)  # at exactly the TTL: still on
    out = send(c, ta, PK_B, b"p", A_SRC, 30.01)
    assert notice(out) == (W.N_REHELLO, bytes(32)) and out[0][1] is A_SRC
    # The expired session is gone: B's packets to A find no peer, even once B has a fresh session.
    tb = join(c, PK_B, B_SRC, 31.0)
    assert send(c, tb, PK_A, b"q", B_SRC, 31.0) == [] and c.counters["drop_peer_absent"] == 1
    assert PK_A not in c.by_key


def test_a_peer_whose_session_expired_is_absent():
    c = core(session_ttl=30.0)
    join(c, PK_A, A_SRC)
    tb = join(c, PK_B, B_SRC, 20.0)
    assert delivered(send(c, tb, PK_A, b"x", B_SRC, 30.0), PK_B, b"x", A_SRC)
    assert send(c, tb, PK_A, b"x", B_SRC, 30.01) == [] and c.counters["drop_peer_absent"] == 1


def test_a_new_hello_replaces_the_old_token():
    c = core()
    old = join(c, PK_A, A_SRC)
    tb = join(c, PK_B, B_SRC)
    new = join(c, PK_A, A_SRC, 1.0)
    assert new != old
    assert notice(send(c, old, PK_B, b"x", A_SRC, 1.0)) == (W.N_REHELLO, bytes(32))
    assert delivered(send(c, new, PK_B, b"x", A_SRC, 1.0), PK_A, b"x", B_SRC)
    assert delivered(send(c, tb, PK_A, b"y", B_SRC, 1.0), PK_B, b"y", A_SRC)


def test_authenticated_hellos_per_key_burst_20_then_5_a_second():
    c = core()
    assert all(ok_token(c.handle_untrusted(hello(PK_A, WALL0), A_SRC, 0.0, WALL0), PK_A) for _ in range(20))
    assert c.handle_untrusted(hello(PK_A, WALL0), A_SRC, 0.0, WALL0) == []
    assert c.counters["drop_hello_rate"] == 1
    assert ok_token(c.handle_untrusted(hello(PK_B, WALL0), B_SRC, 0.0, WALL0), PK_B)  # per key
    assert ok_token(c.handle_untrusted(hello(PK_A, WALL0 + 0.2), A_SRC, 0.2, WALL0 + 0.2), PK_A)
    assert c.handle_untrusted(hello(PK_A, WALL0 + 0.2), A_SRC, 0.2, WALL0 + 0.2) == []


# --- SEND: size, budgets, CONFIRM, observed


def test_packets_up_to_the_cap_are_forwarded_larger_ones_dropped():
    c = core()
    ta, _ = join(c, PK_A, A_SRC), join(c, PK_B, B_SRC)
    assert delivered(send(c, ta, PK_B, b"z" * MAX_PACKET, A_SRC), PK_A, b"z" * MAX_PACKET, B_SRC)
    assert send(c, ta, PK_B, b"z" * (MAX_PACKET + 1), A_SRC) == []
    assert c.counters["drop_too_big"] == 1 and c.counters["forwarded_bytes"] == MAX_PACKET
    assert c.counters["forwarded_packets"] == 1


def test_a_key_may_send_8000_packets_at_once_then_4000_a_second():
    c = core()
    ta, _ = join(c, PK_A, A_SRC), join(c, PK_B, B_SRC)
    frame = W.encode_send(ta, PK_B, b"p")
    assert sum(bool(c.handle_untrusted(frame, A_SRC, 1.0, WALL0)) for _ in range(8001)) == 8000
    assert c.counters["drop_rate_limited"] == 1
    assert sum(bool(c.handle_untrusted(frame, A_SRC, 1.25, WALL0)) for _ in range(1001)) == 1000


def test_a_key_may_send_32mb_at_once_then_16mb_a_second():
    c = core()
    ta, _ = join(c, PK_A, A_SRC), join(c, PK_B, B_SRC)
    big = W.encode_send(ta, PK_B, b"z" * 64_000)
    assert sum(bool(c.handle_untrusted(big, A_SRC, 1.0, WALL0)) for _ in range(501)) == 500  # 32e6 / 64e3
    assert sum(bool(c.handle_untrusted(big, A_SRC, 1.5, WALL0)) for _ in range(126)) == 125  # 8e6 / 64e3
    assert c.counters["forwarded_bytes"] == 625 * 64_000


def test_confirm_forwards_nothing_but_an_empty_packet_to_a_peer_is_forwarded():
    c = core()
    ta, _ = join(c, PK_A, A_SRC), join(c, PK_B, B_SRC)
    assert send(c, ta, bytes(32), b"", A_SRC) == [] and c.counters["confirm"] == 1
    assert send(c, ta, bytes(32), b"x", A_SRC) == [] and c.counters["drop_plain_unrouted"] == 1  # for the plain port: no pair
    assert delivered(send(c, ta, PK_B, b"", A_SRC), PK_A, b"", B_SRC)
    assert c.counters["confirm"] == 1


def test_the_observed_address_is_published_once_after_the_first_send_from_the_hello_source():
    c = core()
    ta = join(c, PK_A, A_SRC, observed=A_SRC[1])
    assert c.pop_observed() == []
    assert notice(send(c, ta, bytes(32), b"", ATTACKER)) == (W.N_REHELLO, bytes(32))  # the token from elsewhere
    assert c.pop_observed() == []
    send(c, ta, bytes(32), b"", A_SRC)
    assert c.pop_observed() == [(PK_A, A_SRC[1])]
    send(c, ta, bytes(32), b"", A_SRC)
    assert c.pop_observed() == []
    conn = Conn()
    tb = join(c, PK_B, conn)  # TCP: nothing to publish
    send(c, tb, bytes(32), b"", conn)
    assert c.pop_observed() == []


def test_a_token_from_another_source_neither_forwards_nor_ends_the_session():
    c = core()
    ta, _ = join(c, PK_A, A_SRC), join(c, PK_B, B_SRC)
    out = send(c, ta, PK_B, b"x", ATTACKER)
    assert notice(out) == (W.N_REHELLO, bytes(32)) and out[0][1] is ATTACKER
    assert c.counters["refused_no_session"] == 1
    assert delivered(send(c, ta, PK_B, b"x", A_SRC), PK_A, b"x", B_SRC)


def test_expire_forgets_sessions_past_their_ttl_only():
    c = core(session_ttl=30.0)
    join(c, PK_A, A_SRC)
    join(c, PK_B, B_SRC, 10.0)
    c.expire(30.0)
    assert set(c.by_key) == {PK_A, PK_B} and len(c.by_token) == 2
    c.expire(30.01)
    assert set(c.by_key) == {PK_B} and len(c.by_token) == 1


def test_removing_a_key_from_the_registry_ends_its_session():
    c = core()
    ta, tb = join(c, PK_A, A_SRC), join(c, PK_B, B_SRC)
    c.set_allowed({PK_B})
    assert notice(send(c, ta, PK_B, b"x", A_SRC)) == (W.N_REHELLO, bytes(32))
    assert send(c, tb, PK_A, b"x", B_SRC) == [] and c.counters["drop_peer_absent"] == 1
    assert notice(c.handle_untrusted(hello(PK_A, WALL0), A_SRC, 0.0, WALL0)) == (W.N_NOT_REGISTERED, PK_A)
    assert delivered(send(c, tb, PK_B, b"self", B_SRC), PK_B, b"self", B_SRC)


# --- TCP connections


def test_a_closed_tcp_connection_ends_its_sessions_only():
    c = core()
    conn = Conn()
    ta, tb = join(c, PK_A, conn), join(c, PK_B, B_SRC)
    c.drop_dest(Conn())  # another connection: nothing changes
    assert delivered(send(c, tb, PK_A, b"x", B_SRC), PK_B, b"x", conn)
    c.drop_dest(conn)
    assert send(c, tb, PK_A, b"x", B_SRC) == [] and c.counters["drop_peer_absent"] == 1
    assert notice(send(c, ta, PK_B, b"x", conn)) == (W.N_REHELLO, bytes(32))
    assert PK_A not in c.by_key and set(c.by_token) == {tb}


def test_tcp_connections_have_separate_junk_budgets_and_are_not_kept_alive_by_them():
    c = core()
    bad, good = Conn(), Conn()
    for i in range(30):
        c.handle_untrusted(junk_hello(PK_A, i), bad, 0.0, WALL0)
    assert c.counters["drop_hello_auth"] == 10 and c.counters["drop_hello_junk_rate"] == 20
    join(c, PK_B, good)  # another connection from the same host still gets its HELLO opened
    ref = weakref.ref(bad)
    del bad
    gc.collect()
    assert ref() is None


def test_a_connection_that_closed_leaves_no_junk_debt_behind():
    c = core()
    conn = Conn()
    for i in range(10):
        c.handle_untrusted(junk_hello(PK_A, i), conn, 0.0, WALL0)
    assert c.handle_untrusted(hello(PK_A, WALL0), conn, 0.0, WALL0) == []  # budget spent
    c.drop_dest(conn)
    join(c, PK_A, conn)  # the table keyed it by identity; nothing is left under that identity


# --- junk budgets


def test_junk_hellos_per_source_10_at_once_then_2_a_second():
    c = core()
    for i in range(12):
        c.handle_untrusted(junk_hello(PK_A, i), ATTACKER, 0.0, WALL0)
    assert c.counters["drop_hello_auth"] == 10 and c.counters["drop_hello_junk_rate"] == 2
    assert c.handle_untrusted(hello(PK_A, WALL0), ATTACKER, 0.0, WALL0) == []  # even a good one, from there
    assert ok_token(c.handle_untrusted(hello(PK_A, WALL0), A_SRC, 0.0, WALL0), PK_A)  # not from elsewhere
    for i in range(2):
        c.handle_untrusted(junk_hello(PK_A, 100 + i), ATTACKER, 1.0, WALL0)
    assert c.counters["drop_hello_auth"] == 12
    assert c.handle_untrusted(junk_hello(PK_A, 200), ATTACKER, 1.0, WALL0) == []
    assert c.counters["drop_hello_auth"] == 12 and c.counters["drop_hello_junk_rate"] == 4


def test_stale_hellos_are_junk_too():
    c = core()
    for _ in range(10):
        c.handle_untrusted(hello(PK_A, WALL0 - 500), ATTACKER, 0.0, WALL0)
    assert c.counters["drop_hello_stale"] == 10
    assert c.handle_untrusted(hello(PK_A, WALL0), ATTACKER, 0.0, WALL0) == []
    assert c.counters["drop_hello_junk_rate"] == 1


def _spoofed(i: int):
    return (0, (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 9))


def test_junk_from_everywhere_is_opened_5000_at_once():
    c = core()
    for i in range(5000):
        c.handle_untrusted(junk_hello(PK_A, i), _spoofed(i), 0.0, WALL0)
    assert c.counters["drop_hello_auth"] == 5000
    assert c.handle_untrusted(hello(PK_B, WALL0), B_SRC, 0.0, WALL0) == []  # unproven: not opened
    assert c.counters["drop_hello_junk_global"] == 1 and c.counters["drop_hello_auth"] == 5000
    assert ok_token(c.handle_untrusted(hello(PK_B, WALL0 + 0.01), B_SRC, 0.01, WALL0 + 0.01), PK_B)  # 50 refilled


def test_a_proven_source_gets_its_hellos_opened_and_its_junk_costs_no_one_else():
    c = core()
    ta = join(c, PK_A, A_SRC)
    send(c, ta, bytes(32), b"", A_SRC)  # proves (A_SRC, A)
    for i in range(5100):  # junk spoofed from A's own address, naming A
        c.handle_untrusted(junk_hello(PK_A, i), A_SRC, 1.0, WALL0 + 1)
    assert c.counters["drop_hello_auth"] == 5100 and c.counters["drop_hello_junk_rate"] == 0
    assert ok_token(c.handle_untrusted(hello(PK_A, WALL0 + 1), A_SRC, 1.0, WALL0 + 1), PK_A)
    assert ok_token(c.handle_untrusted(hello(PK_B, WALL0 + 1), B_SRC, 1.0, WALL0 + 1), PK_B)  # global intact
    # The exemption is for (A_SRC, A) only: that junk spent A_SRC's own budget, so HELLOs naming C from there
    # are not opened.
    for i in range(11):
        c.handle_untrusted(junk_hello(PK_C, i), A_SRC, 1.0, WALL0 + 1)
    assert c.counters["drop_hello_junk_rate"] == 11 and c.counters["drop_hello_auth"] == 5100


def test_the_proven_exemption_lasts_600s_from_the_confirming_send():
    def lockout_at(t: float) -> bool:
        c = core()
        ta = join(c, PK_A, A_SRC)
        send(c, ta, bytes(32), b"", A_SRC)
        for i in range(12):
            c.handle_untrusted(junk_hello(PK_A, i), A_SRC, t, WALL0 + t)
        return c.handle_untrusted(hello(PK_A, WALL0 + t), A_SRC, t, WALL0 + t) == []
    assert not lockout_at(600.0)
    assert lockout_at(600.01)


# --- notices


def test_notices_per_source_20_at_once_then_5_a_second():
    c = core()
    c.set_allowed(set())
    outs = [c.handle_untrusted(hello(PK_A, WALL0), ATTACKER, 0.0, WALL0) for _ in range(21)]
    assert [len(o) for o in outs] == [1] * 20 + [0]
    assert all(notice(o) == (W.N_NOT_REGISTERED, PK_A) and o[0][1] is ATTACKER for o in outs[:20])
    assert c.counters["refused_unregistered"] == 21
    assert len(c.handle_untrusted(hello(PK_A, WALL0), A_SRC, 0.0, WALL0)) == 1  # per source
    assert len(c.handle_untrusted(hello(PK_A, WALL0), ATTACKER, 0.2, WALL0)) == 1
    assert c.handle_untrusted(hello(PK_A, WALL0), ATTACKER, 0.2, WALL0) == []


def test_frames_the_relay_does_not_take_are_dropped_and_counted():
    c = core()
    for frame in (W.encode_recv(PK_A, b"x"), W.encode_notice(1), W.MAGIC + bytes([W.T_HELLO_OK]) + b"x" * 40,
                  b"\xffMW", b"", W.MAGIC + b"\x00\x00"):
        assert c.handle_untrusted(frame, ATTACKER, 0.0, WALL0) == []
    assert c.counters["drop_bad_frame"] == 6
    assert c.handle_untrusted(W.MAGIC + bytes([W.T_SEND]) + b"x" * 39, ATTACKER, 0.0, WALL0) == []
    assert c.handle_untrusted(W.MAGIC + bytes([W.T_HELLO]) + b"x" * 100, ATTACKER, 0.0, WALL0) == []
    assert c.counters["drop_bad_send"] == 1 and c.counters["drop_bad_hello"] == 1

"""RelayCore.handle_untrusted, the internet-facing relay, on structured frames (issue 18): HELLOs whose box
opens but says the wrong thing, SENDs with a real token from the wrong place, and the well-formed frames
beside them. Each frame moves the one counter its kind calls for, by exactly one, and answers exactly as
the protocol says (a HELLO_OK the node accepts, the packet delivered unchanged, a notice, or nothing).
test_relay_abuse.py checks "exactly one counter" on random frames; this checks which one."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from meshwg.signaling import relay_wire as W
from meshwg.control.relay_client import RelaySession
from meshwg.wg.crypto import clamp, dh_pub as public_key
from signal_server.relay import RelayCore

WALL0 = 1_700_000_000.0
A_SRC, B_SRC, ATTACKER = (0, ("198.51.100.1", 4000)), (0, ("198.51.100.2", 4000)), (0, ("203.0.113.66", 6666))
SERVER_SK = clamp(bytes(range(1, 33)))
SERVER_PK = public_key(SERVER_SK)
SK_A, SK_B, SK_X = clamp(bytes(32 * [0xA1])), clamp(bytes(32 * [0xB2])), clamp(bytes(32 * [0xC3]))
PK_A, PK_B, PK_X = public_key(SK_A), public_key(SK_B), public_key(SK_X)


def _counting_random(tag: int):
    """Distinct, repeatable bytes per owner (the relay's replay cache keys HELLOs by nonce)."""
    n = [0]

    def rb(k):
        n[0] += 1
        return ((tag << 24 | n[0]).to_bytes(4, "big") * (k // 4 + 1))[:k]
    return rb


def _setup():
    core = RelayCore(SERVER_SK, _counting_random(1))
    core.set_allowed({PK_A, PK_B})
    ra, rb = RelaySession(SK_A, SERVER_PK, _counting_random(2)), RelaySession(SK_B, SERVER_PK, _counting_random(3))
    for rs, src in ((ra, A_SRC), (rb, B_SRC)):
        [(reply, dest)] = core.handle_untrusted(rs.hello(0.0, WALL0), src, 0.0, WALL0, observed=src[1])
        assert dest == src and rs.handle_untrusted(reply, 0.0)[0] == "ready"
    return core, ra, rb


def _hello(sk: bytes, key: bytes, wall_ms: int, nonce: bytes, plain_len: int = 16) -> bytes:
    plain = (struct.pack("!Q", wall_ms) + b"r" * 8 + b"x" * 8)[:plain_len]
    return W.MAGIC + bytes([W.T_HELLO]) + key + bytes(Box(PrivateKey(sk), PublicKey(SERVER_PK)).encrypt(plain, nonce))


# kind -> (the counter it moves, what comes back: "hello_ok", "recv", a notice code, or None)
OUTCOME = {
    "hello_fresh": ("hello_ok", "hello_ok"),
    "hello_stale": ("drop_hello_stale", W.N_STALE_HELLO),
    "hello_replay": ("drop_hello_stale", W.N_STALE_HELLO),
    "hello_forged": ("drop_hello_auth", None),
    "hello_unregistered": ("refused_unregistered", W.N_NOT_REGISTERED),
    "hello_box_size": ("drop_bad_hello", None),
    "hello_cut": ("drop_bad_hello", None),
    "send_ok": ("forwarded_packets", "recv"),
    "send_wrong_source": ("refused_no_session", W.N_REHELLO),
    "send_unknown_token": ("refused_no_session", W.N_REHELLO),
    "send_expired": ("refused_no_session", W.N_REHELLO),
    "send_too_big": ("drop_too_big", None),
    "send_absent_peer": ("drop_peer_absent", None),
    "send_short": ("drop_bad_send", None),
    "other_type": ("drop_bad_frame", None),
    "not_relay": ("drop_bad_frame", None),
}


@st.composite
def hostile_frame(draw, kind: str):
    """builder(ra, first_hello) -> (frame, source, now) for a frame of `kind` with drawn contents."""
    packet = draw(st.binary(max_size=200))
    nonce = draw(st.binary(min_size=24, max_size=24))
    skew = draw(st.one_of(st.floats(121, 1e6), st.floats(-1e6, -121))) * 1000
    now = draw(st.floats(0.5, 60))
    cut = draw(st.integers(6, W.HELLO_LEN - 1))   # 6 bytes: the shortest frame read as a relay frame
    other = draw(st.integers(0, 255).filter(lambda t: t not in (W.T_HELLO, W.T_SEND, W.T_HELLO_CRED, W.T_PING)))
    junk = draw(st.binary(max_size=60).filter(lambda b: b[:4] != W.MAGIC))
    token = draw(st.binary(min_size=8, max_size=8))
    wall_ms = int((WALL0 + now) * 1000)

    def build(ra: RelaySession, first_hello: bytes):
        if kind == "hello_fresh":
            return _hello(SK_A, PK_A, wall_ms, nonce), A_SRC, now
        if kind == "hello_stale":
            return _hello(SK_A, PK_A, max(0, int(wall_ms + skew)), nonce), A_SRC, now
        if kind == "hello_replay":
            return first_hello, A_SRC, now
        if kind == "hello_forged":   # names A, boxed by someone else
            return _hello(SK_X, PK_A, wall_ms, nonce), ATTACKER, now
        if kind == "hello_unregistered":
            return _hello(SK_X, PK_X, wall_ms, nonce), ATTACKER, now
        if kind == "hello_box_size":
            return _hello(SK_A, PK_A, wall_ms, nonce, plain_len=draw_len), A_SRC, now
        if kind == "hello_cut":
            return _hello(SK_A, PK_A, wall_ms, nonce)[:cut], A_SRC, now
        if kind == "send_ok":
            return ra.encode_send(PK_B, packet), A_SRC, now
        if kind == "send_wrong_source":
            return ra.encode_send(PK_B, packet), ATTACKER, now
        if kind == "send_unknown_token":
            return W.encode_send(token if token != ra.token else b"\0" * 8, PK_B, packet), A_SRC, now
        if kind == "send_expired":
            return ra.encode_send(PK_B, packet), A_SRC, W.SESSION_TTL + 1 + now
        if kind == "send_too_big":
            return ra.encode_send(PK_B, b"\0" * (W.MAX_PACKET + 1 + len(packet))), A_SRC, now
        if kind == "send_absent_peer":
            return ra.encode_send(PK_X, packet), A_SRC, now
        if kind == "send_short":
            return ra.encode_send(PK_B, b"")[:6 + cut % 39], A_SRC, now
        if kind == "other_type":
            return W.MAGIC + bytes([other]) + packet, A_SRC, now
        return junk, ATTACKER, now

    draw_len = draw(st.sampled_from([0, 8, 15, 17, 24, 40]))
    return build


@pytest.mark.parametrize("kind", sorted(OUTCOME))
@settings(max_examples=max(20, settings().max_examples // 5))   # per kind: a fifth of the profile's count
@given(data=st.data())
def test_each_frame_moves_its_own_counter_and_answers_as_specified(kind, data):
    build = data.draw(hostile_frame(kind))
    core, ra, rb = _setup()
    first_hello = ra.hello(0.0, WALL0)   # a HELLO the relay will see once (below), then as a replay
    core.handle_untrusted(first_hello, A_SRC, 0.0, WALL0)
    ra.handle_untrusted(core.handle_untrusted(ra.hello(0.0, WALL0), A_SRC, 0.0, WALL0)[0][0], 0.0)
    frame, src, now = build(ra, first_hello)
    before = {k: v for k, v in core.counters.items() if k != "forwarded_bytes"}
    out = core.handle_untrusted(frame, src, now, WALL0 + now, observed=src[1])
    after = {k: v for k, v in core.counters.items() if k != "forwarded_bytes"}
    counter, answer = OUTCOME[kind]
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    assert {k: v for k, v in moved.items() if v} == {counter: 1}, (kind, moved)
    if answer is None:
        assert out == []
    elif answer == "hello_ok":
        [(reply, dest)] = out
        assert dest == A_SRC and ra.handle_untrusted(reply, now)[0] == "ready"
        assert core.by_key[PK_A].dest == A_SRC
    elif answer == "recv":
        [(reply, dest)] = out
        assert dest == B_SRC and rb.handle_untrusted(reply, now) == ("recv", PK_A, frame[45:])
    else:
        [(reply, dest)] = out
        assert dest == src and W.parse_notice_untrusted(reply)[0] == answer

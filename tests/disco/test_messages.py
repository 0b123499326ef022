import random

from hypothesis import given, settings, strategies as st
from nacl.public import PrivateKey

from meshwg.disco.messages import (MAGIC, MAX_CMM_ENDPOINTS, CallMeMaybe, DiscoCodec, Ping, Pong,
                                   decode_payload_untrusted, TYPE_CALL_ME_MAYBE)

WALL = 1_700_000_000.0


def _rb(seed):
    r = random.Random(seed)
    return lambda n: r.getrandbits(8 * n).to_bytes(n, "big")


def pair():
    ka, kb = PrivateKey(_rb(1)(32)), PrivateKey(_rb(2)(32))
    a, b = DiscoCodec(bytes(ka), _rb(3)), DiscoCodec(bytes(kb), _rb(4))
    a.add_peer(b.public_key)
    b.add_peer(a.public_key)
    return a, b


def test_roundtrip_all_types():
    a, b = pair()
    for msg in [Ping(b"t" * 12, a.public_key, 100), Pong(b"u" * 12, ("203.0.113.7", 41641)),
                Pong(b"v" * 12, ("2001:db8::1", 5)),
                CallMeMaybe((("192.168.1.2", 1), ("198.51.100.1", 65535), ("2001:db8::2", 7)))]:
        data = a.seal(b.public_key, msg, WALL)
        assert data.startswith(MAGIC)
        assert b.open_untrusted(data, WALL + 1) == (a.public_key, msg)


def test_forged_foreign_replayed_stale_dropped_and_counted():
    a, b = pair()
    data = a.seal(b.public_key, Ping(b"t" * 12, a.public_key), WALL)
    assert b.open_untrusted(data, WALL) is not None
    assert b.open_untrusted(data, WALL + 1) is None
    assert b.drops["disco_replay"] == 1
    forged = bytearray(a.seal(b.public_key, Ping(b"x" * 12, a.public_key), WALL))
    forged[-1] ^= 1
    assert b.open_untrusted(bytes(forged), WALL) is None
    assert b.drops["disco_forged"] == 1
    stranger = DiscoCodec(bytes(PrivateKey(_rb(9)(32))), _rb(10))
    stranger.add_peer(b.public_key)
    assert b.open_untrusted(stranger.seal(b.public_key, Ping(b"s" * 12, stranger.public_key), WALL), WALL) is None
    assert b.drops["disco_unknown_sender"] == 1
    old = a.seal(b.public_key, Ping(b"o" * 12, a.public_key), WALL - 1000)
    assert b.open_untrusted(old, WALL) is None
    assert b.drops["disco_stale"] == 1
    # a ping claiming another node key inside a valid box
    bad = a.seal(b.public_key, Ping(b"k" * 12, b"\1" * 32), WALL)
    assert b.open_untrusted(bad, WALL) is None
    assert b.drops["disco_key_mismatch"] == 1
    # removed peer: foreign again
    b.remove_peer(a.public_key)
    assert b.open_untrusted(a.seal(b.public_key, Ping(b"r" * 12, a.public_key), WALL), WALL) is None


def test_replay_cache_is_bounded():
    ka, kb = PrivateKey(_rb(1)(32)), PrivateKey(_rb(2)(32))
    a, b = DiscoCodec(bytes(ka), _rb(3)), DiscoCodec(bytes(kb), _rb(4), nonce_cache=50)
    a.add_peer(b.public_key)
    b.add_peer(a.public_key)
    for i in range(200):
        assert b.open_untrusted(a.seal(b.public_key, Ping(b"t" * 12, a.public_key), WALL), WALL) is not None
    assert len(b._seen) <= 50


def test_call_me_maybe_bounded():
    too_many = b"\0" * 18 * (MAX_CMM_ENDPOINTS + 1)
    assert decode_payload_untrusted(TYPE_CALL_ME_MAYBE, too_many) is None
    assert decode_payload_untrusted(TYPE_CALL_ME_MAYBE, b"\0" * 17) is None


A, B = pair()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1600))
def test_open_untrusted_random_bytes_never_raises(data):
    assert B.open_untrusted(data, WALL) is None
    assert B.open_untrusted(MAGIC + data, WALL) is None
    assert B.open_untrusted(MAGIC + A.public_key + data, WALL) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=700))
def test_decode_payload_random_never_raises(t, payload):
    decode_payload_untrusted(t, payload)

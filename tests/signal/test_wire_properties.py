"""Property tests for the readers of control-plane bytes from the network or a peer (issue 18):
the Noise IK handshake readers, the control channel (FrameDecoder, SecureChannel), sealed boxes and the
relay's TCP framing. Inputs are structured (real messages with one hostile change, frames split at any
point) besides random bytes; outcomes are exact: the documented result or the documented refusal,
never another exception."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st
from nacl.public import PrivateKey

from meshwg.signaling import protocol as P
from meshwg.signaling import relay_wire as W
from meshwg.signaling import sealed
from meshwg.signaling.noise import CipherState, HandshakeError, Initiator, Responder
from meshwg.wg.crypto import clamp, dh_pub as public_key

# Curve25519 points of small order (libsodium's blocklist): a DH with them gives the all-zero secret.
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"),
             bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
             bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
             bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
             bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")]

SERVER_SK = clamp(bytes(range(32)))
SERVER_PK = public_key(SERVER_SK)
NODE_SK = clamp(bytes(range(32, 64)))


def _rand(seed: int):
    import random
    r = random.Random(seed)
    return lambda n: r.getrandbits(8 * n).to_bytes(n, "big")


def _hostile(msg: bytes, change: tuple) -> bytes:
    """One hostile change to a real message: flip a bit, cut it, extend it, or swap in a low-order point."""
    kind, pos, val = change
    if kind == "flip":
        i = pos % len(msg)
        return msg[:i] + bytes([msg[i] ^ (1 << (val % 8))]) + msg[i + 1:]
    if kind == "cut":
        return msg[:pos % len(msg)]
    if kind == "extend":
        return msg + bytes([val]) * (1 + pos % 40)
    return LOW_ORDER[val % len(LOW_ORDER)] + msg[32:]   # "low_order" ephemeral


CHANGES = st.tuples(st.sampled_from(["flip", "flip", "cut", "extend", "low_order"]), st.integers(0, 10_000),
                    st.integers(0, 255))


# --- Noise IK handshake readers


@given(st.binary(max_size=300), CHANGES, st.integers(0, 2**32))
def test_read_message1_authenticates_or_raises_handshake_error(payload, change, seed):
    """The server's reader: a real message 1 gives back the node's key and payload; that message with one
    hostile change raises HandshakeError (nothing else); so do random bytes of any length."""
    ini = Initiator(NODE_SK, SERVER_PK, _rand(seed))
    m1 = ini.write_message1(payload)
    assert Responder(SERVER_SK, _rand(1)).read_message1_untrusted(m1) == (public_key(NODE_SK), payload)
    with pytest.raises(HandshakeError):
        Responder(SERVER_SK, _rand(1)).read_message1_untrusted(_hostile(m1, change))
    with pytest.raises(HandshakeError):
        Responder(SERVER_SK, _rand(1)).read_message1_untrusted(_rand(seed)(change[1] % 200))


@given(st.binary(max_size=300), CHANGES, st.integers(0, 2**32))
def test_read_message2_authenticates_or_raises_handshake_error(payload, change, seed):
    ini = Initiator(NODE_SK, SERVER_PK, _rand(seed))
    res = Responder(SERVER_SK, _rand(seed + 1))
    res.read_message1_untrusted(ini.write_message1(b""))
    m2 = res.write_message2(payload)
    bad = _hostile(m2, change)
    twin = Initiator(NODE_SK, SERVER_PK, _rand(seed))   # the same handshake state, for the hostile copy
    twin.write_message1(b"")
    assert ini.read_message2_untrusted(m2) == payload and ini.handshake_hash == res.handshake_hash
    with pytest.raises(HandshakeError):
        twin.read_message2_untrusted(bad)
    assert twin.send is None and twin.recv is None   # no transport keys from a refused message


def test_message1_from_a_node_that_pinned_another_key_is_refused():
    ini = Initiator(NODE_SK, public_key(clamp(bytes(32 * [7]))), _rand(3))
    with pytest.raises(HandshakeError):
        Responder(SERVER_SK, _rand(1)).read_message1_untrusted(ini.write_message1(b"x"))


# --- the control channel: frames, then authenticated msgpack maps


@given(st.lists(st.binary(max_size=80), max_size=12), st.lists(st.integers(1, 50), max_size=30))
def test_frame_decoder_round_trips_any_split(bodies, cuts):
    stream = b"".join(P.frame(b) for b in bodies)
    dec = P.FrameDecoder(80)
    got, off = [], 0
    for n in cuts + [len(stream)]:
        got += dec.feed_untrusted(stream[off:off + n])
        off += n
    assert got == bodies and dec.error is None and dec.buffered == 0


@given(st.lists(st.binary(max_size=40), max_size=5), st.integers(41, 2**32 - 1), st.binary(max_size=100),
       st.integers(1, 20))
def test_frame_decoder_stops_at_an_oversized_length(bodies, length, tail, chunk):
    """Frames before the oversized length come out; then the stream is poisoned: nothing more, nothing kept."""
    stream = b"".join(P.frame(b) for b in bodies) + struct.pack("!I", length) + tail
    dec = P.FrameDecoder(40)
    got = []
    for i in range(0, len(stream), chunk):
        got += dec.feed_untrusted(stream[i:i + chunk])
    assert got == bodies and dec.error == "frame_too_large" and dec.buffered == 0
    assert dec.feed_untrusted(P.frame(b"later")) == []


def _channel_pair():
    ini = Initiator(NODE_SK, SERVER_PK, _rand(5))
    res = Responder(SERVER_SK, _rand(6))
    res.read_message1_untrusted(ini.write_message1(b""))
    ini.read_message2_untrusted(res.write_message2(b""))
    return P.SecureChannel(res.send, res.recv, 1024), P.SecureChannel(ini.send, ini.recv, 1024)


GOOD_MSG = st.fixed_dictionaries({"type": st.text(max_size=12)},
                                 optional={"n": st.integers(-2**63, 2**64 - 1), "b": st.binary(max_size=50),
                                           "l": st.lists(st.integers(0, 9), max_size=5)})
# plaintexts that authenticate but are no message: not msgpack, not a map, no str "type", too long a string
MALFORMED = st.one_of(st.just(b"\xc1"), st.just(b"\x92\x01\x02"), st.just(msgpack.packb({"type": 5})),
                      st.just(msgpack.packb({1: "x"})), st.just(msgpack.packb(["type", "t"])),
                      st.binary(max_size=30).filter(lambda b: P.unpack_untrusted(b, 1024) is None))
FRAME = st.one_of(st.tuples(st.just("good"), GOOD_MSG), st.tuples(st.just("good"), GOOD_MSG),
                  st.tuples(st.just("malformed"), MALFORMED),
                  st.tuples(st.just("bad_auth"), st.integers(0, 10_000)),
                  st.tuples(st.just("frame_too_large"), st.integers(1024 + 17, 2**32 - 1)))


@given(st.lists(FRAME, max_size=8), st.lists(st.integers(1, 64), max_size=40))
def test_secure_channel_reads_messages_up_to_the_first_bad_frame(frames, cuts):
    """The server's sending side emits good messages and hostile frames; the node's channel returns the
    good ones before the first hostile frame, sets error to that frame's reason, and returns nothing after."""
    server, node = _channel_pair()
    stream, want, reason = b"", [], None
    for kind, arg in frames:
        if kind == "good":
            stream += server.encode(arg)
        elif kind == "malformed":
            stream += server.encode_packed(arg)
        elif kind == "bad_auth":
            framed = bytearray(server.encode({"type": "x"}))
            framed[4 + arg % (len(framed) - 4)] ^= 0x01
            stream += bytes(framed)
        else:
            stream += struct.pack("!I", arg) + b"\0" * 8
        if reason is None:
            if kind == "good":
                want.append(arg)
            else:
                reason = kind
    got, off = [], 0
    for n in cuts + [len(stream)]:
        got += node.feed_untrusted(stream[off:off + n])
        off += n
    assert got == want
    assert node.error == reason
    if reason is not None:
        assert node.feed_untrusted(server.encode({"type": "after"})) == []


# --- sealed boxes between nodes (the server forwards them and could alter them)

SK_A, SK_B, SK_C = (bytes(PrivateKey(_rand(i)(32))) for i in (11, 12, 13))
PK_A, PK_B, PK_C = (bytes(PrivateKey(k).public_key) for k in (SK_A, SK_B, SK_C))


@given(st.binary(max_size=200), CHANGES)
def test_sealed_box_opens_only_unaltered_from_its_sender(plaintext, change):
    blob = sealed.seal(SK_A, PK_B, plaintext)
    assert sealed.open_untrusted(SK_B, PK_A, blob) == plaintext
    assert sealed.open_untrusted(SK_B, PK_C, blob) is None          # claimed to come from another node
    kind = change[0] if change[0] != "low_order" else "flip"
    assert sealed.open_untrusted(SK_B, PK_A, _hostile(blob, (kind, *change[1:]))) is None


@given(st.one_of(st.sampled_from(LOW_ORDER), st.binary(max_size=40)), st.binary(max_size=120))
def test_sealed_open_with_any_sender_key_or_blob_returns_none(sender, blob):
    """The sender key comes from the server's frame too: any bytes, low-order points included."""
    assert sealed.open_untrusted(SK_B, sender, blob) is None


# --- the relay's TCP framing (2-byte length)


@given(st.lists(st.binary(max_size=300), max_size=10), st.lists(st.integers(1, 700), max_size=20))
def test_tcp_frame_decoder_round_trips_any_split(frames, cuts):
    stream = b"".join(W.tcp_frame(f) for f in frames)
    dec = W.TcpFrameDecoder()
    got, off = [], 0
    for n in cuts + [len(stream)]:
        got += dec.feed(stream[off:off + n])
        off += n
    assert got == frames and len(dec._buf) == 0


@given(st.binary(max_size=2000), st.integers(1, 97))
def test_tcp_frame_decoder_holds_at_most_one_frame(data, chunk):
    """Any bytes: never raises, and what it keeps is one incomplete frame at most (2 + 65,535 bytes)."""
    dec = W.TcpFrameDecoder()
    total = 0
    for i in range(0, len(data), chunk):
        total += sum(2 + len(f) for f in dec.feed(data[i:i + chunk]))
        assert len(dec._buf) <= 2 + 65535
    assert total + len(dec._buf) == len(data)


def test_cipher_state_refuses_a_replayed_frame():
    """A frame the channel already read does not authenticate again (the nonce moved on)."""
    key = bytes(range(32))
    tx, rx = CipherState(key), CipherState(key)
    ct = tx.encrypt(b"once")
    assert rx.decrypt_untrusted(ct) == b"once" and rx.decrypt_untrusted(ct) is None
    assert rx.decrypt_untrusted(tx.encrypt(b"next")) == b"next"


# --- the node's relay session: frames from the relay's address (spoofable over UDP)

from meshwg.control.client import PeerInfo, _peer_untrusted  # noqa: E402
from meshwg.control.relay_client import RelaySession  # noqa: E402


def _hello_ok(plain: bytes, nonce: bytes, sk: bytes = SERVER_SK) -> bytes:
    from nacl.public import Box, PublicKey
    box = Box(PrivateKey(sk), PublicKey(public_key(NODE_SK)))
    return W.MAGIC + bytes([W.T_HELLO_OK]) + bytes(box.encrypt(plain, nonce))


ADDR_BYTES = st.one_of(
    st.builds(lambda ip, port: (bytes([4]) + ip.packed + struct.pack("!H", port), (str(ip), port)),
              st.ip_addresses(v=4), st.integers(0, 65535)),
    st.builds(lambda ip, port: (bytes([6]) + ip.packed + struct.pack("!H", port), (str(ip), port)),
              st.ip_addresses(v=6), st.integers(0, 65535)),
    st.just((b"\x00", None)),
    st.builds(lambda b: (b, None), st.binary(min_size=1, max_size=24).filter(
        lambda b: not (b[0] == 4 and len(b) == 7) and not (b[0] == 6 and len(b) == 19))))


@given(st.binary(min_size=8, max_size=8), st.integers(0, 65535), ADDR_BYTES, st.binary(min_size=24, max_size=24))
def test_relay_session_takes_a_hello_ok_from_the_server_only(token, ttl, addr, nonce):
    """A HELLO_OK boxed by the pinned relay key sets the token, lifetime and observed address exactly
    (an address that is not 4 or 16 bytes with its family is no address); boxed by anyone else, or cut
    short, it changes nothing and counts one drop."""
    raw, want = addr
    rs = RelaySession(NODE_SK, SERVER_PK, _rand(9))
    assert rs.handle_untrusted(_hello_ok(token + struct.pack("!H", ttl) + raw, nonce, SK_X), 1.0) is None
    assert rs.handle_untrusted(_hello_ok((token + struct.pack("!H", ttl))[:draw_cut(ttl)], nonce), 1.0) is None
    assert rs.token is None and rs.drops == 2
    assert rs.handle_untrusted(_hello_ok(token + struct.pack("!H", ttl) + raw, nonce), 1.0) == ("ready", want)
    assert rs.token == token and rs.observed == want and rs.ready_until == 1.0 + ttl and rs.drops == 2


def draw_cut(ttl: int) -> int:
    return ttl % 10   # shorter than token + ttl + one address byte


SK_X = clamp(bytes(32 * [0x5A]))

RELAY_FRAME = st.one_of(
    st.tuples(st.just("recv"), st.builds(lambda k, p: W.encode_recv(k, p), st.binary(min_size=32, max_size=32),
                                         st.binary(max_size=100))),
    st.tuples(st.just("notice"), st.builds(lambda c, k: W.encode_notice(c, k), st.integers(0, 255),
                                           st.binary(min_size=32, max_size=32))),
    st.tuples(st.just("drop"), st.builds(lambda c, k: W.MAGIC + bytes([W.T_NOTICE, c]) + k, st.integers(0, 255),
                                         st.binary(max_size=40).filter(lambda k: len(k) != 32))),
    st.tuples(st.just("drop"), st.builds(lambda t, rest: W.MAGIC + bytes([t]) + rest,
                                         st.sampled_from([0, W.T_HELLO, W.T_SEND, 6, 255]), st.binary(max_size=60))),
    st.tuples(st.just("drop"), st.binary(max_size=60)),
    st.tuples(st.just("drop"), st.builds(lambda rest: W.MAGIC + bytes([W.T_RECV]) + rest, st.binary(max_size=31))),
)


@given(st.lists(RELAY_FRAME, max_size=20))
def test_relay_session_reads_each_frame_as_its_kind(frames):
    rs = RelaySession(NODE_SK, SERVER_PK, _rand(9))
    drops = 0
    for kind, frame in frames:
        ev = rs.handle_untrusted(frame, 1.0)
        if kind == "recv":
            assert ev == ("recv", frame[5:37], frame[37:])
        elif kind == "notice":
            assert ev == ("notice", frame[5], frame[6:])
        else:
            drops += 1
            assert ev is None
        assert rs.drops == drops and rs.token is None


# --- directory entries from the server (peers' names and candidates inside)

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                      st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300, -0.0]), st.text(max_size=8),
                      st.binary(max_size=40), st.lists(st.integers(-2**63, 2**63), max_size=3),
                      st.dictionaries(st.text(max_size=3), st.integers(-2**63, 2**63), max_size=2))
GOOD_ENTRY = st.fixed_dictionaries({
    "key": st.binary(min_size=32, max_size=32), "id": st.integers(1, 2**31), "name": st.text(max_size=20),
    "ipv4": st.ip_addresses(v=4).map(str), "ipv6": st.ip_addresses(v=6).map(str), "online": st.booleans(),
    "cand": st.lists(st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535), st.sampled_from(["local", "stun"]))
                     .map(list), max_size=4)})


@pytest.mark.parametrize("field", ["key", "id", "name", "ipv4", "ipv6", "online", "cand", None])
@settings(max_examples=max(20, settings().max_examples // 4))
@given(GOOD_ENTRY, ANY_VALUE)
def test_directory_entries_round_trip_or_are_refused(field, entry, value):
    """A well-formed entry round-trips; any field replaced by any msgpack value gives a PeerInfo or None,
    never an exception (the client drops what it cannot use)."""
    info = _peer_untrusted(P.pack_entry(entry))
    assert info == PeerInfo(entry["key"], entry["id"], entry["name"], entry["ipv4"], entry["ipv6"],
                            tuple(tuple(c) for c in entry["cand"]), entry["online"])
    if field is not None:
        hostile = dict(entry, **{field: value})
        got = _peer_untrusted(P.pack_entry(hostile))
        assert got is None or isinstance(got, PeerInfo)
        if field == "key":
            assert got is None or value == entry["key"] or (isinstance(value, bytes) and len(value) == 32)

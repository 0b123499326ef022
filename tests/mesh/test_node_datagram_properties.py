"""MeshNode.receive_datagram, everything that reaches the node's shared UDP socket (issue 18): for each kind
of datagram, built with a valid header and hostile contents, the node never raises, the one drop counter
that names what was wrong goes up by exactly one (and no other), and well-formed datagrams do what they
are for (a ping is answered with a pong its sender accepts, a STUN answer to our request is used) without
moving any drop counter."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st
from mesh_sim import Sim
from nacl.public import Box, PrivateKey, PublicKey

from meshwg.signaling import relay_wire as RW
from meshwg.disco import messages as M
from meshwg.disco import stun
from meshwg.mesh import demux

B_ADDR = ("203.0.113.20", 41641)
STUN_SERVER = ("198.51.100.1", 3478)


def _pair():
    """Nodes a and b that know each other; a has one STUN request out. Returns (sim, a, b, txid)."""
    sim = Sim(seed=7)
    a = sim.add_host("a", lan_ip="192.168.1.2", mesh_ip="100.64.0.1")
    b = sim.add_host("b", lan_ip="192.168.2.2", mesh_ip="100.64.0.2")
    nm = sim.netmap()
    for h in (a, b):
        h.node.apply_netmap(nm, 0.0)
    a.node.set_stun_servers([STUN_SERVER], 0.0)
    a.node.handle_timer(0.0)
    [txid] = [stun.parse_binding_request_untrusted(d) for d, dest in a.node.datagrams_to_send()
              if dest == STUN_SERVER]
    b.node.datagrams_to_send()
    a.node.pop_events(), b.node.pop_events()
    return sim, a.node, b.node, txid


def _drops(node) -> dict:
    out = dict(node.drops)
    out.update({"core_" + k: v for k, v in node.core.drops.items()})
    return out


def _sealed(sender_node, receiver_node, plaintext: bytes, nonce: bytes) -> bytes:
    """A disco box from sender to receiver around any plaintext (the codec would only seal good ones)."""
    box = Box(sender_node.codec._sk, PublicKey(receiver_node.public_key))
    return M.MAGIC + sender_node.public_key + nonce + box.encrypt(plaintext, nonce).ciphertext


def _plain(mtype: int, payload: bytes, wall: float, version: int = M.VERSION) -> bytes:
    return struct.pack(">BBQ", mtype, version, max(0, int(wall * 1000))) + payload


WALL = 1_700_000_000.0 + 1.0   # the Sim's wall offset, at now = 1.0
NOW = 1.0

# kind -> the drop counters it moves by one ({} for a well-formed datagram)
EXPECT = {
    "unknown": {"drop_unknown_datagram": 1},
    "relay_frame": {"drop_relay_datagram": 1},
    "wg_transport_unknown_index": {"core_unknown_index": 1},
    "wg_initiation_bad_mac1": {"core_bad_mac1": 1},
    "wg_initiation_garbage_with_mac1": {"core_handshake_auth": 1},
    "wg_response_unknown_index": {"core_unknown_index": 1},
    "wg_cookie_reply_unknown_index": {"core_unknown_index": 1},
    "stun_malformed": {"drop_stun": 1},
    "stun_unmatched": {"drop_stun_unmatched": 1},
    "stun_answer": {},
    "disco_short": {"drop_disco": 1, "disco_bad_length": 1},
    "disco_bad_magic": {"drop_unknown_datagram": 1},   # the demultiplexer knows disco by its magic alone
    "disco_unknown_sender": {"drop_disco": 1, "disco_unknown_sender": 1},
    "disco_forged": {"drop_disco": 1, "disco_forged": 1},
    "disco_bad_version": {"drop_disco": 1, "disco_bad_version": 1},
    "disco_stale": {"drop_disco": 1, "disco_stale": 1},
    "disco_malformed_type": {"drop_disco": 1, "disco_malformed": 1},
    "disco_malformed_ping": {"drop_disco": 1, "disco_malformed": 1},
    "disco_malformed_pong": {"drop_disco": 1, "disco_malformed": 1},
    "disco_malformed_cmm": {"drop_disco": 1, "disco_malformed": 1},
    "disco_malformed_cmm_many": {"drop_disco": 1, "disco_malformed": 1},
    "disco_key_mismatch": {"drop_disco": 1, "disco_key_mismatch": 1},
    "disco_replay": {"drop_disco": 1, "disco_replay": 1},
    "disco_pong_unmatched": {"drop_disco_pong_unmatched": 1},
    "disco_ping": {},
}


def _build(kind: str, draw, a, b, txid: bytes) -> bytes:
    """One datagram of `kind` for node a, coming from node b's address."""
    blob = lambda lo, hi: draw(st.binary(min_size=lo, max_size=hi))  # noqa: E731
    nonce = blob(24, 24)
    cookie_for_a = b.core.peers[a.public_key].cookie      # b's mac1/mac2 maker for messages to a
    if kind == "unknown":
        return draw(st.one_of(st.binary(max_size=3),
                              st.binary(min_size=4, max_size=200).filter(lambda d: demux.classify(d) == demux.UNKNOWN)))
    if kind == "relay_frame":
        return RW.MAGIC + blob(2, 100)
    if kind == "wg_transport_unknown_index":
        index = draw(st.integers(0, 2**32 - 1).filter(lambda i: i not in a.core._keypairs_by_index))
        return b"\x04\0\0\0" + struct.pack("<I", index) + blob(24, 200)
    if kind == "wg_initiation_bad_mac1":
        return b"\x01\0\0\0" + blob(144, 144)
    if kind == "wg_initiation_garbage_with_mac1":
        return cookie_for_a.add_macs(b"\x01\0\0\0" + blob(112, 112), NOW)
    if kind == "wg_response_unknown_index":
        return cookie_for_a.add_macs(b"\x02\0\0\0" + blob(4, 4) + struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
                                     + blob(48, 48), NOW)
    if kind == "wg_cookie_reply_unknown_index":
        return b"\x03\0\0\0" + struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + blob(56, 56)
    if kind in ("stun_malformed", "stun_unmatched", "stun_answer"):
        tid = txid if kind == "stun_answer" else draw(st.binary(min_size=12, max_size=12).filter(lambda t: t != txid))
        addr = (str(draw(st.ip_addresses(v=4))), draw(st.integers(1, 65535)))
        good = stun.build_binding_response(tid, addr, fingerprint=draw(st.booleans()))
        if kind != "stun_malformed":
            return good
        # a STUN-shaped datagram (cookie, whole words) that is no usable answer
        bad = draw(st.sampled_from(["no_address", "error_class", "length_lies", "bad_fingerprint"]))
        if bad == "no_address":
            return struct.pack("!HHI", 0x0101, 8, stun.MAGIC_COOKIE) + tid + stun._attr(0x8022, blob(1, 4)[:4])[:8]
        if bad == "error_class":
            return b"\x01\x11" + good[2:]
        if bad == "length_lies":
            return good[:2] + struct.pack("!H", len(good) - 20 + 4) + good[4:]
        fp = stun.build_binding_response(tid, addr, fingerprint=True)
        return fp[:-1] + bytes([fp[-1] ^ 1])
    if kind == "disco_short":
        return M.MAGIC + blob(0, M.HEADER_LEN + M.BOX_OVERHEAD + 10 - len(M.MAGIC) - 1)
    if kind == "disco_bad_magic":
        return b"MWDsc" + draw(st.sampled_from(b"pqrsx")).to_bytes(1, "big") + blob(90, 200)
    if kind == "disco_unknown_sender":
        stranger = Box(PrivateKey(blob(32, 32)), PublicKey(a.public_key))
        return M.MAGIC + blob(32, 32) + nonce + stranger.encrypt(_plain(1, blob(44, 44), WALL), nonce).ciphertext
    if kind == "disco_forged":
        good = _sealed(b, a, _plain(M.TYPE_PING, blob(12, 12) + b.public_key, WALL), nonce)
        i = draw(st.integers(M.HEADER_LEN, len(good) - 1))
        return good[:i] + bytes([good[i] ^ (1 << draw(st.integers(0, 7)))]) + good[i + 1:]
    if kind == "disco_bad_version":
        version = draw(st.integers(0, 255).filter(lambda v: v != M.VERSION))
        return _sealed(b, a, _plain(M.TYPE_PING, blob(12, 12) + b.public_key, WALL, version), nonce)
    if kind == "disco_stale":
        skew = draw(st.one_of(st.floats(121, 1e6), st.floats(-1e6, -121)))
        return _sealed(b, a, _plain(M.TYPE_PING, blob(12, 12) + b.public_key, WALL + skew), nonce)
    if kind.startswith("disco_malformed"):   # a sealed box from a peer whose payload is no message
        mtype, payload = draw({
            "disco_malformed_type": st.tuples(st.integers(4, 255), st.binary(max_size=60)),
            "disco_malformed_ping": st.tuples(st.just(M.TYPE_PING), st.binary(max_size=43)),
            "disco_malformed_pong": st.tuples(st.just(M.TYPE_PONG), st.binary(max_size=60).filter(lambda p: len(p) != 30)),
            "disco_malformed_cmm": st.tuples(st.just(M.TYPE_CALL_ME_MAYBE),
                                             st.binary(max_size=100).filter(lambda p: len(p) % 18)),
            "disco_malformed_cmm_many": st.tuples(st.just(M.TYPE_CALL_ME_MAYBE),
                                                  st.integers(33, 70).map(lambda n: bytes(18 * n))),
        }[kind])
        return _sealed(b, a, _plain(mtype, payload, WALL), nonce)
    if kind == "disco_key_mismatch":
        other = blob(32, 32)
        return _sealed(b, a, _plain(M.TYPE_PING, blob(12, 12) + (other if other != b.public_key else bytes(32)), WALL),
                       nonce)
    if kind == "disco_pong_unmatched":
        return _sealed(b, a, _plain(M.TYPE_PONG, blob(12, 12) + M.encode_addr(B_ADDR), WALL), nonce)
    # disco_ping (disco_replay sends it twice)
    return _sealed(b, a, _plain(M.TYPE_PING, blob(12, 12) + b.public_key + bytes(draw(st.integers(0, 64))), WALL),
                   nonce)


@pytest.mark.parametrize("kind", sorted(EXPECT))
@settings(max_examples=max(10, settings().max_examples // 10))   # per kind: a tenth of the profile's count
@given(data=st.data())
def test_each_datagram_kind_moves_exactly_its_drop_counter(kind, data):
    sim, a, b, txid = _pair()
    datagram = _build(kind, data.draw, a, b, txid)
    if kind == "disco_replay":
        a.receive_datagram(datagram, B_ADDR, NOW)
        a.datagrams_to_send()
    before = _drops(a)
    a.receive_datagram(datagram, B_ADDR, NOW)
    after = _drops(a)
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    assert {k: v for k, v in moved.items() if v} == EXPECT[kind], (kind, datagram)
    pongs = [m for m in _opened(b, a.datagrams_to_send()) if isinstance(m, M.Pong)]
    if kind == "disco_ping":
        # answered with one pong to the ping's source, which its sender opens; it names the source it saw
        assert [p.src for p in pongs] == [B_ADDR]
    else:
        assert pongs == []
    if kind == "stun_answer":
        assert a.counters["recv_stun"] == 1 and any(type(e).__name__ == "NetcheckDone" for e in a.pop_events())


def _opened(receiver, out) -> list:
    """The disco messages in a node's output to B_ADDR that `receiver` opens."""
    msgs = []
    for d, dest in out:
        if dest == B_ADDR and demux.classify(d) == demux.DISCO:
            opened = receiver.codec.open_untrusted(d, WALL)
            if opened is not None:
                msgs.append(opened[1])
    return msgs


@settings(max_examples=max(50, settings().max_examples // 2))
@given(st.binary(max_size=300), st.sampled_from([None, 1, 7]))
def test_random_datagrams_never_raise_and_move_one_drop_counter_at_most(data, via):
    """Random bytes (under each prefix the demultiplexer knows): at most two drop counters move (a disco
    drop counts the node's aggregate and the codec's reason), each by one."""
    sim, a, b, txid = _pair()
    for prefix in (b"", M.MAGIC, M.MAGIC + b.public_key, RW.MAGIC, b"\x04\0\0\0", b"\x01\0\0\0",
                   struct.pack("!HHI", 0x0101, len(data) // 4 * 4, stun.MAGIC_COOKIE) + bytes(12)):
        d = prefix + (data[:len(data) // 4 * 4] if prefix[:2] == b"\x01\x01" else data)  # STUN: whole words
        before = _drops(a)
        a.receive_datagram(d, B_ADDR, NOW, via=via)
        after = _drops(a)
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
        moved = {k: v for k, v in moved.items() if v}
        assert all(v == 1 for v in moved.values()) and len(moved) <= 2, (d, moved)
        if len(moved) == 2:
            assert "drop_disco" in moved

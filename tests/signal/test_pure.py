"""Pure modules: STUN codec, Noise IK, framing, invites, IPAM, directory diffs, punch, relay decisions."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwg.signaling import protocol as P
from meshwg.signaling import relay_wire as W
from meshwg.signaling.invite import Invite, InviteFormatError, parse_invite
from meshwg.signaling.noise import HandshakeError, Initiator, Responder
from meshwg.wg.crypto import clamp, dh_pub as public_key
from meshwg.control.relay_client import RelaySession
from meshwg.signaling.sealed import open_untrusted, seal
from meshwg.disco import stun
from signal_server import ipam
from signal_server.directory import Directory, Node
from signal_server.invites import InviteRow, JoinRefused, check_invite, hash_secret, normalize_name, parse_duration
from signal_server.punch import PunchCoordinator
from signal_server.ratelimit import KeyedLimiter
from signal_server.relay import RelayCore

# --- STUN


@pytest.mark.parametrize("addr", [("192.0.2.33", 51820), ("2001:db8::7", 1), ("::ffff:10.0.0.1", 65535)])
def test_stun_roundtrip(addr):
    txid = os.urandom(12)
    req = stun.build_binding_request(txid, software=True, fingerprint=True)
    assert stun.is_stun_untrusted(req) and stun.parse_binding_request_untrusted(req) == txid
    resp = stun.build_binding_response(txid, addr)
    assert stun.parse_binding_response_untrusted(resp) == (txid, (str(ipaddress.ip_address(addr[0])), addr[1]))
    assert stun.parse_binding_request_untrusted(resp) is None
    assert stun.parse_binding_response_untrusted(req) is None


def test_stun_not_confused_with_wireguard_or_relay():
    wg = bytes([1, 0, 0, 0]) + os.urandom(144)
    assert not stun.is_stun_untrusted(wg) and not W.is_relay_untrusted(wg)
    relay = W.encode_recv(os.urandom(32), b"x")
    assert not stun.is_stun_untrusted(relay)
    assert stun.parse_classic_binding_request_untrusted(relay) is None


def test_stun_known_answer_rfc5769_ipv4():
    """RFC 5769 2.2 sample response: XOR-MAPPED-ADDRESS 192.0.2.1:32853."""
    msg = bytes.fromhex(
        "0101003c2112a442b7e7a701bc34d686fa87dfae"
        "8022000b7465737420766563746f7220002000080001a147e112a643"
        "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
        "80280004c07d4c96"
    )
    assert stun.parse_binding_response_untrusted(msg) == (bytes.fromhex("b7e7a701bc34d686fa87dfae"), ("192.0.2.1", 32853))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_untrusted_parsers_never_raise(data):
    stun.is_stun_untrusted(data)
    stun.parse_binding_request_untrusted(data)
    stun.parse_binding_response_untrusted(data)
    stun.parse_classic_binding_request_untrusted(data)
    for prefix in (b"", W.MAGIC, W.MAGIC + b"\x02", W.MAGIC + b"\x03", W.MAGIC + b"\x04"):
        d = prefix + data
        W.parse_hello_untrusted(d)
        W.parse_send_untrusted(d)
        W.parse_recv_untrusted(d)
        W.parse_notice_untrusted(d)
        W.parse_hello_ok_untrusted(os.urandom(32), os.urandom(32), d)
    P.unpack_untrusted(data, 1024)
    P.unpack_entry_untrusted(data)
    P.candidates_untrusted(data)
    dec = P.FrameDecoder(64)
    dec.feed_untrusted(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=20, max_size=120))
def test_stun_response_mutations_never_raise(noise):
    resp = bytearray(stun.build_binding_response(os.urandom(12), ("203.0.113.9", 4242)))
    for i, b in enumerate(noise[: len(resp)]):
        resp[i] ^= b
    stun.parse_binding_response_untrusted(bytes(resp))


# --- Noise IK + channel


def test_noise_ik_roundtrip_and_transport():
    ska, sks = os.urandom(32), os.urandom(32)
    ini = Initiator(ska, public_key(clamp(sks)), os.urandom)
    res = Responder(sks, os.urandom)
    rs, payload = res.read_message1_untrusted(ini.write_message1(b"hi"))
    assert rs == public_key(clamp(ska)) and payload == b"hi"
    assert ini.read_message2_untrusted(res.write_message2(b"yo")) == b"yo"
    assert ini.handshake_hash == res.handshake_hash
    a = P.SecureChannel(ini.send, ini.recv, 1024)
    b = P.SecureChannel(res.send, res.recv, 1024)
    wire = a.encode({"type": "x", "n": 1}) + a.encode({"type": "y"})
    assert [m["type"] for m in b.feed_untrusted(wire[:7]) + b.feed_untrusted(wire[7:])] == ["x", "y"]
    tampered = bytearray(a.encode({"type": "z"}))
    tampered[-1] ^= 1
    assert b.feed_untrusted(bytes(tampered)) == [] and b.error == "bad_auth"


def test_noise_wrong_pinned_key_and_tamper():
    sks = os.urandom(32)
    ini = Initiator(os.urandom(32), public_key(clamp(os.urandom(32))), os.urandom)  # pinned a different key
    with pytest.raises(HandshakeError):
        Responder(sks, os.urandom).read_message1_untrusted(ini.write_message1(b""))
    ini = Initiator(os.urandom(32), public_key(clamp(sks)), os.urandom)
    m1 = bytearray(ini.write_message1(b""))
    m1[40] ^= 1
    with pytest.raises(HandshakeError):
        Responder(sks, os.urandom).read_message1_untrusted(bytes(m1))
    with pytest.raises(HandshakeError):
        Responder(sks, os.urandom).read_message1_untrusted(bytes(32) + bytes(m1[32:]))  # low-order point


def test_frame_decoder_caps():
    d = P.FrameDecoder(10)
    assert d.feed_untrusted(P.frame(b"abc") + P.frame(b"0123456789")) == [b"abc", b"0123456789"]
    assert d.feed_untrusted(P.frame(b"x" * 11)) == [] and d.error == "frame_too_large"


# --- invites


def test_invite_roundtrip_and_corruption():
    inv = Invite(("sig.example:7300", "[2001:db8::1]:7300"), os.urandom(32), "abcd1234", os.urandom(16))
    text = inv.encode()
    assert parse_invite("  " + text + "\n") == inv
    for bad in (text[:-3], text[:10], "hello", text.replace("mwg1_", "mwg2_"), text[:-1] + ("A" if text[-1] != "A" else "B")):
        with pytest.raises(InviteFormatError):
            parse_invite(bad)


def test_invite_checks():
    row = InviteRow("id", hash_secret(b"s" * 16), False, 100.0, "", 0.0, False, 0)
    check_invite(row, b"s" * 16, 50.0)
    for r, secret, wall, code in (
        (None, b"s" * 16, 50.0, "invite_invalid"),
        (row, b"t" * 16, 50.0, "invite_invalid"),
        (row, b"s" * 16, 100.0, "invite_expired"),
        (InviteRow("id", row.secret_hash, False, None, "", 0, True, 0), b"s" * 16, 1, "invite_revoked"),
        (InviteRow("id", row.secret_hash, False, None, "", 0, False, 1), b"s" * 16, 1, "invite_used"),
    ):
        with pytest.raises(JoinRefused) as info:
            check_invite(r, secret, wall)
        assert info.value.code == code
    check_invite(InviteRow("id", row.secret_hash, True, None, "", 0, False, 9), b"s" * 16, 1)  # reusable
    assert parse_duration("24h") == 86400 and parse_duration("90s") == 90 and parse_duration("7d") == 604800
    assert normalize_name("My Laptop!") == "my-laptop" and normalize_name("!!!") is None


# --- IPAM


def test_ipam_stable_unique_and_exhaustion():
    net = ipaddress.ip_network("10.9.0.0/29")  # 6 usable
    taken: set = set()
    keys = [os.urandom(32) for _ in range(6)]
    got = []
    for k in keys:
        a = ipam.allocate(net, k, taken.__contains__, len(taken))
        assert a in net and a not in (net.network_address, net.broadcast_address) and a not in taken
        taken.add(a)
        got.append(a)
    with pytest.raises(RuntimeError):
        ipam.allocate(net, os.urandom(32), taken.__contains__, len(taken))
    big = ipaddress.ip_network("100.64.0.0/10")
    k = os.urandom(32)
    assert ipam.allocate(big, k, lambda a: False, 0) == ipam.allocate(big, k, lambda a: False, 0)  # stable per key
    assert ipam.default_ula48(os.urandom(16)).prefixlen == 48


# --- directory, punch, rate limits


def _node(i, online=True):
    return Node(i, bytes([i]) * 32, f"n{i}", f"100.64.0.{i}", f"fd00::{i}", online=online)


def test_directory_coalesces_and_excludes_self():
    d = Directory()
    d.put(_node(1))
    snap = d.subscribe(b"\x01" * 32)
    assert snap == []
    d.subscribe(b"\x02" * 32)
    d.put(_node(2))
    for port in range(100):  # a burst of changes to one node = one update
        d.update(b"\x02" * 32, candidates=[("192.0.2.1", 1000 + port, "stun")])
    ups, rems = d.take_pending(b"\x01" * 32)
    assert len(ups) == 1 and rems == [] and P.unpack_entry_untrusted(ups[0])["cand"] == [["192.0.2.1", 1099, "stun"]]
    assert d.take_pending(b"\x02" * 32) == ([], [])  # its own changes are not sent to itself
    assert not d.update(b"\x02" * 32, candidates=[("192.0.2.1", 1099, "stun")])  # no-op is not a change
    d.put(_node(3))
    d.remove(b"\x03" * 32)
    assert d.take_pending(b"\x01" * 32) == ([], [b"\x03" * 32])


def test_punch_tells_both_and_limits():
    d = Directory()
    d.put(_node(1))
    d.put(_node(2))
    d.put(_node(3, online=False))
    pc = PunchCoordinator()
    out, err = pc.plan(d, b"\x01" * 32, b"\x02" * 32, 0.0)
    assert err is None and [k for k, _ in out] == [b"\x01" * 32, b"\x02" * 32]
    assert P.unpack_entry_untrusted(out[0][1]["peer"])["key"] == b"\x02" * 32
    assert pc.plan(d, b"\x01" * 32, b"\x03" * 32, 0.0)[1] == "peer_offline"
    assert pc.plan(d, b"\x01" * 32, b"\x09" * 32, 0.0)[1] == "unknown_peer"
    for _ in range(10):
        out, err = pc.plan(d, b"\x01" * 32, b"\x02" * 32, 0.0)
    assert err == "rate_limited"


def test_keyed_limiter_bounded():
    lim = KeyedLimiter(1.0, 2.0, max_keys=10)
    assert lim.allow("a", 0) and lim.allow("a", 0) and not lim.allow("a", 0) and lim.allow("a", 1.0)
    for i in range(100):
        lim.allow(i, 0)
    assert len(lim._buckets) <= 10


def test_keyed_limiter_cap_keeps_live_buckets_and_evicts_refilled_ones():
    lim = KeyedLimiter(1.0, 2.0, max_keys=10)
    assert lim.allow("a", 0) and lim.allow("a", 0) and lim.exhausted("a", 0)
    for i in range(100):  # a flood of new keys while every bucket still holds information
        lim.allow(i, 0)
    assert lim.exhausted("a", 0.5) and len(lim._buckets) <= 10
    # Later every bucket has refilled: new keys get tracked again (evicting the idle ones).
    assert lim.allow("b", 10.0) and lim.allow("b", 10.0) and lim.exhausted("b", 10.0)
    assert not lim.exhausted("a", 10.0)  # forgotten or refilled: either way no longer blocked


# --- relay decisions


def test_relay_core_hello_replay_stale_and_forward():
    server_sk = clamp(os.urandom(32))
    core = RelayCore(server_sk, os.urandom)
    ska, skb = clamp(os.urandom(32)), clamp(os.urandom(32))
    pa, pb = public_key(ska), public_key(skb)
    core.set_allowed({pa, pb})
    spk = public_key(server_sk)
    ra, rb = RelaySession(ska, spk, os.urandom), RelaySession(skb, spk, os.urandom)
    wall = 1_700_000_000.0
    hello = ra.hello(0.0, wall)
    [(ok, dest)] = core.handle_untrusted(hello, ("1.2.3.4", 5), 0.0, wall, observed=("1.2.3.4", 5))
    assert ra.handle_untrusted(ok, 0.0) == ("ready", ("1.2.3.4", 5)) and dest == ("1.2.3.4", 5)
    # replayed hello (same nonce) from an attacker's address: no new binding
    [(notice, _)] = core.handle_untrusted(hello, ("6.6.6.6", 1), 0.1, wall)
    assert W.parse_notice_untrusted(notice)[0] == W.N_STALE_HELLO
    assert core.by_key[pa].dest == ("1.2.3.4", 5)
    # stale clock
    [(notice, _)] = core.handle_untrusted(rb.hello(0.0, wall - 1000), ("5.5.5.5", 5), 0.0, wall)
    assert W.parse_notice_untrusted(notice)[0] == W.N_STALE_HELLO
    [(ok, _)] = core.handle_untrusted(rb.hello(0.0, wall), ("5.5.5.5", 5), 0.0, wall)
    rb.handle_untrusted(ok, 0.0)
    [(frame, dest)] = core.handle_untrusted(ra.encode_send(pb, b"pkt"), ("1.2.3.4", 5), 0.1, wall)
    assert dest == ("5.5.5.5", 5) and rb.handle_untrusted(frame, 0.1) == ("recv", pa, b"pkt")
    # the token only works from the bound source
    assert W.parse_notice_untrusted(core.handle_untrusted(ra.encode_send(pb, b"p"), ("9.9.9.9", 9), 0.2, wall)[0][0])[0] == W.N_REHELLO
    # removal drops the session; sessions expire
    core.set_allowed({pb})
    assert pa not in core.by_key
    core.expire(1e9)
    assert not core.by_key and core.counters["forwarded_packets"] == 1


def test_sealed_box_roundtrip():
    ska, skb = clamp(os.urandom(32)), clamp(os.urandom(32))
    blob = seal(ska, public_key(skb), b"endpoints")
    assert open_untrusted(skb, public_key(ska), blob) == b"endpoints"
    assert open_untrusted(skb, public_key(clamp(os.urandom(32))), blob) is None
    assert open_untrusted(skb, public_key(ska), blob[:-1] + bytes([blob[-1] ^ 1])) is None

"""STUN as a reflector (issue 10 item 11): answers are limited per source IP and kept small.

Measured with these layouts (bytes of answer / bytes of request, IPv4):
  before: 20-byte RFC 5389 request -> 72 (wildcard), 84 (one address), 96 (two addresses): 3.6-4.8x;
          with FINGERPRINT (28 bytes) 2.6-3.4x; classic 20 -> 56 (2.8x); 420 error 24 -> 84 (3.5x)
  after:  20 -> 32 (1.6x), 44 with OTHER-ADDRESS (2.2x); change request 28 -> 56 (2.0x); classic 2.8x
          (RFC 3489's three mandatory addresses); 420 error 24 -> 56 (2.3x). Every answer <= 3x.
"""

from __future__ import annotations

import os
import struct

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from sig_helpers import start_server

from meshwg.disco import stun
from signal_server.stun_responder import StunResponder, StunSocket

CIP, CPORT = stun.CHANGE_IP, stun.CHANGE_PORT
A1, A2 = "203.0.113.10", "203.0.113.11"
LAYOUT = [StunSocket((A1, 3478), False), StunSocket((A2, 3478), False),
          StunSocket((A1, 3479), True), StunSocket((A2, 3479), True)]
LAYOUTS = {"two addresses": LAYOUT, "wildcard": [StunSocket(("0.0.0.0", 3478), False)],
           "one address": [StunSocket((A1, 3478), False), StunSocket((A1, 3479), True)]}
VICTIM, OTHER = ("192.0.2.50", 53), ("192.0.2.51", 4000)


def _requests():
    yield stun.build_binding_request(os.urandom(12))
    yield stun.build_binding_request(os.urandom(12), fingerprint=True)
    yield stun.build_binding_request(os.urandom(12), software=True, fingerprint=True)
    yield stun.build_binding_request(os.urandom(12), change=CIP | CPORT)
    yield stun.build_binding_request(os.urandom(12), change=CPORT, fingerprint=True)
    yield stun.build_classic_binding_request(b"\x01" + os.urandom(15))
    yield stun.build_classic_binding_request(b"\x01" + os.urandom(15), CIP | CPORT)
    yield struct.pack("!HHI", 1, 4, 0x2112A442) + os.urandom(12) + struct.pack("!HH", 0x0027, 0)  # 420


def test_flood_from_one_source_gets_at_most_burst_plus_rate_and_others_are_still_answered():
    """2,310 spoofed requests in 10 s naming one victim: at most 50 + 20/s answered (old code: all of
    them); a second source is still answered meanwhile."""
    r = StunResponder(LAYOUT)
    answered = other_answered = 0
    for i in range(2310):
        now = i * 10 / 2310
        reply, counters = r.handle_untrusted(0, stun.build_binding_request(os.urandom(12)), VICTIM, now)
        answered += reply is not None
        assert reply is not None or counters == ("stun_rate_limited",)
        if i % 231 == 0:  # a legitimate node's STUN, once a second
            reply, _ = r.handle_untrusted(0, stun.build_binding_request(os.urandom(12)), OTHER, now)
            other_answered += reply is not None
    assert answered <= 50 + 20 * 10 + 1
    assert answered >= 50 + 20 * 9  # the limit is a rate, not a ban
    assert other_answered == 10
    # the source port does not matter: another port of the victim's IP shares its budget
    assert r.handle_untrusted(0, stun.build_binding_request(os.urandom(12)), (VICTIM[0], 9), 10.0)[0] is None


def test_a_netcheck_burst_and_periodic_stun_are_answered():
    """What one host legitimately sends: a netcheck (7 tests, 4 retransmits each, within 1 s) then a
    node's re-STUN every 20 s, and the `stun` binary's NAT test (some 70 requests over ~2 s)."""
    r = StunResponder(LAYOUT)
    src = ("198.51.100.9", 40000)
    for i in range(28):
        assert r.handle_untrusted(i % 4, stun.build_binding_request(os.urandom(12)), src, i / 28)[0] is not None
    for i in range(72):
        now = 5.0 + i * 2 / 72
        req = stun.build_classic_binding_request(b"\x01" + os.urandom(15), (0, CIP | CPORT, CPORT)[i % 3])
        assert r.handle_untrusted(0, req, src, now)[0] is not None, i
    for t in range(20, 200, 20):
        assert r.handle_untrusted(0, stun.build_binding_request(os.urandom(12)), src, float(t))[0] is not None


def test_answers_are_at_most_three_times_the_request():
    """(Old code: 4.8x for a plain request to a server with two addresses.)"""
    for name, layout in LAYOUTS.items():
        r = StunResponder(layout)
        for req in _requests():
            reply, _ = r.handle_untrusted(0, req, ("198.51.100.9", 40000), 0.0)
            if reply is not None:
                assert len(reply.data) <= 3 * len(req), (name, req.hex(), reply.data.hex())
                if len(req) == 20 and not stun.parse_any_binding_request_untrusted(req).classic:
                    assert len(reply.data) <= 44, name  # XOR-MAPPED-ADDRESS (+ OTHER-ADDRESS)


def test_answers_carry_what_clients_need_and_no_more():
    r = StunResponder(LAYOUT)
    client = ("198.51.100.9", 40000)
    txid = os.urandom(12)
    plain = r.handle_untrusted(0, stun.build_binding_request(txid), client, 0.0)[0].data
    attrs = _attr_types(plain)
    assert attrs == [stun.ATTR_XOR_MAPPED_ADDRESS, stun.ATTR_OTHER_ADDRESS]  # RFC 5780 clients need OTHER
    assert stun.parse_binding_response_full_untrusted(plain) == stun.BindingResponse(txid, client, (A2, 3479), None)
    # FINGERPRINT when asked with one; RESPONSE-ORIGIN when the answer comes from another address
    fp = r.handle_untrusted(0, stun.build_binding_request(txid, software=True, fingerprint=True), client, 0.0)[0].data
    assert _attr_types(fp) == [stun.ATTR_XOR_MAPPED_ADDRESS, stun.ATTR_OTHER_ADDRESS, stun.ATTR_FINGERPRINT]
    assert stun.parse_binding_response_full_untrusted(fp).mapped == client
    ch = r.handle_untrusted(0, stun.build_binding_request(txid, change=CIP | CPORT), client, 0.0)[0]
    assert _attr_types(ch.data) == [stun.ATTR_XOR_MAPPED_ADDRESS, stun.ATTR_RESPONSE_ORIGIN, stun.ATTR_OTHER_ADDRESS]
    assert stun.parse_binding_response_full_untrusted(ch.data).response_origin == (A2, 3479) and ch.sock == 3
    # no SOFTWARE in a 420 either
    err = r.handle_untrusted(0, struct.pack("!HHI", 1, 4, 0x2112A442) + txid + struct.pack("!HH", 0x0027, 0),
                             client, 0.0)[0].data
    assert _attr_types(err) == [stun.ATTR_ERROR_CODE, stun.ATTR_UNKNOWN_ATTRIBUTES]
    # classic clients keep RFC 3489's MAPPED-, SOURCE- and CHANGED-ADDRESS
    classic = r.handle_untrusted(0, stun.build_classic_binding_request(b"\x01" * 16), client, 0.0)[0].data
    assert stun.parse_classic_binding_response_untrusted(classic) == stun.BindingResponse(
        b"\x01" * 16, client, (A2, 3479), (A1, 3478))


def test_the_source_table_is_bounded():
    r = StunResponder(LAYOUT, max_sources=100)
    for i in range(1000):
        r.handle_untrusted(0, stun.build_binding_request(os.urandom(12)), (f"10.0.{i // 256}.{i % 256}", 1), 0.0)
    assert len(r.limit._buckets) <= 100


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=80), st.sampled_from([VICTIM, OTHER, ("2001:db8::1", 5)]),
                          st.floats(0, 1, allow_nan=False)), max_size=40))
def test_any_datagram_never_raises_and_answers_stay_small(script):
    r = StunResponder(LAYOUT)
    now = 0.0
    for body, src, dt in script:
        now += dt
        for data in (body, struct.pack("!HHI", 1, len(body) // 4 * 4, 0x2112A442) + bytes(12) + body[: len(body) // 4 * 4]):
            reply, counters = r.handle_untrusted(0, data, src, now)
            assert isinstance(counters, tuple) and counters
            if reply is not None:
                assert len(reply.data) <= 3 * len(data) + 12  # + IPv6 addresses (16 bytes, not 4)


def _attr_types(msg: bytes) -> list[int]:
    out, off = [], 20
    while off < len(msg):
        atype, alen = struct.unpack_from("!HH", msg, off)
        out.append(atype)
        off += 4 + alen + (-alen) % 4
    return out


async def test_real_server_limits_a_spoofed_flood_on_loopback(nursery, tmp_path):
    """The server on loopback: a flood from one source gets burst + rate answers; another source is
    answered meanwhile."""
    h = await start_server(nursery, tmp_path, udp=[("127.0.0.1", 0)])
    addr = h.server.bound.udp[0]
    flood, legit = trio.socket.socket(type=trio.socket.SOCK_DGRAM), trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await flood.bind(("127.0.0.2", 0))
    await legit.bind(("127.0.0.3", 0))
    for _ in range(300):
        await flood.sendto(stun.build_binding_request(os.urandom(12)), addr)
    txid = os.urandom(12)
    await legit.sendto(stun.build_binding_request(txid), addr)
    with trio.fail_after(5):
        data, _ = await legit.recvfrom(2048)
    assert stun.parse_binding_response_untrusted(data) == (txid, ("127.0.0.3", legit.getsockname()[1]))
    got = 0
    with trio.move_on_after(0.5):
        while True:
            await flood.recvfrom(2048)
            got += 1
    assert 50 <= got <= 50 + 20 * 6  # the flood took well under 5 s
    assert h.server.counters["stun_rate_limited"] == 300 - got
    flood.close()
    legit.close()
    h.admin.close()


def test_a_full_source_table_is_not_rescanned_for_every_new_source():
    """A spoofed flood from ever-new sources fills the table with live buckets: each further new source
    must not pay a scan of the whole table (old code: one scan per datagram, O(table) each)."""
    from meshwg.token_bucket import KeyedLimiter

    class CountingDict(dict):
        scans = 0

        def items(self):
            CountingDict.scans += 1
            return super().items()

    lim = KeyedLimiter(20.0, 50.0, max_keys=100)
    lim._buckets = CountingDict()
    for i in range(100):
        for _ in range(50):  # drained: these buckets stay live for 2.5 s
            lim.allow(i, 0.0)
    for i in range(100, 10_100):  # 10,000 new sources within 0.5 s
        assert not lim.allow(i, i / 20_000)
    assert CountingDict.scans <= 2
    assert lim.allow("later", 10.0)  # once buckets have refilled, new sources are tracked again

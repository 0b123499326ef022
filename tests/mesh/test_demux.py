from hypothesis import given, settings, strategies as st

from meshwg.disco import stun
from meshwg.disco.messages import MAGIC
from meshwg.mesh.demux import DISCO, RELAY, STUN, UNKNOWN, WIREGUARD, classify


def test_classify_each_protocol():
    assert classify(b"\x01\0\0\0" + b"\0" * 144) == WIREGUARD
    assert classify(b"\x02\0\0\0" + b"\0" * 88) == WIREGUARD
    assert classify(b"\x03\0\0\0" + b"\0" * 60) == WIREGUARD
    assert classify(b"\x04\0\0\0" + b"\0" * 28) == WIREGUARD
    assert classify(b"\x04\0\0\0" + b"\0" * 1500) == WIREGUARD
    assert classify(b"\x01\0\0\0" + b"\0" * 145) == UNKNOWN   # wrong size
    assert classify(b"\x04\0\0\0" + b"\0" * 20) == UNKNOWN
    assert classify(b"\x04\0\1\0" + b"\0" * 40) == UNKNOWN    # reserved bytes non-zero
    assert classify(stun.build_binding_request(b"q" * 12)) == STUN
    assert classify(stun.build_binding_response(b"q" * 12, ("192.0.2.1", 5))) == STUN
    assert classify(MAGIC + b"\0" * 100) == DISCO
    assert classify(b"\xffMWR" + b"\0" * 10) == RELAY
    assert classify(b"MWR" + b"\0" * 10) == UNKNOWN
    assert classify(b"") == UNKNOWN
    assert classify(b"\x05\0\0\0" + b"\0" * 40) == UNKNOWN


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_classify_random_never_raises(data):
    assert classify(data) in (WIREGUARD, STUN, DISCO, RELAY, UNKNOWN)
    if classify(data) == STUN:
        assert stun.is_stun_untrusted(data)


def test_classify_is_fast():
    import time
    pkts = [b"\x04\0\0\0" + b"\0" * 1400, MAGIC + b"\0" * 100, stun.build_binding_request(b"q" * 12)]
    t = time.perf_counter()
    for _ in range(20000):
        for p in pkts:
            classify(p)
    per = (time.perf_counter() - t) / 60000
    assert per < 5e-6, per

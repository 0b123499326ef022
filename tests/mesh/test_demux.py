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


# --- dispatch: the driver's one classification -------------------------------------------------------------
from meshwg.mesh.demux import KINDS, dispatch  # noqa: E402


def _recording_handlers():
    got = []
    return got, {kind: (lambda k: lambda data, addr, now: got.append((k, data, addr, now)))(kind) for kind in KINDS}


def test_dispatch_hands_each_kind_to_its_handler_only():
    """The literal edges of every kind: a transport message is >= 32 bytes, handshakes have exact sizes."""
    cases = [
        (b"\x04\0\0\0" + bytes(28), WIREGUARD), (b"\x04\0\0\0" + bytes(27), UNKNOWN),
        (b"\x04\0\0\0" + bytes(1400), WIREGUARD), (b"\x04\0\0", UNKNOWN),
        (b"\x01\0\0\0" + bytes(144), WIREGUARD), (b"\x01\0\0\0" + bytes(145), UNKNOWN),
        (b"\x02\0\0\0" + bytes(88), WIREGUARD), (b"\x03\0\0\0" + bytes(60), WIREGUARD),
        (b"\x04\0\1\0" + bytes(40), UNKNOWN),
        (stun.build_binding_request(b"q" * 12), STUN), (MAGIC + bytes(100), DISCO),
        (b"\xffMWR" + bytes(10), RELAY), (b"MWR" + bytes(10), UNKNOWN), (b"", UNKNOWN),
    ]
    got, handlers = _recording_handlers()
    dispatch([(data, ("192.0.2.1", i)) for i, (data, _) in enumerate(cases)], 7.0, handlers)
    assert [(kind, data, addr[1], now) for kind, data, addr, now in got] == [
        (want, data, i, 7.0) for i, (data, want) in enumerate(cases)]


_transport_edges = st.builds(lambda n, body: b"\x04\0\0\0" + body[:n], st.integers(0, 40), st.binary(min_size=40, max_size=40))
_headers = st.builds(lambda t, r, body: bytes([t]) + r + body, st.integers(0, 5),
                     st.sampled_from([b"\0\0\0", b"\0\1\0"]), st.binary(max_size=200))
_shaped = st.sampled_from([stun.build_binding_request(b"q" * 12), MAGIC + bytes(60), b"\xffMWR" + bytes(30),
                           b"\x01\0\0\0" + bytes(144), b"\x02\0\0\0" + bytes(88), b"\x03\0\0\0" + bytes(60)])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), _transport_edges, _headers, _shaped), max_size=8))
def test_dispatch_agrees_with_classify(batch):
    """The driver's table (demux.dispatch, with its inlined transport rule) and classify, the reference the
    kernel filter is held against (tests/device/test_socket_filter.py), decide every datagram alike."""
    got, handlers = _recording_handlers()
    dispatch([(data, ("192.0.2.1", 9)) for data in batch], 1.0, handlers)
    assert [(kind, data) for kind, data, _, _ in got] == [(classify(data), data) for data in batch]

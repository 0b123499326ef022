"""Transport-data sealing: the compiled module (meshwg/wg/_transport.c, libsodium) and the
pure-Python fallback (cryptography) produce the same bytes and refuse the same forgeries."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshwg.wg import _transport, crypto

SEALERS = {"compiled": _transport.seal, "cryptography": crypto._seal_with_cryptography}
OPENERS = {"compiled": _transport.open, "cryptography": crypto._open_with_cryptography}
KEY = bytes(range(32))
PREFIX = b"\x04\x00\x00\x00\x11\x22\x33\x44"


def test_the_compiled_module_is_the_one_in_use():
    """CI must measure and test what users run: the build (scripts/setup) has to produce it."""
    if os.environ.get("MESHWG_PURE_PYTHON") == "1":
        assert crypto.TRANSPORT_BACKEND == "cryptography"
    else:
        assert crypto.TRANSPORT_BACKEND.startswith("libsodium"), (
            f"{crypto.TRANSPORT_BACKEND} in use: meshwg/wg/_transport.c was not built (gcc, libsodium-dev; scripts/setup)")
        assert crypto.transport_seal is _transport.seal and crypto.transport_open is _transport.open


@given(key=st.binary(min_size=32, max_size=32), prefix=st.binary(min_size=8, max_size=8),
       counter=st.integers(0, 2**64 - 1), packet=st.binary(max_size=300), pad=st.integers(0, 15))
def test_both_implementations_agree(key, prefix, counter, packet, pad):
    padded_len = len(packet) + pad
    compiled = _transport.seal(key, prefix, counter, packet, padded_len)
    assert compiled == crypto._seal_with_cryptography(key, prefix, counter, packet, padded_len)
    assert compiled[:8] == prefix and compiled[8:16] == counter.to_bytes(8, "little")
    assert len(compiled) == 16 + padded_len + 16
    for name, open_ in OPENERS.items():
        assert open_(key, compiled) == packet + bytes(pad), name


@pytest.mark.parametrize("impl", OPENERS)
def test_any_changed_authenticated_byte_is_refused(impl):
    message = _transport.seal(KEY, PREFIX, 7, b"inner packet bytes", 32)
    for i in range(8, len(message)):  # the counter (nonce), the ciphertext and the tag
        forged = bytearray(message)
        forged[i] ^= 0x01
        assert OPENERS[impl](KEY, bytes(forged)) is None, i
    assert OPENERS[impl](bytes(32), message) is None  # another key
    assert OPENERS[impl](KEY, message[:-1]) is None


@pytest.mark.parametrize("impl", OPENERS)
def test_keepalives_and_short_messages(impl):
    keepalive = SEALERS[impl](KEY, PREFIX, 0, b"", 0)
    assert len(keepalive) == 32
    assert OPENERS[impl](KEY, keepalive) == b""
    for size in (0, 1, 16, 31):
        assert OPENERS[impl](KEY, bytes(size)) is None


@pytest.mark.parametrize("args, error", [
    ((bytes(31), PREFIX, 0, b"x", 1), ValueError),         # key length
    ((KEY, PREFIX[:7], 0, b"x", 1), ValueError),           # header prefix length
    ((KEY, PREFIX, 0, b"xy", 1), ValueError),              # padded shorter than the packet
    ((KEY, PREFIX, 0, b"x", 70000), ValueError),           # beyond any IP packet
    ((KEY, PREFIX, -1, b"x", 1), OverflowError),
    ((KEY, PREFIX, 2**64, b"x", 1), OverflowError),
    ((bytearray(KEY), PREFIX, 0, b"x", 1), TypeError),
    ((KEY, PREFIX, 0, "x", 1), TypeError),
])
def test_seal_refuses_bad_arguments(args, error):
    with pytest.raises(error):
        _transport.seal(*args)


def test_open_refuses_bad_arguments():
    with pytest.raises(ValueError):
        _transport.open(bytes(16), bytes(48))
    with pytest.raises(TypeError):
        _transport.open(KEY, bytearray(48))
    with pytest.raises(TypeError):
        _transport.open(KEY)


@given(key=st.binary(min_size=32, max_size=32), message=st.binary(max_size=200))
def test_open_answers_none_or_bytes_for_any_message(key, message):
    assert _transport.open(key, message) is None  # random bytes do not authenticate


def test_a_packet_above_the_mtu_is_sealed_not_refused():
    """The core pads a packet longer than its MTU by its length modulo the MTU (wireguard-go's rule),
    so a 65535-byte packet asks for 65544: sealed like the fallback does (the send then fails and is
    counted), not a ValueError escaping the data loop."""
    packet = bytes(range(256)) * 255 + bytes(255)
    assert len(packet) == 65535
    assert _transport.seal(KEY, PREFIX, 1, packet, 65544) == crypto._seal_with_cryptography(KEY, PREFIX, 1, packet, 65544)

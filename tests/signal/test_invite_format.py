"""The invite string as its documented format defines it (meshwg/signaling/invite.py's docstring): "mwg1_" +
base64url without padding of msgpack([addrs, server_key32, invite_id, secret]) + blake2s(body)[:4]. Invites are
built by hand here from that spec, so an encoder or parser that drifts from it fails; each refusal is checked by
the reason a user reads ("base64", "checksum", "malformed", "no server address")."""

from __future__ import annotations

import base64
import hashlib

import msgpack
import pytest

from meshwg.signaling.invite import Invite, InviteFormatError, join_hostport, parse_invite, split_hostport

KEY, SECRET = bytes(range(32)), b"\xaa" * 16


def spec_text(fields, *, check: bytes | None = None) -> str:
    body = msgpack.packb(fields, use_bin_type=True)
    raw = body + (hashlib.blake2s(body).digest()[:4] if check is None else check)
    return "mwg1_" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


# What the user reads for each reason (the CLI prints it).
MESSAGES = {
    "mwg1_": "not a meshwg invite (it should start with 'mwg1_')",
    "base64": "invite is not valid base64 (truncated or mistyped?)",
    "checksum": "invite checksum mismatch (truncated or mistyped?)",
    "malformed": "invite content is malformed",
    "no server address": "invite has no server address",
}


def refusal(text: str) -> str:
    with pytest.raises(InviteFormatError) as info:
        parse_invite(text)
    message = str(info.value)
    assert message in MESSAGES.values()
    return message


def test_an_invite_whose_text_ends_in_any_letter_round_trips():
    ends = {}
    for i in range(2000):
        inv = Invite(("a:1",), KEY, f"id{i}", SECRET)
        ends.setdefault(inv.encode()[-1], inv)
    assert "X" in ends and len(ends) == 64
    for inv in ends.values():
        assert parse_invite(inv.encode()) == inv


@pytest.mark.parametrize("invite_id", ["a", "ab", "abc", "abcd1234"])  # every base64 padding length
def test_encode_is_the_documented_format_and_parses_back(invite_id):
    addrs = ("sig.example:7300", "[2001:db8::1]:443", "10.0.0.1:1")
    inv = Invite(addrs, KEY, invite_id, SECRET)
    text = inv.encode()
    assert text == spec_text([list(addrs), KEY, invite_id, SECRET])
    assert "=" not in text
    got = parse_invite(text)
    assert got == inv and got.addrs == addrs and type(got.invite_id) is str and type(got.secret) is bytes


def test_a_hand_built_invite_parses():
    inv = parse_invite("\t" + spec_text([["a:1", "b:2"], KEY, "id", SECRET]) + " \n")
    assert inv == Invite(("a:1", "b:2"), KEY, "id", SECRET)


@pytest.mark.parametrize("text, reason", [
    ("", "mwg1_"), ("hello", "mwg1_"), ("MWG1_abcd", "mwg1_"),
    ("mwg1_A", "base64"),  # one base64 character cannot encode a byte
    ("mwg1_AAAA!", "base64"),  # a character outside the alphabet
    ("mwg1_AAA", "checksum"),  # two bytes: shorter than a checksum
    ("mwg1_AAAAAA", "checksum"),  # four zero bytes: an empty body with a wrong checksum
])
def test_garbage_is_refused_with_its_reason(text, reason):
    assert reason in refusal(text)


def test_four_bytes_that_are_the_checksum_of_nothing_are_still_a_truncated_invite():
    raw = hashlib.blake2s(b"").digest()[:4]
    assert "checksum" in refusal("mwg1_" + base64.urlsafe_b64encode(raw).decode().rstrip("="))


def test_a_body_of_one_byte_with_its_checksum_is_malformed_not_a_checksum_error():
    body = msgpack.packb(1)
    raw = body + hashlib.blake2s(body).digest()[:4]
    assert "malformed" in refusal("mwg1_" + base64.urlsafe_b64encode(raw).decode().rstrip("="))


def test_a_non_canonical_spelling_is_refused():
    text = spec_text([["a:1"], KEY, "ab", SECRET])
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # The last character carries unused low bits when the length is not a multiple of 3: flipping the lowest
    # one decodes to the same bytes.
    assert len(base64.urlsafe_b64decode(text[5:] + "=" * (-len(text[5:]) % 4))) % 3 != 0
    twin = text[:-1] + alphabet[alphabet.index(text[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin[5:] + "==") == base64.urlsafe_b64decode(text[5:] + "==")
    assert "base64" in refusal(twin)


def test_a_flipped_checksum_or_body_byte_is_a_checksum_error():
    good = spec_text([["a:1"], KEY, "id", SECRET])
    body = msgpack.packb([["a:1"], KEY, "id", SECRET], use_bin_type=True)
    check = hashlib.blake2s(body).digest()[:4]
    assert "checksum" in refusal(spec_text([["a:1"], KEY, "id", SECRET], check=bytes([check[0] ^ 1]) + check[1:]))
    assert "checksum" in refusal(spec_text([["a:1"], KEY, "id", SECRET], check=check[:3] + bytes([check[3] ^ 1])))
    assert parse_invite(good).addrs == ("a:1",)


@pytest.mark.parametrize("fields", [
    [["a:1"], KEY, "id"],  # three fields
    [["a:1"], KEY, "id", SECRET, b"x"],  # five
    [["a:1"], KEY[:31], "id", SECRET],  # a 31-byte server key
    [["a:1"], KEY + b"x", "id", SECRET],
    [["a:1"], "k" * 32, "id", SECRET],  # a key as text
    [["a:1"], KEY, b"id", SECRET],  # an id as bytes
    [["a:1"], KEY, 7, SECRET],
    [["a:1"], KEY, "id", "secret"],  # a secret as text
    [["a:1"], KEY, "id", None],
    [7, KEY, "id", SECRET],  # addresses not a list
    [["a"], KEY, "id", SECRET],  # an address without a port
    [["a:1", "b:0"], KEY, "id", SECRET],  # a bad second address
    [[1], KEY, "id", SECRET],
    {"a": 1},
])
def test_malformed_content_is_refused(fields):
    assert "malformed" in refusal(spec_text(fields))


def test_an_invite_without_addresses_is_refused():
    assert "no server address" in refusal(spec_text([[], KEY, "id", SECRET]))


@pytest.mark.parametrize("addr, want", [
    ("host:1", ("host", 1)), ("10.0.0.1:65535", ("10.0.0.1", 65535)), ("[::1]:53", ("::1", 53)),
    ("[2001:db8::1]:7300", ("2001:db8::1", 7300)), ("a.b:080", ("a.b", 80)),
])
def test_split_hostport_accepts(addr, want):
    assert split_hostport(addr) == want


@pytest.mark.parametrize("addr", [
    "", "host", "host:", ":80", "host:0", "host:65536", "host:-1", "host:8o", "host: 80", "[::1]", "[]:80",
    "[::1]:", "[::1]:0", "[::1]:65536", "[::1]X53",
])
def test_split_hostport_refuses(addr):
    with pytest.raises(ValueError, match="bad address"):
        split_hostport(addr)


@pytest.mark.parametrize("host, port, text", [
    ("sig.example", 7300, "sig.example:7300"), ("10.0.0.1", 1, "10.0.0.1:1"), ("::1", 53, "[::1]:53"),
    ("2001:db8::1", 65535, "[2001:db8::1]:65535"),
])
def test_join_hostport_brackets_v6_and_round_trips(host, port, text):
    assert join_hostport(host, port) == text
    assert split_hostport(text) == (host, port)

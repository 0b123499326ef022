"""Keys: clamping, strict base64/hex, and parity with the real `wg genkey|pubkey|genpsk`."""

from __future__ import annotations

import base64
import io
import os
import random
import re
import subprocess
import sys

import pytest

from meshwg import cli
from meshwg.config import keys
from conftest import require_real_components  # tests/conftest.py (a site-packages "tests" package shadows tests.conftest)

B64_KEY_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


def run_meshwg_inprocess(argv, stdin_bytes, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin_bytes)))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_clamp_bits():
    for raw in (bytes(32), b"\xff" * 32, os.urandom(32)):
        sk = keys.clamp(raw)
        assert sk[0] & 7 == 0
        assert sk[31] & 0x80 == 0 and sk[31] & 0x40
        assert sk[1:31] == raw[1:31]


def test_generate_private_key_is_clamped_and_uses_injected_randomness():
    fixed = lambda n: b"\xff" * n  # noqa: E731
    sk = keys.generate_private_key(fixed)
    assert sk == b"\xf8" + b"\xff" * 30 + b"\x7f"
    assert keys.generate_psk(fixed) == b"\xff" * 32  # PSKs are not clamped


def test_public_key_of_unclamped_equals_clamped():
    raw = b"\xff" * 32
    assert keys.public_key(raw) == keys.public_key(keys.clamp(raw))


def test_known_answer_public_key():
    # wg(8) man page example key pair (wg-quick(8) EXAMPLES): checked against `wg pubkey` below too.
    sk = keys.key_from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=")
    assert keys.key_to_base64(keys.public_key(sk)) == "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "wrong key length (got 0 bytes, want 32)"),
        ("AAAA", "wrong key length (got 3 bytes, want 32)"),
        (base64.b64encode(bytes(31)).decode(), "wrong key length (got 31 bytes, want 32)"),
        (base64.b64encode(bytes(33)).decode(), "wrong key length (got 33 bytes, want 32)"),
        ("not base64 at all!", "bad base64"),
        ("A" * 43, "bad base64"),  # missing padding
        ("A" * 42 + "B=", "bad base64"),  # non-zero padding bits: wg rejects this spelling
        (" " + "A" * 43 + "=", "bad base64"),
        ("A" * 43 + "=\n", "bad base64"),
        ("A" * 43 + "==", "bad base64"),
    ],
)
def test_key_from_base64_errors(text, message):
    with pytest.raises(keys.KeyFormatError) as info:
        keys.key_from_base64(text)
    assert str(info.value) == message


def test_base64_and_hex_round_trip():
    for _ in range(20):
        key = os.urandom(32)
        assert keys.key_from_base64(keys.key_to_base64(key)) == key
        assert keys.key_from_hex(keys.key_to_hex(key)) == key
        assert keys.key_from_hex(keys.key_to_hex(key).upper()) == key
    for bad in ("", "00" * 31, "0" * 63, "g" * 64, " " + "0" * 63, "0" * 65):
        with pytest.raises(keys.KeyFormatError):
            keys.key_from_hex(bad)


def test_nonzero():
    assert keys.nonzero(None) is None
    assert keys.nonzero(keys.ZERO_KEY) is None
    assert keys.nonzero(b"\x01" * 32) == b"\x01" * 32


def test_pubkey_matches_real_wg_for_50_random_keys(monkeypatch, capsys):
    require_real_components("wg")
    rng = random.Random(0x5EED)
    for i in range(50):
        raw = bytes(rng.getrandbits(8) for _ in range(32))  # deliberately unclamped
        text = base64.b64encode(raw).decode()
        real = subprocess.run(["wg", "pubkey"], input=text + "\n", capture_output=True, text=True, check=True).stdout
        code, ours, err = run_meshwg_inprocess(["pubkey"], (text + "\n").encode(), monkeypatch, capsys)
        assert (code, err) == (0, "")
        assert ours == real, f"key #{i} {text}"


def test_cli_end_to_end_genkey_pubkey_genpsk_against_wg():
    require_real_components("wg")
    run = lambda *argv, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "meshwg", *argv], capture_output=True, text=True, check=True, **kw
    )
    sk_text = run("genkey").stdout
    assert B64_KEY_RE.fullmatch(sk_text.rstrip("\n")) and sk_text.endswith("\n") and sk_text.count("\n") == 1
    sk = keys.key_from_base64(sk_text.strip())
    assert keys.clamp(sk) == sk
    real_genkey = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    assert B64_KEY_RE.fullmatch(real_genkey.rstrip("\n"))  # same shape as wg's
    ours = run("pubkey", input=sk_text).stdout
    real = subprocess.run(["wg", "pubkey"], input=sk_text, capture_output=True, text=True, check=True).stdout
    assert ours == real
    psk = run("genpsk").stdout
    assert len(psk) == 45 and psk.endswith("=\n") and len(keys.key_from_base64(psk.strip())) == 32
    # a real wg accepts our public key and PSK as keys (wg pubkey parses any 32-byte key)
    subprocess.run(["wg", "pubkey"], input=psk, capture_output=True, text=True, check=True)


@pytest.mark.parametrize(
    "stdin, fragment",
    [
        (b"", "wrong key length (got 0 bytes, want 32)"),
        (b"hello", "bad base64"),
        (b"\xff\xfe", "bad base64"),
        (b"AAAA\n", "wrong key length (got 3 bytes, want 32)"),
        (b"A" * 5000, "input too long"),
    ],
)
def test_pubkey_bad_input_is_one_line(stdin, fragment, monkeypatch, capsys):
    code, out, err = run_meshwg_inprocess(["pubkey"], stdin, monkeypatch, capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("meshwg: pubkey: ") and fragment in err

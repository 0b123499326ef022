"""`python -m meshwg strip`: a bad config is one stderr line and exit 1; a good one prints the wg-only form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshwg import __version__
from conftest import require_real_components  # tests/conftest.py (a site-packages "tests" package shadows tests.conftest)

SK = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PK1 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
GOOD = f"[Interface]\nPrivateKey = {SK}\nAddress = 10.0.0.1/24\nDNS = 10.0.0.53\nPostUp = echo %i\n\n[Peer]\nPublicKey = {PK1}\nAllowedIPs = 10.0.0.2/32\n"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def meshwg(*argv, input=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": ROOT}  # `python -m meshwg` from any directory
    return subprocess.run(
        [sys.executable, "-m", "meshwg", *argv], capture_output=True, text=True, input=input, timeout=60, cwd=cwd, env=env
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("10.0.0.2/32", "10.0.0.2/40"), "wg7.conf:9: AllowedIPs: bad CIDR"),
        (GOOD.replace(PK1, PK1[:-4] + "AA!="), "wg7.conf:8: PublicKey: bad base64"),
        (GOOD + "Colour = blue\n", "wg7.conf:10: Colour: unknown key in [Peer]"),
    ],
)
def test_bad_config_is_one_stderr_line_and_exit_1(tmp_path, text, expected):
    path = tmp_path / "wg7.conf"
    path.write_text(text)
    result = meshwg("strip", "wg7.conf", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"meshwg: {expected}")


def test_missing_file_is_one_line(tmp_path):
    result = meshwg("strip", str(tmp_path / "nope.conf"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "No such file" in result.stderr


def test_strip_cli_matches_real_wg_quick(tmp_path):
    require_real_components("wg-quick")
    os.chmod(tmp_path, 0o700)
    path = tmp_path / "wg7.conf"
    path.write_text(GOOD)
    os.chmod(path, 0o600)
    ours = meshwg("strip", str(path))
    real = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True, check=True)
    assert ours.returncode == 0 and ours.stderr == ""
    assert ours.stdout == real.stdout
    assert "Address" not in ours.stdout and "PublicKey" in ours.stdout
    assert meshwg("strip", "-", input=GOOD).stdout == real.stdout


@pytest.mark.parametrize("pure, expected", [("0", "libsodium"), ("1", "cryptography")])
def test_version_names_the_hot_path(pure, expected):
    """What a bug report needs first: the release and whether the compiled hot path is in use."""
    for program in ("meshwg", "meshwg-tun"):
        out = subprocess.run([os.path.join(os.path.dirname(sys.executable), program), "--version"],
                             capture_output=True, text=True, env={**os.environ, "MESHWG_PURE_PYTHON": pure}, check=True)
        assert out.stdout.startswith(f"{program} {__version__} (transport crypto: {expected}")

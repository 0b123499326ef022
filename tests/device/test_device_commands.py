"""`meshwg up/down/save` helpers that need no namespace: reading the config file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshwg.commands import device as D
from meshwg.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_non_utf8_config_is_a_one_line_error(tmp_path):
    conf = tmp_path / "wgbad0.conf"
    conf.write_bytes(b"[Interface]\nPrivateKey = \xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8"):
        D._load(str(conf))
    # PYTHONUTF8: a UTF-8 default encoding whatever the machine's locale, so the bytes cannot decode.
    env = {**os.environ, "PYTHONUTF8": "1"}
    for command in ("up", "down"):  # (`save` asks the device first: no device here)
        proc = subprocess.run([sys.executable, "-m", "meshwg", command, str(conf)], cwd=REPO, env=env, check=False,
                              capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stderr) == (1, f"meshwg: {conf}: not UTF-8 text\n")

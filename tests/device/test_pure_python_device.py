"""A meshwg-tun without its compiled hot path (MESHWG_PURE_PYTHON=1: `cryptography` for transport
data, os.read/recvmsg for the drain) against one with it: same wire, same behaviour."""

from __future__ import annotations

import pytest

from conftest import require_real_components  # tests/conftest.py
from wgnet import ENV, Pair, ping, tcp_transfer

pytestmark = pytest.mark.netns


def _compiled_modules_mapped(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as maps:
        mapped = maps.read()
    return {name for name in ("_transport", "_fastio") if f"/{name}.cpython" in mapped}


def test_pure_python_and_compiled_devices_talk():
    require_real_components("wg", "ip", "ping")
    pair = Pair(93)
    try:
        pure = pair.device(pair.a, "meshwg", 51820, 1, env={**ENV, "MESHWG_PURE_PYTHON": "1"})
        compiled = pair.device(pair.b, "meshwg", 51821, 2)
        pure.add_peer(compiled, ["10.93.0.2/32", "fd93::2/128"], "192.168.93.2:51821")
        compiled.add_peer(pure, ["10.93.0.1/32", "fd93::1/128"], "192.168.93.1:51820")
        assert ping(pair.a, "10.93.0.2")
        assert ping(pair.b, "fd93::1")
        for sender, receiver, addr in ((pair.a, pair.b, "10.93.0.2"), (pair.b, pair.a, "10.93.0.1")):
            sent, got = tcp_transfer(sender, receiver, addr, 5 * 1024 * 1024)
            assert sent == got and sent.startswith(str(5 * 1024 * 1024))
        # What each process really runs: the compiled modules are mapped only where imported.
        assert not _compiled_modules_mapped(pure.proc.pid)
        assert _compiled_modules_mapped(compiled.proc.pid) == {"_transport", "_fastio"}
    finally:
        pair.close()

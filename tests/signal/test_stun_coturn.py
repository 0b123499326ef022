"""Our STUN client codec against a real coturn on loopback (the node must work with any standard server)."""

from __future__ import annotations

import os
import socket
import subprocess

import trio
from sig_helpers import require_real_components

from meshwg.disco import stun


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_our_codec_against_coturn(tmp_path):
    require_real_components("turnserver")
    port = _free_udp_port()
    conf = tmp_path / "turnserver.conf"
    conf.write_text(
        f"listening-ip=127.0.0.1\nlistening-port={port}\nstun-only\nno-auth\nno-cli\nno-tls\nno-dtls\n"
        f"fingerprint\nsimple-log\nlog-file={tmp_path}/turn.log\npidfile={tmp_path}/turn.pid\n"
        f"userdb={tmp_path}/turndb\n"
    )
    proc = subprocess.Popen(["turnserver", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for fam, host in ((socket.AF_INET, "127.0.0.1"),):
            s = trio.socket.socket(fam, trio.socket.SOCK_DGRAM)
            await s.bind((host, 0))
            result = None
            with trio.fail_after(10):  # coturn needs a moment to bind; retry the request until it answers
                while result is None:
                    txid = os.urandom(12)
                    await s.sendto(stun.build_binding_request(txid, software=True, fingerprint=True), (host, port))
                    with trio.move_on_after(0.2):
                        data, _ = await s.recvfrom(2048)
                        result = stun.parse_binding_response_untrusted(data)
                        assert stun.is_stun_untrusted(data)
            assert result == (txid, (host, s.getsockname()[1]))
            # a corrupted FINGERPRINT must be rejected, truncations must not raise
            assert stun.parse_binding_response_untrusted(data[:-1] + bytes([data[-1] ^ 1])) is None
            for i in range(len(data)):
                stun.parse_binding_response_untrusted(data[:i])
            s.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

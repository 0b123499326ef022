"""meshwg-tun against wireguard-go, both driven by the stock `wg`, in two network namespaces."""

from __future__ import annotations

import os
import socket
import time

import pytest

from conftest import require_real_components  # tests/conftest.py
from wgnet import Pair, genkey, ping, tcp_transfer

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def net():
    require_real_components("wireguard-go", "wg", "ip", "ping")
    pair = Pair(91)
    try:
        m = pair.device(pair.a, "meshwg", 51820, 1)
        g = pair.device(pair.b, "wggo", 51821, 2)
        m.add_peer(g, ["10.91.0.2/32", "fd91::2/128"], "192.168.91.2:51821")
        g.add_peer(m, ["10.91.0.1/32", "fd91::1/128"], "192.168.91.1:51820")
        yield pair, m, g
    finally:
        pair.close()


def test_ping_both_ways_ipv4_and_ipv6(net):
    pair, m, g = net
    assert ping(pair.a, "10.91.0.2")
    assert ping(pair.b, "10.91.0.1")
    assert ping(pair.a, "fd91::2")
    assert ping(pair.b, "fd91::1")


def test_dump_fields(net):
    pair, m, g = net
    assert ping(pair.a, "10.91.0.2")
    iface_line, peer_line = m.dump()
    assert iface_line[0] == m.sk and iface_line[1] == m.pk and iface_line[2] == "51820" and iface_line[3] == "off"
    pub, psk, endpoint, allowed, handshake, rx, tx, keepalive = peer_line
    assert pub == g.pk and psk == "(none)" and endpoint == "192.168.91.2:51821"
    assert allowed == "10.91.0.2/32,fd91::2/128"
    assert abs(int(handshake) - time.time()) < 60
    assert int(rx) > 0 and int(tx) > 0 and keepalive == "off"
    # Counters agree with the other side's view (what we sent is what it received, modulo in-flight).
    g_peer = g.dump()[1]
    assert abs(int(g_peer[5]) - int(tx)) < 4096 and abs(int(g_peer[6]) - int(rx)) < 4096
    m.wg("set", m.iface, "peer", g.pk, "persistent-keepalive", "25")
    assert m.dump()[1][7] == "25"
    m.wg("set", m.iface, "peer", g.pk, "persistent-keepalive", "0")


def test_tcp_50mb_checksum(net):
    pair, m, g = net
    assert ping(pair.a, "10.91.0.2")
    sent, got = tcp_transfer(pair.a, pair.b, "10.91.0.2", 50 * 1024 * 1024)
    assert sent == got and sent.startswith(str(50 * 1024 * 1024))
    sent, got = tcp_transfer(pair.b, pair.a, "10.91.0.1", 10 * 1024 * 1024, port=5002)
    assert sent == got


def test_peer_added_and_removed_live(net):
    pair, m, g = net
    extra_sk, extra_pk = genkey()
    m.wg("set", m.iface, "peer", extra_pk, "allowed-ips", "10.91.0.77/32", "endpoint", "192.168.91.2:40000")
    dump = m.dump()
    assert [row[0] for row in dump[1:]] == [g.pk, extra_pk]
    assert dump[2][3] == "10.91.0.77/32" and dump[2][2] == "192.168.91.2:40000"
    # Moving a prefix to the new peer takes it from the old one (cryptokey routing).
    m.wg("set", m.iface, "peer", extra_pk, "allowed-ips", "10.91.0.77/32,fd91::2/128")
    assert m.dump()[1][3] == "10.91.0.2/32"
    m.wg("set", m.iface, "peer", extra_pk, "remove")
    assert [row[0] for row in m.dump()[1:]] == [g.pk]
    m.wg("set", m.iface, "peer", g.pk, "allowed-ips", "10.91.0.2/32,fd91::2/128")
    assert ping(pair.a, "fd91::2")


def test_uapi_garbage_gets_einval_and_device_survives(net):
    pair, m, g = net
    def ask(payload: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(m.sock)
            s.sendall(payload)
            buf = b""
            while not buf.endswith(b"\n\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            return buf
    assert ask(b"set=1\nfoo=bar\n\n") == b"errno=-22\n\n"
    assert ask(b"set=1\npublic_key=zz\n\n") == b"errno=-22\n\n"
    assert ask(b"set=1\nlisten_port=99999\n\n") == b"errno=-22\n\n"
    assert ask(b"\xff\xfe garbage\n\n") == b"errno=-22\n\n"
    assert ask(os.urandom(3000) + b"\n\n").startswith(b"errno=-")
    assert ask(b"get=1\n\n").endswith(b"errno=0\n\n")
    assert m.proc.poll() is None
    assert ping(pair.a, "10.91.0.2")


def test_listen_port_rebind(net):
    pair, m, g = net
    m.wg("set", m.iface, "listen-port", "51830")
    assert m.dump()[0][2] == "51830"
    g.wg("set", g.iface, "peer", m.pk, "endpoint", "192.168.91.1:51830")
    assert ping(pair.b, "10.91.0.1")
    m.wg("set", m.iface, "listen-port", "51820")
    g.wg("set", g.iface, "peer", m.pk, "endpoint", "192.168.91.1:51820")
    assert ping(pair.b, "10.91.0.1")


def test_sigterm_removes_interface_and_socket():
    require_real_components("wireguard-go", "wg", "ip")
    pair = Pair(92)
    try:
        dev = pair.device(pair.a, "meshwg", 51820, 1)
        assert os.path.exists(dev.sock)
        dev.proc.terminate()  # SIGTERM to `ip netns exec`, which execs meshwg-tun: same PID
        dev.proc.wait(10)
        assert dev.proc.returncode == 0
        assert not os.path.exists(dev.sock)
        assert dev.iface not in pair.a.run("ip", "link")
    finally:
        pair.close()

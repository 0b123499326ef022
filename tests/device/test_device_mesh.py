"""meshwg <-> meshwg (IPv6 outer endpoint, roaming), stock wg-quick with meshwg-tun, and `meshwg up/down`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import require_real_components  # tests/conftest.py
from scenarios.netns import unique_name, wait_for
from wgnet import ENV, REPO, Pair, genkey, ping, tcp_transfer

pytestmark = pytest.mark.netns


def test_meshwg_pair_ipv6_endpoint_and_roaming():
    require_real_components("wg", "ip", "ping")
    pair = Pair(93)
    try:
        a = pair.device(pair.a, "meshwg", 51820, 1)
        b = pair.device(pair.b, "meshwg", 51821, 2)
        a.add_peer(b, ["10.93.0.2/32", "fd93::2/128"], "[fd00:93::2]:51821")
        b.add_peer(a, ["10.93.0.1/32", "fd93::1/128"], "[fd00:93::1]:51820")
        assert ping(pair.a, "10.93.0.2") and ping(pair.b, "10.93.0.1")
        assert ping(pair.a, "fd93::2") and ping(pair.b, "fd93::1")
        sent, got = tcp_transfer(pair.a, pair.b, "fd93::2", 8 * 1024 * 1024)
        assert sent == got
        assert b.dump()[1][2] == "[fd00:93::1]:51820"
        # a moves to a new address; its next authenticated packet teaches b the new endpoint.
        pair.a.run("ip", "-6", "addr", "add", "fd00:93::11/64", "dev", "eth0", "nodad")
        pair.a.run("ip", "-6", "addr", "del", "fd00:93::1/64", "dev", "eth0")
        assert ping(pair.a, "10.93.0.2")
        assert b.dump()[1][2] == "[fd00:93::11]:51820"
        assert ping(pair.b, "10.93.0.1")
    finally:
        pair.close()


def _write_conf(path: str, text: str) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


def _peer_wggo(pair: Pair, client_pk: str):
    g = pair.device(pair.b, "wggo", 51821, 2)
    g.wg("set", g.iface, "peer", client_pk, "allowed-ips", f"10.{pair.n}.0.1/32,fd{pair.n}::1/128")
    return g


def test_stock_wg_quick_with_meshwg_tun():
    require_real_components("wg-quick", "wg", "wireguard-go", "ip", "nft", "ping")
    pair = Pair(94)
    iface = unique_name("mq")
    conf = f"/tmp/{iface}.conf"
    try:
        sk, pk = genkey()
        g = _peer_wggo(pair, pk)
        _write_conf(conf, f"[Interface]\nPrivateKey = {sk}\nAddress = 10.94.0.1/24, fd94::1/64\nListenPort = 51820\n\n"
                          f"[Peer]\nPublicKey = {g.pk}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = 192.168.94.2:51821\n")
        env = {**ENV, "WG_QUICK_USERSPACE_IMPLEMENTATION": "meshwg-tun"}
        up = subprocess.run(pair.a.argv("wg-quick", "up", conf), env=env, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert "meshwg-tun" in up.stderr  # wg-quick fell back to our userspace implementation
        # Everything routes into the tunnel, yet the tunnel's own (fwmarked) UDP still reaches the peer.
        assert ping(pair.a, "10.94.0.2") and ping(pair.a, "fd94::2") and ping(pair.b, "10.94.0.1")
        assert pair.a.run("wg", "show", iface, "fwmark").strip() == "0xca6c"
        down = subprocess.run(pair.a.argv("wg-quick", "down", conf), env=env, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        wait_for(lambda: not os.path.exists(f"/var/run/wireguard/{iface}.sock"), 5, what="socket removed")
        assert iface not in pair.a.run("ip", "link")
    finally:
        pair.close()
        os.unlink(conf)


def test_meshwg_up_and_down():
    require_real_components("wg", "wireguard-go", "ip", "ping")
    pair = Pair(95)
    iface = unique_name("mu")
    conf = f"/tmp/{iface}.conf"
    marker = f"/tmp/{iface}.hook"
    meshwg = [os.path.join(REPO, ".venv", "bin", "python"), "-m", "meshwg"]
    try:
        sk, pk = genkey()
        g = _peer_wggo(pair, pk)
        _write_conf(conf, f"[Interface]\nPrivateKey = {sk}\nAddress = 10.95.0.1/24, fd95::1/64\nMTU = 1380\n"
                          f"PostUp = echo up %i >> {marker}\nPostDown = echo down %i >> {marker}\n\n"
                          f"[Peer]\nPublicKey = {g.pk}\nAllowedIPs = 0.0.0.0/0, fd95::/64\n"
                          f"Endpoint = 192.168.95.2:51821\nPersistentKeepalive = 15\n")
        up = subprocess.run(pair.a.argv(*meshwg, "up", conf), env=ENV, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert "mtu 1380" in pair.a.run("ip", "link", "show", iface)
        assert "10.95.0.1/24" in pair.a.run("ip", "addr", "show", iface)
        assert "not from all fwmark 0xca6c lookup 51820" in pair.a.run("ip", "-4", "rule")
        assert f"default dev {iface}" in pair.a.run("ip", "-4", "route", "show", "table", "51820")
        assert "fd95::/64" in pair.a.run("ip", "-6", "route", "show", "dev", iface)
        assert ping(pair.a, "10.95.0.2") and ping(pair.a, "fd95::2") and ping(pair.b, "10.95.0.1")
        shown = json.loads(pair.a.run(*meshwg, "show", iface, "--json"))
        assert shown["peers"][0]["public_key"] == g.pk and shown["peers"][0]["persistent_keepalive"] == 15
        assert shown["peers"][0]["latest_handshake"] and shown["peers"][0]["rx_bytes"] > 0
        assert "latest handshake" in pair.a.run(*meshwg, "show", iface)
        again = subprocess.run(pair.a.argv(*meshwg, "up", conf), env=ENV, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already exists" in again.stderr
        down = subprocess.run(pair.a.argv(*meshwg, "down", conf), env=ENV, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert not os.path.exists(f"/var/run/wireguard/{iface}.sock")
        assert iface not in pair.a.run("ip", "link")
        assert "lookup 51820" not in pair.a.run("ip", "-4", "rule")
        with open(marker) as f:
            assert f.read() == f"up {iface}\ndown {iface}\n"
    finally:
        pair.close()
        for path in (conf, marker):
            if os.path.exists(path):
                os.unlink(path)

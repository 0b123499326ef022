"""signal_server.plain_config (issue 12): the wg-quick config of a plain WireGuard peer is read back by the project's
parser, by the real `wg-quick strip` and by the real `wg setconf` (on a userspace wireguard-go device in a throwaway
network namespace), and its QR code (PNG and terminal text) decodes with a real decoder (zbarimg) to the same text."""

from __future__ import annotations

import ipaddress
import os
import pathlib
import re
import subprocess

import pytest

from meshwg.config import keys, wgquick
from meshwg.wg import crypto
from signal_server.plain_config import TargetNode, qr_png, qr_terminal, render_config, write_qr_png
from sig_helpers import require_real_components

PHONE_SK = crypto.clamp(bytes(range(1, 33)))
PHONE_PK = crypto.dh_pub(PHONE_SK)
HOME_PK, OFFICE_PK, OTHER_PK = (crypto.dh_pub(crypto.clamp(bytes([b]) * 32)) for b in (0x21, 0x22, 0x23))
ADDRS = ["100.64.0.9/32", "fd7a:115c:a1e0::9/128"]
HOME = TargetNode("home", HOME_PK, ["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "192.168.1.0/24"])
OFFICE = TargetNode("office", OFFICE_PK, ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"])
SERVER = ("203.0.113.1", 51820)


def _net(*texts):
    return [ipaddress.ip_network(t) for t in texts]


def test_config_with_private_key_parses_back_with_every_field():
    text = render_config(name="phone", addresses=ADDRS, targets=[HOME, OFFICE], server_endpoint=SERVER,
                         private_key=PHONE_SK)
    cfg = wgquick.parse(text)
    assert cfg.interface.private_key == PHONE_SK
    assert cfg.interface.addresses == [ipaddress.ip_interface(a) for a in ADDRS]
    # Reached through the relay: room for its 37 B RECV header on the server -> node leg (1420 - 37).
    assert cfg.interface.mtu == 1383 and "\nMTU = 1383\n" in text
    assert [p.public_key for p in cfg.peers] == [HOME_PK, OFFICE_PK]
    assert cfg.peers[0].allowed_ips == _net("100.64.0.1/32", "fd7a:115c:a1e0::1/128", "192.168.1.0/24")
    assert cfg.peers[1].allowed_ips == _net("100.64.0.2/32", "fd7a:115c:a1e0::2/128")
    for peer in cfg.peers:
        assert peer.endpoint == wgquick.Endpoint("203.0.113.1", 51820)
        assert peer.persistent_keepalive == 25
        assert peer.preshared_key is None
    assert wgquick.format_config(cfg) == text  # canonical text


def test_config_with_only_a_public_key_says_where_the_devices_key_goes():
    text = render_config(name="phone", addresses=ADDRS, targets=[HOME], server_endpoint=SERVER, public_key=PHONE_PK)
    assert keys.key_to_base64(PHONE_SK) not in text
    cfg = wgquick.parse(text, require_private_key=False)
    assert cfg.interface.private_key is None
    lines = text.splitlines()
    i = lines.index("[Interface]")
    assert lines[i + 1].startswith("# PrivateKey = ") and keys.key_to_base64(PHONE_PK) in lines[i + 1]
    # the owner replaces that line with the device's key: the config is then complete
    filled = text.replace(lines[i + 1], f"PrivateKey = {keys.key_to_base64(PHONE_SK)}")
    assert wgquick.parse(filled).interface.public_key == PHONE_PK


def test_exit_node_routes_everything_through_that_node_only():
    text = render_config(name="phone", addresses=ADDRS, targets=[HOME, OFFICE], server_endpoint=SERVER,
                         private_key=PHONE_SK, exit_node=OFFICE_PK)
    cfg = wgquick.parse(text)
    assert cfg.peers[0].allowed_ips == _net("100.64.0.1/32", "fd7a:115c:a1e0::1/128", "192.168.1.0/24")
    assert cfg.peers[1].allowed_ips == _net("0.0.0.0/0", "::/0")


def test_direct_endpoint_and_ipv6_or_hostname_server_endpoints():
    direct = TargetNode("home", HOME_PK, ["100.64.0.1/32"], endpoint=("198.51.100.5", 41641))
    text = render_config(name="p", addresses=ADDRS, targets=[direct, OFFICE], server_endpoint=("2001:db8::1", 51820),
                         private_key=PHONE_SK)
    cfg = wgquick.parse(text)
    assert cfg.peers[0].endpoint == wgquick.Endpoint("198.51.100.5", 41641)
    assert cfg.peers[1].endpoint == wgquick.Endpoint("2001:db8::1", 51820)
    assert "Endpoint = [2001:db8::1]:51820" in text
    assert cfg.interface.mtu == 1383   # one target through the relay: its MTU
    only_direct = wgquick.parse(render_config(name="p", addresses=ADDRS, targets=[direct], server_endpoint=SERVER,
                                              private_key=PHONE_SK))
    assert only_direct.interface.mtu is None   # no relay on any path: the app's default MTU
    text = render_config(name="p", addresses=ADDRS, targets=[HOME], server_endpoint="vpn.example.org:51820",
                         private_key=PHONE_SK)
    assert wgquick.parse(text).peers[0].endpoint == wgquick.Endpoint("vpn.example.org", 51820)


@pytest.mark.parametrize("kw, needle", [
    (dict(exit_node=OTHER_PK), keys.key_to_base64(OTHER_PK)),
    (dict(addresses=["100.64.0.300/32"]), "100.64.0.300/32"),
    (dict(targets=[TargetNode("home", HOME_PK, ["192.168.1.5/24"])]), "192.168.1.5/24"),
    (dict(server_endpoint="203.0.113.1"), "203.0.113.1"),
    (dict(public_key=PHONE_PK), "not both"),
])
def test_bad_values_give_one_line_errors_naming_the_value(kw, needle):
    args = dict(name="p", addresses=ADDRS, targets=[HOME], server_endpoint=SERVER, private_key=PHONE_SK) | kw
    with pytest.raises(ValueError) as err:
        render_config(**args)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _configs():
    return {
        "private": render_config(name="phone", addresses=ADDRS, targets=[HOME, OFFICE], server_endpoint=SERVER,
                                 private_key=PHONE_SK),
        "public": render_config(name="phone", addresses=ADDRS, targets=[HOME], server_endpoint=("2001:db8::1", 51820),
                                public_key=PHONE_PK, exit_node=HOME_PK),
    }


@pytest.mark.parametrize("kind", ["private", "public"])
def test_real_wg_quick_strip_reads_it(kind, tmp_path):
    require_real_components("wg-quick")
    text = _configs()[kind]
    path = tmp_path / "wgp0.conf"
    path.write_text(text)
    res = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == wgquick.strip(text)
    assert "Address" not in res.stdout and "PersistentKeepalive = 25" in res.stdout


_NETNS_SCRIPT = r"""
set -e
mount -t tmpfs none /run
ip link set lo up
wireguard-go -f wgp0 >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for i in $(seq 100); do [ -S /run/wireguard/wgp0.sock ] && break; sleep 0.05; done
wg-quick strip "$1" > /run/stripped.conf
wg setconf wgp0 /run/stripped.conf
wg showconf wgp0
"""


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["private", "public"])
def test_real_wg_setconf_accepts_it_on_a_wireguard_go_device(kind, tmp_path):
    require_real_components("wireguard-go", "wg", "wg-quick", "ip", "unshare")
    text = _configs()[kind]
    path = tmp_path / "wgp0.conf"
    path.write_text(text)
    res = subprocess.run(["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", _NETNS_SCRIPT, "sh",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    shown = wgquick.parse(res.stdout, require_private_key=False)
    ours = wgquick.parse(text, require_private_key=False)
    assert shown.interface.private_key == ours.interface.private_key
    def peers(cfg):  # wg lists peers in its own order
        return sorted((p.public_key, sorted(map(str, p.allowed_ips)), str(p.endpoint), p.persistent_keepalive)
                      for p in cfg.peers)
    assert peers(shown) == peers(ours)


def _zbar(path: pathlib.Path) -> str:
    require_real_components("zbarimg")
    res = subprocess.run(["zbarimg", "--quiet", "--raw", str(path)], capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert out.endswith("\n")
    return out[:-1]  # zbarimg ends each symbol with a newline


@pytest.mark.parametrize("kind", ["private", "public"])
def test_qr_png_decodes_to_the_config(kind, tmp_path):
    text = _configs()[kind]
    path = tmp_path / "qr.png"
    path.write_bytes(qr_png(text))
    assert _zbar(path) == text


def test_qr_of_a_large_config_still_decodes(tmp_path):
    nodes = [TargetNode(f"node{i}", crypto.dh_pub(crypto.clamp(bytes([i + 1]) * 32)),
                        [f"100.64.0.{i + 1}/32", f"fd7a:115c:a1e0::{i + 1:x}/128", f"192.168.{i}.0/24"])
             for i in range(12)]
    text = render_config(name="phone", addresses=ADDRS, targets=nodes, server_endpoint=SERVER, private_key=PHONE_SK)
    assert len(text) > 2000
    path = tmp_path / "qr.png"
    path.write_bytes(qr_png(text))
    assert _zbar(path) == text


def test_write_qr_png_writes_a_private_file(tmp_path):
    text = _configs()["private"]
    path = tmp_path / "phone.png"
    write_qr_png(text, str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600  # it holds the private key
    assert _zbar(path) == text


_RUN = re.compile(r"\x1b\[(7|49)m((?:  )+)\x1b\[0m")


def test_terminal_qr_decodes_to_the_config(tmp_path):
    """Read the terminal text back into modules (ANSI reverse video = light, default background = dark; two columns
    per module) and hand them to zbarimg as a bitmap."""
    text = _configs()["private"]
    term = qr_terminal(text)
    rows = []
    for line in term.splitlines():
        assert _RUN.sub("", line) == ""  # nothing but runs of modules
        rows.append("".join(("0" if code == "7" else "1") * (len(spaces) // 2) for code, spaces in _RUN.findall(line)))
    assert len({len(r) for r in rows}) == 1 and len(rows) == len(rows[0])  # square, quiet zone included
    scale = 4
    pbm = [f"P1\n{len(rows[0]) * scale} {len(rows) * scale}"]
    for r in rows:
        pbm += [" ".join(c for c in r for _ in range(scale))] * scale
    path = tmp_path / "term.pbm"
    path.write_text("\n".join(pbm) + "\n")
    assert _zbar(path) == text

"""`meshwg up/down` against wg-quick(8): nft rules for a /0 peer, SaveConfig, `down IFACE`, DNS
without resolvconf, and the failed-up rollback. Each test has its own namespace and interface."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from conftest import require_real_components  # tests/conftest.py
from wgnet import REPO, genkey

from meshwg.config import wgquick
from scenarios.netns import Netns, unique_name

pytestmark = pytest.mark.netns

MESHWG = [os.path.join(REPO, ".venv", "bin", "python"), "-m", "meshwg"]
STATE_DIR = "/var/run/meshwg"


class Box:
    """A namespace with a veth (10.200.0.1/24 on e0) so endpoints have a route that stays inside it,
    and a PATH holding only the tools `meshwg up` may use: never resolvconf, so the host's DNS is
    never touched and the no-resolvconf path is what is tested, whatever the machine has."""

    def __init__(self, n: int):
        require_real_components("ip", "nft", "sysctl", "wg", "bash")
        self.n = n
        self.ns = Netns("mud")
        self.iface = unique_name("ud")
        self.conf = f"/tmp/{self.iface}.conf"
        self.marker = f"/tmp/{self.iface}.hook"
        self.bindir = tempfile.mkdtemp(prefix="meshwg-bin-")
        for tool in ("ip", "nft", "sysctl", "bash"):
            os.symlink(shutil.which(tool), os.path.join(self.bindir, tool))
        self.env = {**os.environ, "PATH": self.bindir}
        self.ns.run("ip", "link", "add", "e0", "type", "veth", "peer", "name", "e1")
        self.ns.run("ip", "addr", "add", "10.200.0.1/24", "dev", "e0")
        self.ns.run("ip", "link", "set", "e0", "up")
        self.ns.run("ip", "link", "set", "e1", "up")
        self.sk, self.pk = genkey()

    def write_conf(self, text: str, mode: int = 0o600) -> None:
        with open(os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
            f.write(text)
        os.chmod(self.conf, mode)

    def meshwg(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.ns.argv(*MESHWG, *args), check=False, env=self.env, capture_output=True, text=True, timeout=30)

    def sh(self, *cmd: str) -> str:
        return self.ns.run(*cmd)

    def link_exists(self) -> bool:
        return subprocess.run(self.ns.argv("ip", "link", "show", "dev", self.iface), check=False, capture_output=True).returncode == 0

    def close(self) -> None:
        try:
            if self.link_exists():
                self.meshwg("down", self.iface)
        finally:
            self.ns.close()  # removes the TUN; the daemon sees it go and exits
            shutil.rmtree(self.bindir, ignore_errors=True)
            for path in (self.conf, self.marker, os.path.join(STATE_DIR, f"{self.iface}.json")):
                if os.path.exists(path):
                    os.unlink(path)


def test_default_route_peer_gets_nft_rules_and_dns_warning():
    box = Box(61)
    try:
        _, peer_pk = genkey()
        box.write_conf(f"[Interface]\nPrivateKey = {box.sk}\nAddress = 10.61.0.1/24, fd61::1/64\nDNS = 10.61.0.53, corp.example\n\n"
                       f"[Peer]\nPublicKey = {peer_pk}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = 10.200.0.2:51820\n")
        up = box.meshwg("up", box.conf)
        assert up.returncode == 0, up.stderr
        # One clear line about DNS, nothing else (no traceback, no world-accessible warning for 0600).
        assert up.stderr.splitlines() == [
            "meshwg: warning: resolvconf is not installed: DNS = 10.61.0.53 not applied, system DNS left unchanged"]
        v4 = box.sh("nft", "list", "table", "ip", f"meshwg-{box.iface}")
        assert f'iifname != "{box.iface}" ip daddr 10.61.0.1 fib saddr type != local drop' in v4
        assert "type filter hook prerouting priority raw" in v4
        assert "meta l4proto udp meta mark 0x0000ca6c ct mark set meta mark" in v4
        assert "meta l4proto udp meta mark set ct mark" in v4
        v6 = box.sh("nft", "list", "table", "ip6", f"meshwg-{box.iface}")
        assert f'iifname != "{box.iface}" ip6 daddr fd61::1 fib saddr type != local drop' in v6
        assert "ct mark set meta mark" in v6
        assert box.sh("sysctl", "-n", "net.ipv4.conf.all.src_valid_mark").strip() == "1"
        assert "not from all fwmark 0xca6c lookup 51820" in box.sh("ip", "-4", "rule")
        assert "not from all fwmark 0xca6c lookup 51820" in box.sh("ip", "-6", "rule")

        down = box.meshwg("down", box.conf)
        assert down.returncode == 0, down.stderr
        assert "meshwg-" not in box.sh("nft", "list", "tables")
        assert "51820" not in box.sh("ip", "-4", "rule") and "51820" not in box.sh("ip", "-6", "rule")
        assert "suppress_prefixlength" not in box.sh("ip", "-4", "rule")
        assert not box.link_exists()
        assert not os.path.exists(os.path.join(STATE_DIR, f"{box.iface}.json"))
    finally:
        box.close()


def test_save_config_round_trip():
    box = Box(62)
    try:
        _, pk1 = genkey()
        _, pk2 = genkey()
        box.write_conf(f"# kept comment\n[Interface]\nPrivateKey = {box.sk}\nAddress = 10.62.0.1/24\nAddress = fd62::1/64\n"
                       f"MTU = 1400\nDNS = 10.62.0.53\nSaveConfig = true\nPostDown = echo down %i >> {box.marker}\n\n"
                       f"[Peer]\nPublicKey = {pk1}\nAllowedIPs = 10.62.0.2/32\nEndpoint = 10.200.0.2:51820\n")
        up = box.meshwg("up", box.conf)
        assert up.returncode == 0, up.stderr
        box.sh("wg", "set", box.iface, "peer", pk2, "allowed-ips", "10.62.0.3/32,fd62::3/128",
               "endpoint", "10.200.0.3:51821", "persistent-keepalive", "25")
        down = box.meshwg("down", box.conf)
        assert down.returncode == 0, down.stderr
        assert os.stat(box.conf).st_mode & 0o777 == 0o600
        with open(box.conf) as f:
            saved = f.read()
        cfg = wgquick.parse(saved, filename=box.conf)
        itf = cfg.interface
        assert wgquick.keys.key_to_base64(itf.private_key) == box.sk
        assert [str(a) for a in itf.addresses] == ["10.62.0.1/24", "fd62::1/64"]  # no kernel link-local
        assert itf.mtu == 1400 and itf.save_config is True and [str(d) for d in itf.dns] == ["10.62.0.53"]
        assert itf.post_down == [f"echo down %i >> {box.marker}"] and itf.listen_port
        peers = {wgquick.keys.key_to_base64(p.public_key): p for p in cfg.peers}
        assert set(peers) == {pk1, pk2}
        assert [str(n) for n in peers[pk2].allowed_ips] == ["10.62.0.3/32", "fd62::3/128"]
        assert str(peers[pk2].endpoint) == "10.200.0.3:51821" and peers[pk2].persistent_keepalive == 25
        assert saved.startswith("# kept comment\n[Interface]\n")
        # The saved file brings the same interface back, and saving it again is a fixed point.
        assert box.meshwg("up", box.conf).returncode == 0
        assert box.meshwg("down", box.conf).returncode == 0
        with open(box.conf) as f:
            assert f.read() == saved
        with open(box.marker) as f:
            assert f.read() == f"down {box.iface}\n" * 2
        assert not [n for n in os.listdir("/tmp") if n.startswith(f".{box.iface}.conf.")]  # no temp left
    finally:
        box.close()


def test_down_by_interface_name_uses_recorded_config():
    box = Box(63)
    try:
        _, peer_pk = genkey()
        assert not os.path.exists(f"/etc/wireguard/{box.iface}.conf")
        box.write_conf(f"[Interface]\nPrivateKey = {box.sk}\nAddress = 10.63.0.1/24\n"
                       f"PreDown = echo predown %i >> {box.marker}\nPostDown = echo postdown %i >> {box.marker}\n\n"
                       f"[Peer]\nPublicKey = {peer_pk}\nAllowedIPs = 0.0.0.0/0\nEndpoint = 10.200.0.2:51820\n")
        up = box.meshwg("up", box.conf)
        assert up.returncode == 0, up.stderr
        with open(os.path.join(STATE_DIR, f"{box.iface}.json")) as f:
            assert json.load(f)["config"] == box.conf
        assert f"meshwg-{box.iface}" in box.sh("nft", "list", "tables")
        down = box.meshwg("down", box.iface)
        assert down.returncode == 0, down.stderr
        with open(box.marker) as f:
            assert f.read() == f"predown {box.iface}\npostdown {box.iface}\n"
        assert not box.link_exists()
        assert "meshwg-" not in box.sh("nft", "list", "tables")
        assert "lookup 51820" not in box.sh("ip", "-4", "rule")
        assert not os.path.exists(os.path.join(STATE_DIR, f"{box.iface}.json"))
        again = box.meshwg("down", box.iface)
        assert again.returncode == 1 and "is not a WireGuard interface" in again.stderr
        veth = box.meshwg("down", "e0")  # like wg-quick: never deletes a link that is not WireGuard
        assert veth.returncode == 1 and "is not a WireGuard interface" in veth.stderr
        assert "e0" in box.sh("ip", "link", "show", "dev", "e0")
    finally:
        box.close()


def test_failed_post_up_rolls_back_without_down_hooks():
    box = Box(64)
    try:
        _, peer_pk = genkey()
        box.write_conf(f"[Interface]\nPrivateKey = {box.sk}\nAddress = 10.64.0.1/24\nPostUp = false\n"
                       f"PostDown = echo postdown %i >> {box.marker}\n\n"
                       f"[Peer]\nPublicKey = {peer_pk}\nAllowedIPs = 0.0.0.0/0\nEndpoint = 10.200.0.2:51820\n")
        up = box.meshwg("up", box.conf)
        assert up.returncode == 1 and "Traceback" not in up.stderr
        assert not box.link_exists()
        assert "meshwg-" not in box.sh("nft", "list", "tables")
        assert "lookup 51820" not in box.sh("ip", "-4", "rule")
        assert not os.path.exists(box.marker)  # like wg-quick's trap: no Down hooks on a failed up
        assert not os.path.exists(os.path.join(STATE_DIR, f"{box.iface}.json"))
    finally:
        box.close()


def test_up_passes_its_log_format_and_level_to_the_daemon():
    """`meshwg --log-format json --log-level info up` reaches meshwg-tun (before, only MESHWG_LOG_FORMAT did)."""
    box = Box(65)
    log_file = f"/tmp/{box.iface}.log"
    try:
        box.env = {**box.env, "MESHWG_LOG_FILE": log_file}
        box.env.pop("MESHWG_LOG_FORMAT", None)
        box.env.pop("LOG_LEVEL", None)
        _, peer_pk = genkey()
        box.write_conf(f"[Interface]\nPrivateKey = {box.sk}\nAddress = 10.65.0.1/24\n\n"
                       f"[Peer]\nPublicKey = {peer_pk}\nAllowedIPs = 10.65.0.2/32\nEndpoint = 10.200.0.2:51820\n")
        up = box.meshwg("--log-format", "json", "--log-level", "info", "up", box.conf)
        assert up.returncode == 0, up.stderr
        down = box.meshwg("down", box.iface)
        assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 10  # the daemon logs its info lines as it stops, after `down` returns
        lines = []
        while time.monotonic() < deadline:
            with open(log_file) if os.path.exists(log_file) else open(os.devnull) as f:
                lines = f.read().splitlines()
            if any(box.iface in ln and "drops" in ln for ln in lines):
                break
            time.sleep(0.05)
        assert lines, "the daemon wrote nothing at info"
        records = [json.loads(ln) for ln in lines]  # every line a JSON object
        assert any(r["level"] == "INFO" and box.iface in r["msg"] for r in records), records
    finally:
        box.close()
        if os.path.exists(log_file):
            os.unlink(log_file)

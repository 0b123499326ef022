"""Fast tests of the agent's pure helpers: state directory, directory entry -> PeerSpec, status text."""

from __future__ import annotations

import ipaddress
import os
import stat

from meshwg.control.client import PeerInfo
from meshwg.commands.mesh import format_status
from meshwg.io import agent_state as S
from meshwg.io.agent import EDM, EIM, peer_spec


def test_key_created_0600_and_reloaded(tmp_path):
    d = str(tmp_path / "state")
    k1 = S.load_or_create_key(d)
    path = os.path.join(d, S.KEY_FILE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert S.load_or_create_key(d) == k1 and len(k1) == 32
    os.chmod(path, 0o644)  # loosened by hand: tightened again on load
    assert S.load_or_create_key(d) == k1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_cache_round_trip_and_corrupt_cache_ignored(tmp_path):
    d = str(tmp_path)
    assert S.load_cache(d) is None
    S.save_cache(d, {"ipv4": "100.64.0.1"}, [{"key": "x"}], listen_port=4242)
    c = S.load_cache(d)
    assert c["welcome"]["ipv4"] == "100.64.0.1" and c["peers"] == [{"key": "x"}] and c["listen_port"] == 4242
    assert stat.S_IMODE(os.stat(os.path.join(d, S.CACHE_FILE)).st_mode) == 0o600
    assert not [f for f in os.listdir(d) if ".tmp" in f]
    with open(os.path.join(d, S.CACHE_FILE), "w") as f:
        f.write("{not json")
    assert S.load_cache(d) is None


def test_peer_spec_from_directory_entry():
    key = bytes(range(32))
    p = PeerInfo(key, 3, "laptop", "100.64.0.3", "fd00::3",
                 (("192.168.1.5", 4000, "local"), ("198.51.100.7", 4000, "stun-edm"), ("198.51.100.7", 5000, "observed")),
                 True)
    spec = peer_spec(p)
    assert spec.key == key and spec.name == "laptop"
    assert spec.addresses == (ipaddress.ip_network("100.64.0.3/32"), ipaddress.ip_network("fd00::3/128"))
    assert spec.candidates == (("192.168.1.5", 4000),)
    assert spec.observed == (("198.51.100.7", 4000), ("198.51.100.7", 5000))
    assert spec.nat == EDM
    p2 = PeerInfo(key, 3, "laptop", "100.64.0.3", "", (("198.51.100.7", 4000, "stun-eim"),), False)
    assert peer_spec(p2).nat == EIM and len(peer_spec(p2).addresses) == 1
    assert peer_spec(PeerInfo(key, 3, "x", "100.64.0.3", "", (), False)).nat is None


def test_status_text_names_path_and_reason():
    st = {"interface": "mesh0", "name": "a", "addresses": ["100.64.0.1/32"], "listen_port": 1,
          "control": {"connected": False}, "relay": {"mode": "udp", "latency_ms": 1.5},
          "nat": {"mapping": "endpoint-independent", "reflexive": ["198.51.100.1:1"]},
          "peers": [{"name": "b", "addresses": ["100.64.0.2/32"], "online": True, "path": "relay",
                     "relay_reason": "symmetric NAT on both sides", "endpoint": None, "latency_ms": None,
                     "last_handshake_ago": 3.2, "rx_bytes": 2048, "tx_bytes": 10},
                    {"name": "c", "addresses": ["100.64.0.3/32"], "online": False, "path": "direct",
                     "relay_reason": None, "endpoint": "198.51.100.9:5", "latency_ms": 2.5,
                     "last_handshake_ago": None, "rx_bytes": 0, "tx_bytes": 0}]}
    text = format_status(st)
    assert "DISCONNECTED" in text and "relay (symmetric NAT on both sides)" in text
    assert "direct 198.51.100.9:5, 2.50 ms" in text and "(offline)" in text and "3s ago" in text

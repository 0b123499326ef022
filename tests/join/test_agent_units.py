"""Fast tests of the agent's pure helpers: state directory, directory entry -> PeerSpec, status text.
The agent's decisions are tested on the core: tests/mesh/test_agent_core.py."""

from __future__ import annotations

import ipaddress
import os
import stat

from meshwg.control import events as CE
from meshwg.control.client import PeerInfo
from meshwg.commands.mesh import format_status
from meshwg.disco.netcheck import EDM, EIM
from meshwg.io.agent import agent_state as S
from meshwg.mesh.peer_entry import entry_policy, peer_spec

WELCOME = CE.Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                     (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))
POLICY = entry_policy(WELCOME, ("192.0.2.1:7300",))


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
    spec = peer_spec(p, POLICY)
    assert spec.key == key and spec.name == "laptop"
    assert spec.addresses == (ipaddress.ip_network("100.64.0.3/32"), ipaddress.ip_network("fd00::3/128"))
    # a STUN address is the peer's word: a candidate; only the server's observation is a birthday target
    assert spec.candidates == (("192.168.1.5", 4000), ("198.51.100.7", 4000))
    assert spec.observed == (("198.51.100.7", 5000),)
    assert spec.nat == EDM
    p2 = PeerInfo(key, 3, "laptop", "100.64.0.3", "", (("198.51.100.7", 4000, "stun-eim"),), False)
    assert peer_spec(p2, POLICY).nat == EIM and len(peer_spec(p2, POLICY).addresses) == 1
    assert peer_spec(PeerInfo(key, 3, "x", "100.64.0.3", "", (), False), POLICY).nat is None


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
    assert "routes:" not in text


def test_status_text_says_why_the_control_channel_is_down_and_which_routes_are_held_elsewhere():
    st = {"interface": "mesh0", "name": "a", "addresses": [], "listen_port": 1,
          "control": {"connected": False, "last_error": "server could not open the handshake", "error_kind": "suspect",
                      "retry_in": 41.6},
          "relay": {"mode": "udp"}, "nat": {"mapping": None, "reflexive": []},
          "routes": {"conflicting": ["100.64.0.2/32"]}, "peers": []}
    text = format_status(st)
    assert "DISCONNECTED (tunnels keep running): server could not open the handshake" in text
    assert "check the server's address and database" in text and "retrying in 42 s" in text
    assert "100.64.0.2/32 routed through another interface" in text


def test_status_counters_only_with_detail(monkeypatch, capsys):
    """`meshwg status -d` adds every counter (text and --json); without it neither output has them."""
    import json

    from meshwg import cli
    from meshwg.commands import mesh

    st = {"interface": "mesh0", "name": "a", "addresses": [], "listen_port": 1, "control": {"connected": True},
          "relay": {"mode": "udp"}, "nat": {"mapping": None, "reflexive": []}, "peers": [],
          "drops": {"birthday.drop_send_error": 1},
          "counters": {"birthday.drop_send_error": 1, "relay.send_hello_udp": 3}}
    monkeypatch.setattr(mesh, "_query", lambda args, req: json.loads(json.dumps(st)))
    outputs = {}
    for argv in (["status"], ["status", "-d"], ["status", "--json"], ["status", "-d", "--json"]):
        args = cli.build_parser().parse_args(argv)
        assert args.run(args) == 0
        outputs[" ".join(argv)] = capsys.readouterr().out
    assert "counters" not in outputs["status"] and "relay.send_hello_udp" not in outputs["status"]
    assert "  counters:\n    birthday.drop_send_error 1\n    relay.send_hello_udp 3" in outputs["status -d"]
    assert json.loads(outputs["status --json"]) == {k: v for k, v in st.items() if k != "counters"}
    assert json.loads(outputs["status -d --json"]) == st


def test_status_addresses_bracket_ipv6():
    from meshwg.io.agent.agent import _fmt_addr
    from meshwg.io.agent.relay_shell import RelayShell

    assert _fmt_addr(("2001:db8::5", 4000)) == "[2001:db8::5]:4000"
    assert _fmt_addr(("198.51.100.7", 4000)) == "198.51.100.7:4000"
    assert _fmt_addr(None) is None and _fmt_addr("relay") is None
    relay = RelayShell(bytes(32), udp_send=None, deliver=None, after_rx=None)
    relay.udp_addrs, relay.tcp_addrs = (("fd00::1", 3478), ("192.0.2.1", 3478)), (("fd00::1", 443),)
    relay.observed = ("2001:db8::5", 4000)
    st = relay.status()
    assert st["udp"] == ["[fd00::1]:3478", "192.0.2.1:3478"] and st["tcp"] == ["[fd00::1]:443"]
    assert st["observed"] == "[2001:db8::5]:4000"


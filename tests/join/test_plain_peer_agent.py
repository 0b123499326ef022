"""Plain WireGuard peers (issue 12) at the node's edges: the control client's directory entries carry a kind
("node" or "plain"; others are dropped and counted), the netmap cache keeps it, the relay shell delivers the
relay's RECVs from PLAIN_SOURCE and sends to a plain peer's key as to any key, and `meshwg status` shows the
plain peer as such."""

from __future__ import annotations

import base64
import os
import time

import trio

from meshwg.commands.mesh import format_status
from meshwg.control.client import ControlConnection, _peer_untrusted
from meshwg.control.events import PeerChanged, PeerInfo
from meshwg.io.agent.agent import _peer_from_json, _peer_to_json, _peers_from_json
from meshwg.io.agent.relay_shell import RelayShell
from meshwg.signaling import protocol as P
from meshwg.signaling import relay_wire as W
from meshwg.wg import crypto
from signal_server.relay import RelayCore

KEY = bytes(range(32))
ENTRY = {"key": KEY, "id": 9, "name": "phone", "ipv4": "100.64.0.50", "ipv6": "fd00::50", "cand": [], "online": False}


def test_entries_carry_their_kind_and_old_servers_send_nodes():
    assert _peer_untrusted(P.pack_entry(ENTRY)).kind == "node"          # no kind: a server before issue 12
    assert _peer_untrusted(P.pack_entry(dict(ENTRY, kind="node"))).kind == "node"
    plain = _peer_untrusted(P.pack_entry(dict(ENTRY, kind="plain")))
    assert plain == PeerInfo(KEY, 9, "phone", "100.64.0.50", "fd00::50", (), False, "plain")


def test_an_entry_of_unknown_kind_is_dropped_and_counted():
    for kind in ("gateway", "", 1, None, ["plain"], {"plain": 1}, b"plain"):
        assert _peer_untrusted(P.pack_entry(dict(ENTRY, kind=kind))) is None, kind
    conn = ControlConnection.__new__(ControlConnection)
    conn.drops, conn._full = 0, None
    other = dict(ENTRY, key=bytes(32 * [7]), name="b")
    events = conn._apply({"type": P.T_DIR_UPDATE, "upsert": [P.pack_entry(dict(ENTRY, kind="exit")),
                                                             P.pack_entry(other)]})
    assert [e.peer.name for e in events if isinstance(e, PeerChanged)] == ["b"] and conn.drops == 1


def test_the_cache_keeps_the_kind_and_reads_old_caches_as_nodes():
    plain = PeerInfo(KEY, 9, "phone", "100.64.0.50", "fd00::50", (), False, "plain")
    node = PeerInfo(bytes(32 * [7]), 3, "b", "100.64.0.3", "", (("198.51.100.3", 4000, "stun"),), True)
    for p in (plain, node):
        assert _peer_from_json(_peer_to_json(p)) == p
    old = {"key": base64.b64encode(KEY).decode(), "id": 9, "name": "x", "ipv4": "100.64.0.9", "ipv6": "",
           "candidates": [], "online": True}                           # written before kinds existed
    assert _peer_from_json(old).kind == "node"
    assert _peers_from_json([old, dict(old, kind="exit"), _peer_to_json(plain)]) == (_peer_from_json(old), plain)


def test_status_text_shows_a_plain_peer_as_such():
    st = {"interface": "mesh0", "name": "home", "addresses": ["100.64.0.1/32"], "listen_port": 1,
          "control": {"connected": True}, "relay": {"mode": "udp"}, "nat": {"mapping": None, "reflexive": []},
          "peers": [{"name": "phone", "addresses": ["100.64.0.50/32"], "online": False, "path": "relay",
                     "relay_reason": "plain WireGuard peer", "endpoint": None, "latency_ms": None, "plain": True,
                     "last_handshake_ago": 2.0, "rx_bytes": 10, "tx_bytes": 10}]}
    text = format_status(st)
    assert "path: plain (relay)" in text and "(offline)" not in text   # a phone is never "online" at the server


SERVER_SK = bytes(range(100, 132))
SERVER_PK = crypto.dh_pub(crypto.clamp(SERVER_SK))
SERVER_ADDR = ("203.0.113.10", 3478)
NODE_SK = bytes(range(1, 33))
NODE_ADDR = ("198.51.100.1", 1000)


async def test_the_relay_shell_delivers_plain_datagrams_and_sends_to_a_plain_key(autojump_clock):
    relay = RelayCore(SERVER_SK, os.urandom)
    relay.set_allowed([crypto.dh_pub(crypto.clamp(NODE_SK))])
    out: list[bytes] = []
    delivered: list = []
    shell = RelayShell(NODE_SK, udp_send=lambda data, dst: out.append(data) or True,
                       deliver=lambda src, pkt: delivered.append((src, pkt)), after_rx=None, clock=trio.current_time)
    shell.configure(SERVER_PK, [SERVER_ADDR], [])
    now = trio.current_time()
    for frame, _ in relay.handle_untrusted(out.pop(), NODE_ADDR, now, time.time()):
        shell.handle_udp(frame, SERVER_ADDR, now)                       # HELLO_OK: the UDP session is ready
    assert shell.ready(now)
    init = (1).to_bytes(4, "little") + bytes(144)                       # what a phone's initiation looks like
    shell.handle_udp(W.encode_recv(W.PLAIN_SOURCE, init), SERVER_ADDR, now)
    assert delivered == [(W.PLAIN_SOURCE, init)] and shell.counters["recv_udp"] == 1
    out.clear()
    phone = bytes(32 * [5])
    shell.send(phone, b"response")
    assert len(out) == 1 and W.parse_send_untrusted(out[0])[1:] == (phone, b"response")
    assert shell.tx_by_peer[phone] == 1

"""`meshwg ping` in the agent core (UserPing -> PingSent / PingRefused) on explicit time: the peer found by name, mesh
IP or key, the pings it sends, and the one-line refusals."""

from __future__ import annotations

import base64
import dataclasses
import math

from meshwg.control.events import Connected
from meshwg.disco import user_ping as UP
from meshwg.mesh import agent_core as A
from meshwg.mesh.node import RelayEndpoint
from test_agent_core import WELCOME, key, new_core, of, peer, reset


def core_with_peers():
    core = new_core()
    plain = dataclasses.replace(peer(3, port=None), kind="plain")
    core.apply([Connected(WELCOME), reset(peer(1), peer(2), plain)], 0.0)
    core.node.datagrams_to_send()
    return core


def test_peer_by_name_mesh_ip_or_key():
    core = core_with_peers()
    for ref, text in enumerate(["p1", "100.64.0.1", "fd00::1", "fd00:0::1", base64.b64encode(key(1)).decode()]):
        out = core.apply([A.UserPing(ref, text, 5.0)], 1.0)
        assert of(out, A.PingSent) == [A.PingSent(ref, key(1), "p1", "100.64.0.1", 2)], text
        dests = [d for _, d in core.node.datagrams_to_send() if d != ("192.0.2.1", 3478)]   # not the STUN request
        assert dests == [("198.51.100.1", 4000), RelayEndpoint(key(1))]
        core.node.handle_timer(7.0)   # timed out: room for the next


def test_one_line_refusals():
    core = core_with_peers()
    cases = {"nobody": "no peer named or addressed 'nobody'", "100.64.0.99": "no peer named or addressed",
             "me": "me is this node", "100.64.0.7": "is this node", "p3": "plain WireGuard peer"}
    for ref, (text, why) in enumerate(cases.items()):
        [refused] = core.apply([A.UserPing(ref, text, 5.0)], 1.0)
        assert isinstance(refused, A.PingRefused) and refused.ref == ref and why in refused.reason, refused
    for bad in (0.0, -1.0, 10.5, math.nan, math.inf):
        [refused] = core.apply([A.UserPing(9, "p1", bad)], 1.0)
        assert isinstance(refused, A.PingRefused) and "timeout" in refused.reason
    assert [d for _, d in core.node.datagrams_to_send() if d != ("192.0.2.1", 3478)] == []


def test_at_most_eight_pings_in_flight_then_refused_until_one_ends():
    core = core_with_peers()
    for ref in range(8):
        assert of(core.apply([A.UserPing(ref, "p2", 2.0)], 1.0), A.PingSent)
    [refused] = core.apply([A.UserPing(8, "p2", 2.0)], 1.0)
    assert isinstance(refused, A.PingRefused) and "too many pings" in refused.reason
    core.node.handle_timer(3.0)
    events = [e for e in core.node.pop_events() if isinstance(e, UP.UserPingDone)]
    assert len(events) == 8 and all(e.path is None for e in events)
    assert of(core.apply([A.UserPing(8, "p2", 2.0)], 3.0), A.PingSent)

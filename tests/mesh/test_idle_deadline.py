"""Issue 15, idle cost: the agent core's next deadline (meshwg/mesh/agent_core.py next_deadline, the punch policy's
in meshwg/mesh/punch_policy.py) on explicit time. An idle node has nothing due; every duty the old 0.1 s tick served
still happens within its bound when the core is ticked only at its deadlines (and on the device's news).

Bounds (literals, from the punch policy's documentation): a relayed peer that gets traffic is asked for within
0.1 s; asked again every 30 s while it stays active and relayed; a pending request waits for the connection."""

from __future__ import annotations

import math
import random

from nacl.public import PrivateKey

from meshwg.control.events import Connected, DirectoryReset, Disconnected, PeerChanged, PeerInfo, Welcome
from meshwg.mesh import agent_core as A
from meshwg.mesh import punch_policy as PP
from meshwg.mesh.node import MeshNode, PeerActive
from meshwg.wg.device import WireGuardCore
from mesh_sim import Sim, ipv4_packet

WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def peer(n: int, port: int | None = None) -> PeerInfo:
    cands = () if port is None else ((f"198.51.100.{n}", port, "stun-eim"),)
    return PeerInfo(key(n), n, f"p{n}", f"100.64.0.{n}", f"fd00::{n}", cands, True)


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb))


def traffic_to(core: A.AgentCore, n: int, now: float) -> list:
    """An IP packet from the TUN to peer n (through the relay); the node's events."""
    core.node.send_ip_packet(ipv4_packet("100.64.0.7", f"100.64.0.{n}"), now)
    core.node.datagrams_to_send()
    return core.node.pop_events()


def run_until(core: A.AgentCore, start: float, end: float) -> list[tuple[float, list]]:
    """Tick the core only at its own deadlines (as the shell does, at most every 0.1 s) from start to end:
    [(when, punch keys)] of every tick."""
    ticks, now = [], start
    while True:
        due = max(core.next_deadline(now), now if not ticks else ticks[-1][0] + 0.1)
        if due > end:
            return ticks
        now = due
        acts = core.apply([A.Tick()], now)
        ticks.append((now, [a.key for a in acts if isinstance(a, A.RequestPunch)]))


def connected(*peers: PeerInfo) -> A.AgentCore:
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({p.key: p for p in peers})], 0.0)
    core.apply([A.Tick()], 0.0)   # what the join itself left to do (the first cache write, ...)
    return core


# ---- idle: no deadline ----------------------------------------------------------------------------
def test_an_idle_core_with_peers_and_nothing_pending_has_no_deadline_within_10_s():
    core = connected(peer(1), peer(2), peer(3), peer(4))
    assert core.next_deadline(1.0) == math.inf
    assert run_until(core, 1.0, 600.0) == []


def test_an_idle_core_whose_peers_went_direct_has_no_deadline_within_10_s():
    sim = Sim()
    a = sim.add_host("a", lan_ip="10.0.0.1", mesh_ip="100.64.0.1")
    sim.add_host("b", lan_ip="10.0.0.2", mesh_ip="100.64.0.2")
    sim.join_all()
    core = A.AgentCore(a.node)
    core.connected = True                                   # the sim hands the node its netmap itself
    sim.ping_stream("a", "b", 1.0, 5.0, every=0.1)
    sim.run(10.0)
    assert sim.is_direct("a", "b")
    run_until(core, sim.now, sim.now)                       # the activity seen
    sim.run(sim.now + 60.0)                                 # no traffic since 5 s: idle
    ticks = run_until(core, sim.now, sim.now + 10.0)
    assert len(ticks) <= 1 and not any(k for _, k in ticks)  # at most the idle moment recorded, then nothing
    assert core.next_deadline(sim.now + 10.0) > sim.now + 10.0


# ---- the duties the old tick served, within their bounds ------------------------------------------
def test_a_relayed_peer_that_gets_traffic_is_asked_for_at_once_then_every_30_s_while_active():
    core = connected(peer(1))
    events = traffic_to(core, 1, 5.0)
    assert PeerActive(key(1)) in events                     # the node's news: the shell ticks now
    assert core.next_deadline(5.0) <= 5.0 + 0.1
    assert run_until(core, 5.0, 5.1)[0] == (5.0, [key(1)])
    assert not any(k for _, k in run_until(core, 5.1, 20.0))
    for t in range(20, 70, 10):                             # traffic every 10 s: active and relayed
        traffic_to(core, 1, float(t))
    asks = [t for t, keys in run_until(core, 20.0, 69.0) if keys]
    assert asks and 35.0 <= asks[0] <= 35.0 + 0.1           # 30 s after the first request, no later


def test_a_peer_that_went_idle_and_gets_traffic_again_is_asked_for_again():
    core = connected(peer(1))
    traffic_to(core, 1, 5.0)
    assert run_until(core, 5.0, 5.1)[0][1] == [key(1)]
    run_until(core, 5.1, 100.0)                             # idle from 50 s: its end is recorded at its deadline
    assert PeerActive(key(1)) in traffic_to(core, 1, 100.0)
    ticks = run_until(core, 100.0, 100.1)
    assert ticks and ticks[0][1] == [key(1)]


def test_a_pending_request_waits_for_the_connection_and_goes_at_once_on_it():
    core = connected(peer(1))
    core.apply([Disconnected("broken"), PeerChanged(peer(1, port=4000))], 1.0)
    assert run_until(core, 1.0, 1.9) == []                  # nothing to do while disconnected
    core.apply([Connected(WELCOME)], 2.0)
    assert core.next_deadline(2.0) <= 2.0
    assert run_until(core, 2.0, 2.1)[0][1] == [key(1)]
    assert core.next_deadline(2.1) == math.inf


def test_a_deferred_cache_write_is_a_deadline():
    core = connected(peer(1))                               # the cache was written at 0 s: the next 2 s later
    core.apply([PeerChanged(peer(2))], 0.5)                 # a change within those 2 s: deferred
    assert core.next_deadline(0.6) == 2.0
    assert len([a for a in core.apply([A.Tick()], 2.0) if isinstance(a, A.WriteCache)]) == 1
    assert core.next_deadline(2.1) == math.inf


# ---- the punch policy alone -----------------------------------------------------------------------
def test_the_policy_has_no_deadline_for_idle_or_direct_peers_and_one_for_a_budget_refusal():
    pol = PP.PunchPolicy(rate=1.0)
    online = lambda k: True  # noqa: E731
    idle = {key(1): PP.PathState(False, False), key(2): PP.PathState(False, True)}
    assert pol.next_deadline(0.0, True, idle, online) == math.inf
    direct = {key(1): PP.PathState(True, True, 45.0)}
    assert pol.next_deadline(0.0, True, direct, online) == 0.0      # newly active: recorded at once
    pol.tick(0.0, True, direct, online)
    assert pol.next_deadline(0.0, True, direct, online) == 45.0     # then only its idle moment
    two = {key(3): PP.PathState(True, False, 45.0), key(4): PP.PathState(True, False, 45.0)}
    assert len(pol.tick(1.0, True, two, online)) == 1                # one token a second: the other waits
    assert pol.next_deadline(1.0, True, two, online) == 2.0
    assert len(pol.tick(2.0, True, two, online)) == 1

"""A pending WireGuard initiation is re-sent as soon as the peer's path proves usable, not at the 5 s retry.

The case from the server-restart scenario: a new node pings an old one that has not reconnected to the
signaling server yet (it does not know the new node, the relay has no session for it), so the first
initiations are lost. When the old node comes back, the handshake must follow within a relay round trip.
"""

import random

from mesh_sim import Sim, ipv4_packet

from meshwg.mesh.node import PathChanged, RelayEndpoint
from meshwg.wg.device import HANDSHAKE_RESEND_MIN, WireGuardCore


def handshake_times(h):
    return [t for t, e in h.events if type(e).__name__ == "HandshakeCompleted"]


def lab(kind_e="port-restricted", kind_c="symmetric"):
    """e knows c; c does not know e yet (it is offline from the server's point of view)."""
    sim = Sim(seed=7)
    sim.add_nat("ne", "203.0.113.5", kind_e)
    sim.add_nat("nc", "203.0.113.3", kind_c)
    e = sim.add_host("e", lan_ip="192.168.5.2", nat="ne", mesh_ip="100.64.0.5")
    c = sim.add_host("c", lan_ip="192.168.3.2", nat="nc", mesh_ip="100.64.0.3")
    nm = sim.netmap()
    for h in (e, c):
        h.node.set_local_nat(nm[h.node.public_key].nat)
    e.node.apply_netmap(nm, sim.now)
    c.node.apply_netmap({c.node.public_key: nm[c.node.public_key]}, sim.now)
    sim.flush()
    return sim, e, c, nm


def c_comes_back(sim, e, c, nm, *, punch_e=True, punch_c=True):
    c.node.apply_netmap(nm, sim.now)
    if punch_c:
        c.node.punch(e.node.public_key, sim.now)      # the server's punch notice, to both sides
    if punch_e:
        e.node.punch(c.node.public_key, sim.now)
    sim.flush()


def test_punch_notice_resends_the_lost_initiation_at_once():
    sim, e, c, nm = lab()
    sim.ping_stream("e", "c", 1.0, 20.0, every=0.5)
    sim.run(2.0)
    assert handshake_times(e) == []                   # c drops what it cannot authenticate
    sim.at(2.0, lambda: c_comes_back(sim, e, c, nm))
    sim.run(4.0)
    done = handshake_times(e)
    # One relay round trip (2 x 40 ms), not the retransmit timer (first initiation at 1.0 + 5 s).
    assert done and done[0] - 2.0 < 0.2, done
    assert sim.delivered("c") >= 3


def test_relayed_call_me_maybe_alone_resends():
    """Without a punch notice on e's side: c's call-me-maybe over the relay proves the path."""
    sim, e, c, nm = lab()
    sim.ping_stream("e", "c", 1.0, 20.0, every=0.5)
    sim.run(2.0)
    sim.at(2.0, lambda: c_comes_back(sim, e, c, nm, punch_e=False))
    sim.run(4.0)
    done = handshake_times(e)
    assert done and done[0] - 2.0 < 0.2, done
    assert e.node.counters["resend_handshake_on_path"] >= 1


def test_direct_path_confirmed_resends_on_the_new_path():
    """Port-restricted cones: the pong that makes the direct path also re-sends the initiation there."""
    sim, e, c, nm = lab(kind_c="port-restricted")
    sim.relay_up = False                             # nothing but the direct path can carry it
    sim.ping_stream("e", "c", 1.0, 20.0, every=0.5)
    sim.run(2.0)
    sim.at(2.0, lambda: c_comes_back(sim, e, c, nm))
    sim.run(4.0)
    direct = [t for t, ev in e.events if isinstance(ev, PathChanged) and not isinstance(ev.endpoint, RelayEndpoint)]
    done = handshake_times(e)
    assert direct and done and done[0] - direct[0] < HANDSHAKE_RESEND_MIN + 0.1, (direct, done)


def test_no_resend_without_a_pending_initiation_and_no_storm():
    """Established sessions are left alone; re-sends keep HANDSHAKE_RESEND_MIN apart, do not count
    as timer attempts, and news arriving too soon is served once, when the floor allows."""
    sim, e, c, nm = lab()
    sim.ping_stream("e", "c", 1.0, 60.0, every=0.5)
    sim.at(2.0, lambda: c_comes_back(sim, e, c, nm))
    sim.run(10.0)
    n = len(handshake_times(e)) + len(handshake_times(c))
    for k in range(20):                                # punch notices galore on an established session
        sim.at(10.0 + k * 0.01, lambda: (e.node.punch(c.node.public_key, sim.now), sim.flush()))
    sim.run(12.0)
    assert len(handshake_times(e)) + len(handshake_times(c)) == n

    core = WireGuardCore(private_key=bytes(range(1, 33)), random_bytes=random.Random(1).randbytes)
    peer = core.add_peer(bytes(32 * [9]))
    core.set_endpoint(peer, ("192.0.2.1", 51820))
    assert core.resend_handshake(peer, 1.0) is None    # nothing pending
    core.send_ip_packet(ipv4_packet("100.64.0.1", "100.64.0.2"), 1.0)
    core.set_allowed_ips(peer, ["100.64.0.2/32"])
    core.send_ip_packet(ipv4_packet("100.64.0.1", "100.64.0.2"), 1.0)
    assert len([d for d, _ in core.datagrams_to_send() if d[0] == 1]) == 1
    # Too soon: nothing sent, told when it may be.
    assert core.resend_handshake(peer, 1.1) == 1.0 + HANDSHAKE_RESEND_MIN
    assert core.datagrams_to_send() == []
    assert core.resend_handshake(peer, 1.3) == 1.3
    assert len([d for d, _ in core.datagrams_to_send() if d[0] == 1]) == 1
    assert peer.timers.handshake_attempts == 0
    assert peer.timers.retransmit_handshake >= 1.3 + 5.0  # re-armed from the re-send
    assert core.resend_handshake(peer, 1.4) == 1.3 + HANDSHAKE_RESEND_MIN


def test_a_deferred_resend_announces_its_deadline():
    """A re-send held back by the rate floor is due in < 1 s: the node tells its driver (which
    otherwise re-reads the timer only every second) through on_earlier_deadline."""
    sim, e, c, nm = lab()
    calls = []
    e.node.on_earlier_deadline = calls.append
    sim.ping_stream("e", "c", 1.0, 3.0, every=0.5)
    sim.run(1.5)                                   # e's initiation is pending: c drops it
    key = c.node.public_key
    t = sim.now
    e.node.punch(key, t)                           # re-sent at once (the floor allows it)
    e.node.punch(key, t + 0.01)                    # too soon: deferred to the floor
    assert len(calls) == 1 and t < calls[0] <= t + HANDSHAKE_RESEND_MIN
    assert e.node.get_timer() <= calls[0]

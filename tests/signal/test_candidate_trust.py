"""Issue 10 item 4, the server's half: a node's word about its candidates is filtered, "observed" is the
server's alone and keeps its slot in the entry."""

from __future__ import annotations

import os
import time

import trio

from meshwg.control import ControlClient, ControlConnection
from meshwg.signaling import protocol as P
from meshwg.signaling import relay_wire as W
from meshwg.control.relay_client import RelaySession
from meshwg.io.agent.relay_shell import RelayShell
from meshwg.wg.crypto import clamp, dh_pub
from signal_server.directory import Directory, Node
from signal_server.relay import RelayCore

from follow import follow
from sig_helpers import harness, new_key, wait_until  # noqa: F401 (fixture)

KEY = b"\x01" * 32
HOSTILE = [("203.0.113.9", 53, "observed"),      # the server's kind: a node may not claim it
           ("127.0.0.1", 53, "stun-edm"),        # loopback: every peer would ping its own host
           ("0.0.0.0", 53, "local"), ("224.0.0.251", 5353, "local"), ("255.255.255.255", 9, "local"),
           ("ff02::1", 9, "local"),
           ("100.64.0.9", 4000, "local"),        # inside the mesh prefix
           ("fd00::9", 4000, "stun"),
           ("198.51.100.8", 4000, "bogus-kind")]
HONEST = [("198.51.100.7", 4000, "stun-edm"), ("192.168.1.5", 4000, "local")]


def _directory() -> Directory:
    d = Directory(mesh_nets=("100.64.0.0/10", "fd00::/48"))
    d.put(Node(1, KEY, "n", "100.64.0.1", "fd00::1"))
    return d


def test_reported_candidates_keep_only_allowed_kinds_and_reachable_addresses():
    d = _directory()
    kept, refused = d.reported(HOSTILE + HONEST)
    assert kept == HONEST and refused == 9


def test_node_reported_observed_is_ignored_and_the_servers_own_kept():
    d = _directory()
    d.update(KEY, candidates=d.reported([("203.0.113.9", 53, "observed")] + HONEST)[0])
    assert d.set_observed(KEY, ("198.51.100.7", 5000))
    cand = P.unpack_entry_untrusted(d.nodes[KEY].packed())["cand"]
    assert [c for c in cand if c[2] == "observed"] == [["198.51.100.7", 5000, "observed"]]
    assert ["203.0.113.9", 53, "observed"] not in cand
    # the server's own observation is filtered too (no mesh, multicast, unspecified address)
    for bad in (("100.64.0.3", 5), ("224.0.0.1", 5), ("0.0.0.0", 5)):
        assert not d.set_observed(KEY, bad)
    assert d.set_observed(KEY, ("2001:db8::7", 6000, 0, 0))   # an IPv6 socket address
    assert d.nodes[KEY].entry()["cand"][0] == ["2001:db8::7", 6000, "observed"]


def test_a_full_candidate_list_cannot_push_the_observation_out():
    d = _directory()
    many = [(f"198.51.100.{i}", 4000, "stun") for i in range(1, 17)]
    d.update(KEY, candidates=d.reported(many)[0])
    d.set_observed(KEY, ("198.51.100.200", 5000))
    cand = d.nodes[KEY].entry()["cand"]
    assert ["198.51.100.200", 5000, "observed"] in cand
    assert len(cand) == 16 and P.candidates_untrusted(cand) is not None   # nodes refuse longer lists


async def test_server_drops_hostile_candidates_at_registration_and_later(harness, nursery):
    inv = harness.invite(reusable=True)
    in_mesh6 = (str(harness.server.prefix6[9]), 4000, "stun")   # the test's fd00::9 is outside this one
    hostile = [in_mesh6 if c[0] == "fd00::9" else c for c in HOSTILE]
    evil = ControlClient(inv, new_key(), name="evil", candidates=hostile + HONEST[:1])
    honest = ControlClient(inv, new_key(), name="honest")
    for c in (evil, honest):
        await nursery.start(c.run)
    seen = follow(nursery, honest).directory
    await wait_until(lambda: evil.public_key in seen and seen[evil.public_key].online)
    await wait_until(lambda: seen[evil.public_key].candidates == (HONEST[0],))
    counters = harness.server.counters
    assert counters["control_candidates_refused"] == 9

    await evil.report_candidates(HONEST[1:] + hostile)
    await wait_until(lambda: seen[evil.public_key].candidates == (HONEST[1],))
    assert counters["control_candidates_refused"] == 18

    # the relay's observation reaches the directory through the server's own path only
    harness.server.relay.observed_events.append((evil.public_key, ("198.51.100.66", 40000)))
    harness.server._publish_observed()
    await wait_until(lambda: seen[evil.public_key].candidates
                     == (("198.51.100.66", 40000, "observed"), HONEST[1]))


# --- the relay's observation: only an address the node proved it receives at (hostile review, finding A)

SERVER_SK = bytes(range(100, 132))
NODE_SK = bytes(range(1, 33))
REAL_SRC = (0, ("198.51.100.1", 4000))
VICTIM_SRC = (0, ("203.0.113.9", 53))
WALL0 = 1_700_000_000.0


def _relay_and_node():
    core = RelayCore(SERVER_SK, os.urandom)
    rs = RelaySession(NODE_SK, dh_pub(clamp(SERVER_SK)), os.urandom)
    pk = dh_pub(clamp(NODE_SK))
    core.set_allowed({pk})
    return core, rs, pk


def _udp(core, frame, src, now, wall=None):
    return core.handle_untrusted(frame, src, now, WALL0 + now if wall is None else wall, observed=src[1])


def test_a_hello_with_a_spoofed_source_publishes_nothing():
    """A registered node sends its own valid HELLO with the victim's address as source: the HELLO_OK goes to
    the victim, and nothing is published until a SEND under the new token comes from there (which the node
    cannot send: it never saw the token). Old code: the victim became the node's "observed" address."""
    core, rs, pk = _relay_and_node()
    [(_, dest)] = _udp(core, rs.hello(0.0, WALL0), VICTIM_SRC, 0.0)
    assert dest == VICTIM_SRC
    assert core.pop_observed() == []
    # SENDs without the token, from the victim's address and from the node's own: still nothing
    for src in (VICTIM_SRC, REAL_SRC):
        _udp(core, W.encode_send(os.urandom(8), W.CONFIRM_DST, b""), src, 0.1)
    assert core.pop_observed() == []
    # the node's own HELLO from its own address, then the confirmation: published, once
    [(ok, _)] = _udp(core, rs.hello(1.0, WALL0 + 1), REAL_SRC, 1.0)
    assert rs.handle_untrusted(ok, 1.0) == ("ready", REAL_SRC[1])
    assert core.pop_observed() == []
    assert _udp(core, rs.confirm(), REAL_SRC, 1.1) == []       # forwarded nowhere
    assert core.pop_observed() == [(pk, REAL_SRC[1])]
    # the token works from its HELLO's source only, so a later HELLO from the victim's address still needs
    # its own confirmation; more SENDs under a confirmed token publish nothing again
    _udp(core, rs.confirm(), REAL_SRC, 1.2)
    assert core.pop_observed() == []


def test_the_relay_shell_confirms_at_once():
    """The node's shell sends the confirmation right after HELLO_OK, so the observation is published without
    waiting for relayed traffic (a node with none would otherwise never have one)."""
    core, _, pk = _relay_and_node()
    wire = []
    shell = RelayShell(NODE_SK, udp_send=lambda data, dst: wire.append(data) or True,
                       deliver=lambda *_: None, after_rx=None, clock=lambda: 5.0)
    shell.configure(dh_pub(clamp(SERVER_SK)), [("203.0.113.10", 3478)], [])
    while wire:
        for frame, _ in _udp(core, wire.pop(0), REAL_SRC, 5.0, time.time()):  # the shell stamps time.time()
            shell.handle_udp(frame, ("203.0.113.10", 3478), 5.0)
    assert shell.ready(5.0)
    assert core.pop_observed() == [(pk, REAL_SRC[1])]


async def test_server_publishes_no_spoofed_observation(harness):
    """Through the server: a HELLO arriving with a victim's address as source (a loopback socket of the test
    stands in for the victim) is answered there, and the directory gets no observed candidate; the node's
    real socket with the confirmation gets one."""
    sk = new_key()
    conn = await ControlConnection.open(harness.invite(), sk)
    pk = dh_pub(clamp(sk))
    rs = RelaySession(sk, harness.server.server_pk, os.urandom)
    victim = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    node = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    try:
        await victim.bind(("127.0.0.1", 0))
        await node.bind(("127.0.0.1", 0))
        spoofed = victim.getsockname()[:2]

        def observed():
            return [c for c in harness.server.directory.nodes[pk].entry()["cand"] if c[2] == "observed"]

        harness.server._on_udp(0, rs.hello(time.monotonic(), time.time()), spoofed, time.monotonic(), time.time())
        harness.server._publish_observed()
        with trio.fail_after(3):
            data, _ = await victim.recvfrom(2048)
        assert W.frame_type_untrusted(data) == W.T_HELLO_OK     # the victim got the answer, not the node
        assert observed() == []

        await node.sendto(rs.hello(time.monotonic(), time.time()), harness.udp)
        with trio.fail_after(3):
            while rs.handle_untrusted((await node.recvfrom(2048))[0], time.monotonic()) is None:
                pass
        await trio.sleep(0.2)
        assert observed() == []                                   # not before the confirmation
        await node.sendto(rs.confirm(), harness.udp)
        await wait_until(lambda: observed() == [["127.0.0.1", node.getsockname()[1], "observed"]])
    finally:
        victim.close()
        node.close()
        await conn.aclose()

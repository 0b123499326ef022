"""Issue 10 item 4, the server's half: a node's word about its candidates is filtered, "observed" is the
server's alone and keeps its slot in the entry."""

from __future__ import annotations

from meshwg.control import ControlClient
from meshwg.control import protocol as P
from signal_server.directory import Directory, Node

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
    await wait_until(lambda: evil.public_key in honest.directory and honest.directory[evil.public_key].online)
    await wait_until(lambda: honest.directory[evil.public_key].candidates == (HONEST[0],))
    counters = harness.server.counters
    assert counters["control_candidates_refused"] == 9

    await evil.report_candidates(HONEST[1:] + hostile)
    await wait_until(lambda: honest.directory[evil.public_key].candidates == (HONEST[1],))
    assert counters["control_candidates_refused"] == 18

    # the relay's observation reaches the directory through the server's own path only
    harness.server.relay.observed_events.append((evil.public_key, ("198.51.100.66", 40000)))
    harness.server._publish_observed()
    await wait_until(lambda: honest.directory[evil.public_key].candidates
                     == (("198.51.100.66", 40000, "observed"), HONEST[1]))

"""The "public" candidate (issue 12, `plain add --direct`): where a node is reachable from anywhere with no punch.
It comes from a port forward the user gives (`meshwg join/set --public-endpoint IP:PORT`, saved with the routing
choice) or, with none given, from netcheck: endpoint-independent mapping and filtering (a full-cone NAT, or no NAT)
make the reflexive address public. It is reported next to the same address's other kinds, so a server or node
that does not know the kind drops that one entry and keeps the rest (checked here against the old kind lists)."""

from __future__ import annotations

import collections
import random

import pytest

from meshwg.control.events import Connected, PeerInfo, Welcome
from meshwg.disco import netcheck as NC
from meshwg.mesh import agent_core as A
from meshwg.mesh import peer_entry
from meshwg.mesh import routing as RT
from meshwg.mesh.node import MeshNode
from meshwg.mesh.punch_policy import local_candidates, public_candidates
from meshwg.signaling import protocol as P
from meshwg.wg.device import WireGuardCore
from signal_server import directory as D

STUN = ("192.0.2.1", 3478)
WELCOME = Welcome(1, "home", "100.64.0.1", "fd00::1", "100.64.0.0/10", "fd00::/48", (STUN,), (STUN,),
                  (("192.0.2.1", 7301),), 10.0, bytes(32))
REFL = ("198.51.100.5", 41641)
REFL6 = ("2001:db8::5", 41641)
LAN = ("192.168.1.2", 41641)
OLD_KINDS = frozenset({"local", "stun", "stun-eim", "stun-edm"})   # what servers and nodes before "public" accept


def rng(seed):
    r = random.Random(seed)
    return lambda n: r.getrandbits(8 * n).to_bytes(n, "big")


def agent():
    rb = rng(3)
    sk = bytes([7]) * 32
    core = A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), ("192.0.2.1:7300",))
    out = core.apply([Connected(WELCOME), A.LocalAddresses(("192.168.1.2",), 41641)], 0.0)
    core.apply([A.CandidatesAccepted(tuple(reported(out)[-1]))], 0.0)   # the first report went through
    return core


def reported(actions) -> list:
    return [list(a.candidates) for a in actions if isinstance(a, A.ReportCandidates)]


# ---- the pure choice ----------------------------------------------------------------------------------
def test_public_candidates_come_first_and_the_address_keeps_its_other_kind():
    cands = local_candidates([REFL], [LAN], NC.EIM, public=[REFL])
    assert cands == [(*REFL, "public"), (*REFL, "stun-eim"), (*LAN, "local")]
    assert local_candidates([REFL], [LAN], NC.EIM) == [(*REFL, "stun-eim"), (*LAN, "local")]
    # a long list never pushes the public one out
    many = [(f"10.0.0.{i}", 1000) for i in range(1, 30)]
    assert local_candidates([REFL], many, NC.EIM, public=[("203.0.113.9", 51820)])[0] == ("203.0.113.9", 51820,
                                                                                          "public")


def test_the_port_forward_wins_else_only_an_open_nat_makes_the_reflexive_address_public():
    fwd = ("203.0.113.9", 51820)
    assert public_candidates(fwd, None, [REFL]) == [fwd]
    assert public_candidates(fwd, 4, [REFL]) == [fwd]
    assert public_candidates(None, None, [REFL, REFL6]) == []
    assert public_candidates(None, 4, [REFL6, REFL]) == [REFL]
    assert public_candidates(None, 6, [REFL, REFL6]) == [REFL6]
    assert public_candidates(None, 4, []) == []


@pytest.mark.parametrize("text,want", [("203.0.113.9:51820", "203.0.113.9:51820"), (" none ", None), ("", None),
                                       ("[2001:db8::9]:51820", "[2001:db8::9]:51820")])
def test_public_endpoint_flag(text, want):
    assert RT.parse_public_endpoint(text) == want


@pytest.mark.parametrize("text", ["home.example.org:51820", "203.0.113.9", "203.0.113.9:0", "203.0.113.9:70000",
                                  "127.0.0.1:51820", "0.0.0.0:51820", "224.0.0.1:51820", "[::1]:51820", "junk"])
def test_a_bad_public_endpoint_is_one_line_naming_it(text):
    with pytest.raises(ValueError) as err:
        RT.parse_public_endpoint(text)
    msg = str(err.value)
    assert text in msg and "\n" not in msg


def test_the_port_forward_is_saved_with_the_routing_choice_and_none_clears_it():
    choice = RT.RoutingChoice(("192.168.1.0/24",), exit_node="gw", public_endpoint="203.0.113.9:51820")
    assert RT.choice_from_json_untrusted(choice.to_json()) == choice
    assert RT.choice_from_json_untrusted({"public_endpoint": "localhost:1"}).public_endpoint is None
    assert RT.choice_from_json_untrusted({"public_endpoint": 5}) == RT.RoutingChoice()
    kept = choice.overridden({"snat": False})
    assert kept.public_endpoint == "203.0.113.9:51820" and kept.exit_node == "gw" and not kept.snat
    cleared = choice.overridden({"public_endpoint": None})
    assert cleared.public_endpoint is None and cleared.exit_node == "gw" and cleared.advertise == choice.advertise


# ---- the agent core ---------------------------------------------------------------------------------
def test_an_open_nat_reports_the_reflexive_address_as_public_and_a_filtering_one_takes_it_back():
    core = agent()
    core.node.reflexive = (REFL,)
    out = core.apply([A.NatProbed(NC.EIM, NC.EIM)], 1.0)
    assert reported(out) == [[(*REFL, "public"), (*REFL, "stun"), (*LAN, "local")]]
    core.apply([A.CandidatesAccepted(tuple(reported(out)[0]))], 1.0)
    for mapping, filtering in ((NC.EIM, NC.ADM), (NC.EIM, NC.APDM), (NC.APDM, NC.EIM), (NC.EIM, NC.UNKNOWN),
                               (NC.UNKNOWN, NC.EIM)):
        out = core.apply([A.NatProbed(mapping, filtering)], 2.0)
        assert reported(out) == [[(*REFL, "stun"), (*LAN, "local")]], (mapping, filtering)
        core.apply([A.CandidatesAccepted(tuple(reported(out)[0]))], 2.0)
        out = core.apply([A.NatProbed(NC.EIM, NC.EIM)], 3.0)
        assert reported(out)[0][0] == (*REFL, "public")
        core.apply([A.CandidatesAccepted(tuple(reported(out)[0]))], 3.0)


def test_the_open_verdict_is_for_the_family_probed():
    core = agent()
    core.node.reflexive = (REFL6, REFL)
    out = core.apply([A.NatProbed(NC.EIM, NC.EIM, 6)], 1.0)
    assert reported(out)[0][0] == (*REFL6, "public") and (*REFL, "public") not in reported(out)[0]


def test_a_port_forward_is_reported_whatever_netcheck_says_and_none_stops_it():
    core = agent()
    core.node.reflexive = (REFL,)
    out = core.apply([A.SetRouting(RT.RoutingChoice(public_endpoint="203.0.113.9:51820"))], 1.0)
    assert reported(out)[0][0] == ("203.0.113.9", 51820, "public")
    assert core.public_endpoints() == [("203.0.113.9", 51820)]
    core.apply([A.CandidatesAccepted(tuple(reported(out)[0]))], 1.0)
    assert reported(core.apply([A.NatProbed(NC.APDM, NC.APDM)], 2.0)) == []   # still the forward
    out = core.apply([A.SetRouting(RT.RoutingChoice())], 3.0)
    assert reported(out) == [[(*REFL, "stun"), (*LAN, "local")]]


def test_a_port_forward_inside_the_mesh_is_refused():
    core = agent()
    err = core.routing_refused(RT.RoutingChoice(public_endpoint="100.64.0.9:51820"))
    assert err and "100.64.0.9:51820" in err
    assert core.routing_refused(RT.RoutingChoice(public_endpoint="203.0.113.9:51820")) is None


# ---- compatibility: servers and nodes that do not know "public" --------------------------------------
def test_the_kind_passes_the_wire_check_and_the_new_server_keeps_it():
    cands = [["198.51.100.5", 41641, "public"], ["198.51.100.5", 41641, "stun-eim"], ["192.168.1.2", 41641]]
    assert P.candidates_untrusted(cands) == [("198.51.100.5", 41641, "public"), ("198.51.100.5", 41641, "stun-eim"),
                                             ("192.168.1.2", 41641, "local")]
    kept, refused = D.Directory().reported(P.candidates_untrusted(cands))
    assert refused == 0 and ("198.51.100.5", 41641, "public") in kept


def test_an_old_server_drops_the_public_candidate_alone(monkeypatch):
    monkeypatch.setattr(D, "REPORTED_KINDS", OLD_KINDS)
    cands = local_candidates([REFL], [LAN], NC.EIM, public=[REFL])
    kept, refused = D.Directory().reported(P.candidates_untrusted([list(c) for c in cands]))
    assert refused == 1 and kept == [(*REFL, "stun-eim"), (*LAN, "local")]   # the address itself survives


def test_a_new_node_probes_a_peers_public_candidate_and_an_old_one_drops_it_alone(monkeypatch):
    info = PeerInfo(bytes([9]) * 32, 9, "home", "100.64.0.9", "", (("203.0.113.9", 51820, "public"),
                                                                    (*REFL, "stun-eim"), (*LAN, "local")), True)
    policy = peer_entry.entry_policy(WELCOME, ("192.0.2.1:7300",))
    drops = collections.Counter()
    spec = peer_entry.peer_spec(info, policy, drops)
    assert spec.candidates == (("203.0.113.9", 51820), REFL, LAN) and spec.nat == NC.EIM and not drops
    monkeypatch.setattr(peer_entry, "REPORTED_KINDS", OLD_KINDS)
    spec = peer_entry.peer_spec(info, policy, drops)
    assert spec.candidates == (REFL, LAN) and spec.nat == NC.EIM and drops == {"drop_peer_candidate_kind": 1}

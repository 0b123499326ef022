"""The agent core takes SelfChanged (the server's T_SELF): the name and tags `meshwg status` shows follow, and the
netmap cache keeps them; nothing about the interface, relay or STUN moves."""

from __future__ import annotations

import random

from nacl.public import PrivateKey

from meshwg.control.events import Connected, SelfChanged, Welcome
from meshwg.mesh import agent_core as A
from meshwg.mesh.node import MeshNode
from meshwg.wg.device import WireGuardCore

WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32), ("ops",))


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), ("192.0.2.1:7300",))


def test_self_changed_updates_the_name_and_tags_and_the_cache_only():
    core = new_core()
    core.apply([Connected(WELCOME)], 0.0)
    out = core.apply([SelfChanged("laptop", ("ops", "web"))], 10.0)
    assert (core.welcome.name, core.welcome.tags) == ("laptop", ("ops", "web"))
    assert core.welcome.ipv4 == WELCOME.ipv4 and core.welcome.relay_udp == WELCOME.relay_udp
    kinds = {type(a) for a in out}
    assert kinds <= {A.Log, A.WriteCache}, out   # no SetAddresses, ConfigureRelay, ReportRoutes
    assert [a.welcome.tags for a in out if isinstance(a, A.WriteCache)] == [("ops", "web")]
    assert core.apply([SelfChanged("laptop", ("ops", "web"))], 20.0) == []   # the same again: nothing


def test_self_changed_before_any_welcome_is_ignored():
    core = new_core()
    out = core.apply([SelfChanged("laptop", ("ops",))], 0.0)
    assert core.welcome is None and not [a for a in out if isinstance(a, (A.Log, A.WriteCache))]

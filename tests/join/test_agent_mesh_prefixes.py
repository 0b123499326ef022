"""The agent hands the node the welcome's mesh prefixes, so no disco probe goes into the mesh.

Seen before: only addresses routed to a peer were refused as call-me-maybe endpoints; our own mesh
address and unassigned mesh addresses were pinged (delivered to local services). What the node does with
the prefixes is tested in the simulator (tests/mesh/test_probe_bounds.py)."""

from __future__ import annotations

import ipaddress

from nacl.public import PrivateKey

from meshwg.control import events as CE
from meshwg.mesh.agent_core import AgentCore, CacheLoaded
from meshwg.mesh.node import MeshNode
from meshwg.wg.device import WireGuardCore

WELCOME = CE.Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                     (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))


def _rb(n: int) -> bytes:
    return bytes(range(n))


def test_the_welcome_gives_the_node_its_mesh_prefixes():
    sk = bytes(PrivateKey.generate())
    node = MeshNode(WireGuardCore(private_key=sk, random_bytes=_rb), sk, _rb)
    AgentCore(node).apply([CacheLoaded(WELCOME, ())], 0.0)
    assert set(node.mesh_nets) == {ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd00::/48")}

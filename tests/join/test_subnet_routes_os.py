"""The host side of subnet routes (meshwg/io/oscfg/subnet_routes.py) without touching the host: the nftables table
it would load, and sysctl save/restore on files of our own; the agent's cache keeps a peer's routes and exit flag."""

from __future__ import annotations

from meshwg.control.events import PeerInfo
from meshwg.io.agent.agent import _peer_from_json, _peer_to_json
from meshwg.io.oscfg import subnet_routes as SR


def test_masquerade_only_with_snat_and_mark_rules_only_with_an_exit_node():
    assert SR.nft_commands("mesh0", masquerade=False, mark=None) == []          # nothing: no table at all
    snat = "\n".join(SR.nft_commands("mesh0", masquerade=True, mark=None))
    assert 'iifname "mesh0" oifname != "mesh0" masquerade' in snat and "table inet meshwg-mesh0" in snat
    assert "ct mark" not in snat
    off = "\n".join(SR.nft_commands("mesh0", masquerade=False, mark=51820))    # --snat-routes off, exit in use
    assert "masquerade" not in off and "mark 51820 ct mark set mark" in off and "meta mark set ct mark" in off


def test_sysctls_written_back_as_they_were(tmp_path):
    a, b = tmp_path / "ip_forward", tmp_path / "forwarding"
    a.write_text("0\n")
    b.write_text("1\n")
    s = SR.Sysctls()
    s.set(str(a), "1")
    s.set(str(b), "1")
    s.set(str(a), "1")                      # again: the first value is the one kept
    assert a.read_text() == "1\n"
    s.restore()
    assert a.read_text() == "0\n" and b.read_text() == "1\n" and s.saved == {}
    s.set(str(tmp_path / "absent"), "1")    # not there: left alone, nothing to restore
    assert s.saved == {}


def test_the_cache_keeps_routes_and_the_exit_flag():
    p = PeerInfo(bytes(range(32)), 3, "home", "100.64.0.3", "", (), True, "node", ("10.77.0.0/24",), True)
    assert _peer_from_json(_peer_to_json(p)) == p
    old = _peer_to_json(p)
    del old["routes"], old["exit"]          # a cache written before issue 12
    assert _peer_from_json(old).routes == () and _peer_from_json(old).exit_node is False

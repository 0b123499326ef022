"""The host side of subnet routes (meshwg/io/oscfg/subnet_routes.py) without touching the host: the nftables table
it would load, and sysctl save/restore on files of our own; the agent's cache keeps a peer's routes and exit flag."""

from __future__ import annotations

import pathlib
import stat

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


def test_the_mesh_reaches_only_the_advertised_routes_through_an_advertising_node():
    """Forwarding is global: without a forward filter a peer reaches any network the node reaches."""
    t = "\n".join(SR.nft_commands("mesh0", masquerade=False, mark=None, allow=("10.77.0.0/24", "fd77::/64")))
    assert "hook forward" in t
    assert 'iifname "mesh0" ip daddr { 10.77.0.0/24 } accept' in t and 'ip6 daddr { fd77::/64 } accept' in t
    assert t.rstrip().endswith('add rule inet meshwg-mesh0 forward iifname "mesh0" counter drop')
    assert "hook forward" not in "\n".join(SR.nft_commands("mesh0", masquerade=True, mark=None))   # no filter asked


def _fake_host(monkeypatch, tmp_path, fail=()):
    """/proc/sys as files, nft and ip recorded (commands matching `fail` fail as the kernel says)."""
    paths = tuple(str(tmp_path / n) for n in ("ip_forward", "v6_forwarding", "src_valid_mark"))
    for p in paths:
        pathlib.Path(p).write_text("0\n")
    monkeypatch.setattr(SR, "FORWARDING", paths[:2])
    monkeypatch.setattr(SR, "SRC_VALID_MARK", paths[2])
    monkeypatch.setattr(SR.shutil, "which", lambda name: "/usr/sbin/" + name)
    calls = []

    def run(cmd, *, check=True, input=None):
        calls.append((" ".join(cmd), input or ""))
        for text, err in fail:
            if text in " ".join(cmd) and check:
                raise SR.netconfig.NetconfigError(f"{' '.join(cmd)}: {err}")
        return ""
    monkeypatch.setattr(SR.netconfig, "run", run)
    return paths, calls


def test_apply_filters_forwarding_to_the_advertised_routes_unless_an_exit_node_is_advertised(monkeypatch, tmp_path):
    _, calls = _fake_host(monkeypatch, tmp_path)
    r = SR.SubnetRouting("mesh0")
    r.apply(forwarding=True, masquerade=True, exit_mark=None, routes=("10.77.0.0/24",))
    table = calls[-1][1]
    assert "ip daddr { 10.77.0.0/24 } accept" in table and "counter drop" in table
    r.apply(forwarding=True, masquerade=True, exit_mark=None, routes=("10.77.0.0/24",), advertise_exit=True)
    assert "hook forward" not in calls[-1][1] and "masquerade" in calls[-1][1]   # an exit node forwards anything
    r.apply(forwarding=True, masquerade=False, exit_mark=None, routes=("10.78.0.0/24",))   # --snat-routes off too
    assert "ip daddr { 10.78.0.0/24 } accept" in calls[-1][1] and "masquerade" not in calls[-1][1]
    r.close()
    assert calls[-1][1] == "delete table inet meshwg-mesh0\n"


def test_a_crashed_run_is_undone_by_the_next_one(monkeypatch, tmp_path):
    """SIGKILL/OOM: close() never runs. The next run, on the same state directory, writes the original values back
    (not the 1 the crash left, which it would otherwise take for the original) and removes table and rules."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    paths, calls = _fake_host(monkeypatch, tmp_path)
    run1 = SR.SubnetRouting("mesh0", str(state))
    run1.apply(forwarding=True, masquerade=True, exit_mark=51821, routes=("10.77.0.0/24",))
    assert [pathlib.Path(p).read_text() for p in paths] == ["1\n"] * 3
    undo = state / "os-undo.json"
    assert stat.S_IMODE(undo.stat().st_mode) == 0o600
    del run1                                            # killed: no close()
    calls.clear()
    run2 = SR.SubnetRouting("mesh1", str(state))       # another interface name this time
    run2.recover()
    assert [pathlib.Path(p).read_text() for p in paths] == ["0\n"] * 3
    done = [c for c, _ in calls]
    assert "nft delete table inet meshwg-mesh0" in done
    assert any(c.startswith("ip -4 rule del priority") and "not fwmark 51821 table 51821" in c for c in done)
    assert "ip -4 route flush table 51821" in done
    assert not undo.exists()
    run2.apply(forwarding=True, masquerade=True, exit_mark=None, routes=("10.77.0.0/24",))
    run2.close()                                        # a clean exit after the crash: 0 again, file gone
    assert [pathlib.Path(p).read_text() for p in paths[:2]] == ["0\n"] * 2 and not undo.exists()
    calls.clear()
    SR.SubnetRouting("mesh1", str(state)).recover()     # nothing left: nothing done
    assert calls == []


def test_only_our_exit_rules_are_removed_and_an_existing_rule_does_not_skip_the_next(monkeypatch, tmp_path):
    """wg-quick on the same host has an identical `table main suppress_prefixlength 0` rule: ours are told apart
    by their priority. A rule already there (EEXIST) must not stop the suppress rule from being added."""
    _, calls = _fake_host(monkeypatch, tmp_path, fail=[("not fwmark", "RTNETLINK answers: File exists")])
    r = SR.SubnetRouting("mesh0")
    r.apply(forwarding=False, masquerade=False, exit_mark=51820)
    added = [c for c, _ in calls if " rule add " in c]
    assert any("suppress_prefixlength 0" in c for c in added if c.startswith("ip -4"))
    assert any("suppress_prefixlength 0" in c for c in added if c.startswith("ip -6"))
    assert all(" priority " in c for c in added)
    calls.clear()
    r.close()
    deleted = [c for c, _ in calls if " rule del " in c]
    assert len(deleted) == 4 and all(" priority " in c for c in deleted)
    prio = {c.split(" priority ")[1].split()[0] for c in deleted if "suppress_prefixlength" in c}
    assert len(prio) == 1 and prio != {"0"}

"""The scenario runner end to end, with a stand-in for the node software (tests/scenarios/fake_node.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_real_components
from scenarios import node_commands, runner
from scenarios.definitions import SCENARIOS, NodeSpec, Scenario, expected_path
from scenarios.nat import NatType
from scenarios.netns import RUN_ID

FAKE = str(Path(__file__).with_name("fake_node.py"))
PY = sys.executable


def fake_commands(join_extra: list[str]) -> dict:
    return {
        "signal_serve": [PY, FAKE, "serve", "{db}", "{signal_port}", "{signal_ip}"],
        "invite_create": [PY, FAKE, "invite", "{db}"],
        "join": [PY, FAKE, "join", "{invite}", "{name}", "{state_dir}", *join_extra],
        "status": [PY, FAKE, "status", "{state_dir}"],
    }


PUBLIC_PAIR = Scenario(name="public-pair", description="two public nodes", routers=(),
                       nodes=(NodeSpec("a", None), NodeSpec("b", None), NodeSpec("c", None)), matrix=True)


def netns_names() -> set[str]:
    """Namespaces made by this process (others may be building labs in parallel)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if RUN_ID in line}


@pytest.mark.netns
def test_runner_checks_every_pair_and_prints_the_table(monkeypatch):
    require_real_components("ip", "nft", "unshare")
    monkeypatch.setattr(node_commands, "COMMANDS", fake_commands([]))
    before = netns_names()
    lines: list[str] = []
    outcome = runner.run(PUBLIC_PAIR, say=lines.append)
    text = "\n".join(lines)
    assert outcome.ok, text
    assert [(r.a, r.b) for r in outcome.results] == [("a", "b"), ("a", "c"), ("b", "c")]
    for r in outcome.results:
        assert r.path == "direct" and r.tcp_ok and r.rtt_ms is not None and r.first_ping_s is not None
        assert r.direct_s is not None
    assert "a <-> b" in text and "first ping" in text and "All pairs connected as expected." in text
    assert "direct" in runner.format_matrix(PUBLIC_PAIR, outcome.results)
    assert netns_names() <= before


@pytest.mark.netns
def test_runner_fails_clearly_when_join_fails(monkeypatch):
    require_real_components("ip", "nft", "unshare")
    monkeypatch.setattr(node_commands, "COMMANDS", fake_commands(["fail"]))
    before = netns_names()
    lines: list[str] = []
    outcome = runner.run(SCENARIOS["pr-pr"], say=lines.append)
    assert not outcome.ok
    assert "`meshwg join` exited with status 1" in outcome.error
    assert "fake failure" in outcome.error
    assert netns_names() <= before


def test_expected_paths_follow_the_measured_punch_table():
    N = NatType
    assert expected_path(N.PORT_RESTRICTED, N.PORT_RESTRICTED) == "direct"
    assert expected_path(N.SYMMETRIC, N.SYMMETRIC) == "relay"
    assert expected_path(N.RESTRICTED_CONE, N.SYMMETRIC) == "direct"
    assert expected_path(N.PORT_RESTRICTED, N.SYMMETRIC) == "either"
    assert all(expected_path(N.UDP_BLOCKED, t) == "relay" for t in N)
    p2h = SCENARIOS["phone-to-home"]
    home, laptop, phone = p2h.nodes
    assert p2h.effective_nat(phone) is N.SYMMETRIC
    assert p2h.expected(home, laptop) == "direct" and p2h.expected(laptop, phone) == "direct"
    lan = SCENARIOS["lan-peers"]
    assert lan.expected(lan.nodes[0], lan.nodes[1]) == "direct"
    matrix = SCENARIOS["matrix"]
    double = next(n for n in matrix.nodes if n.name == "double-nat")
    assert matrix.effective_nat(double) is N.SYMMETRIC


def test_table_and_matrix_formatting():
    results = [runner.PairResult("home", "phone", "port-restricted", "symmetric(cgn)", "either", path="relay",
                                 first_ping_s=0.8, direct_s=None, rtt_ms=1.234, tcp_ok=True)]
    table = runner.format_table(results)
    assert "home <-> phone" in table and "relay" in table and "0.8 s" in table and "1.23 ms" in table
    assert " ok" in table and "RTT" in table

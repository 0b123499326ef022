"""Issue 5 in CI: the real node software through the scenario runner (scenarios.runner.run), exactly as
`python -m scenarios run NAME` does it: the phone-to-home scenario and the required NAT-matrix cells
(port-restricted <-> port-restricted, symmetric <-> symmetric, UDP-blocked <-> every other kind), each
pair checked for connectivity (ping and a TCP transfer over the mesh) and for its expected path. Each run
must leave no namespace, root-namespace interface, process or lab directory behind.
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
from dataclasses import dataclass

import pytest

from conftest import require_real_components
from scenarios import runner
from scenarios.definitions import SCENARIOS, NodeSpec, RouterSpec, Scenario
from scenarios.nat import NatType
from scenarios.netns import RUN_ID

pytestmark = pytest.mark.netns

N = NatType


@dataclass(frozen=True)
class CellsScenario(Scenario):
    """A scenario that checks only the listed pairs (the CI cells), not every combination."""

    cells: tuple[tuple[str, str], ...] = ()

    def pairs(self):
        by_name = {n.name: n for n in self.nodes}
        return [(by_name[a], by_name[b]) for a, b in self.cells]


MATRIX_CELLS = CellsScenario(
    name="matrix-cells",
    description="The NAT-matrix cells CI checks: pr <-> pr, sym <-> sym, UDP-blocked <-> each other kind.",
    routers=(RouterSpec("pr-nat-1", N.PORT_RESTRICTED), RouterSpec("pr-nat-2", N.PORT_RESTRICTED),
             RouterSpec("sym-nat-1", N.SYMMETRIC), RouterSpec("sym-nat-2", N.SYMMETRIC),
             RouterSpec("udp-fw", N.UDP_BLOCKED), RouterSpec("cone-nat", N.FULL_CONE)),
    nodes=(NodeSpec("pr-1", "pr-nat-1"), NodeSpec("pr-2", "pr-nat-2"), NodeSpec("sym-1", "sym-nat-1"),
           NodeSpec("sym-2", "sym-nat-2"), NodeSpec("udp-blocked", "udp-fw"), NodeSpec("full-cone", "cone-nat"),
           NodeSpec("public", None)),
    cells=(("pr-1", "pr-2"), ("sym-1", "sym-2"), ("udp-blocked", "pr-1"), ("udp-blocked", "sym-1"),
           ("udp-blocked", "full-cone"), ("udp-blocked", "public")),
)


# -- leftovers -----------------------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    """Living descendants of `pid` (by walking /proc; zombies count: nobody reaped them)."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def snapshot() -> dict[str, set]:
    """What a run could leave behind: this run's namespaces, root-namespace links, our child processes,
    lab directories of this run."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {
        "namespaces": {line.split()[0] for line in netns.splitlines() if RUN_ID in line},
        "links": {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()},
        "processes": _children(os.getpid()),
        "lab dirs": set(glob.glob(os.path.join(tempfile.gettempdir(), f"meshwg-lab-{RUN_ID}-*"))),
    }


def assert_nothing_left(before: dict[str, set]) -> None:
    after = snapshot()
    left = {what: sorted(after[what] - before[what]) for what in after if after[what] - before[what]}
    assert not left, f"the scenario left things behind: {left}"


# -- running ---------------------------------------------------------------------------------------

def run_and_check(scenario: Scenario) -> list[runner.PairResult]:
    require_real_components("ip", "nft", "conntrack", "ping", "unshare")
    before = snapshot()
    lines: list[str] = []
    outcome = runner.run(scenario, say=lines.append)
    text = "\n".join(lines)
    print(text)
    assert outcome.error is None, text
    assert_nothing_left(before)
    expected_pairs = [(a.name, b.name) for a, b in scenario.pairs()]
    assert [(r.a, r.b) for r in outcome.results] == expected_pairs
    for r in outcome.results:
        where = f"{r.a} <-> {r.b} ({r.nat_a} / {r.nat_b})"
        assert r.first_ping_s is not None, f"{where}: no ping over the mesh ({r.note})\n{text}"
        assert r.tcp_ok, f"{where}: TCP transfer over the mesh failed\n{text}"
        if r.expected == "either":
            assert r.path in ("direct", "relay"), f"{where}: path {r.path!r}\n{text}"
        else:
            assert r.path == r.expected, f"{where}: path {r.path!r}, expected {r.expected}\n{text}"
        print(f"[scenario] {where}: path {r.path} (expected {r.expected}), first ping {r.first_ping_s:.2f} s, "
              f"direct {'-' if r.direct_s is None else f'{r.direct_s:.2f} s'}, RTT {r.rtt_ms} ms")
    assert outcome.ok, text
    assert "All pairs connected as expected." in text
    return outcome.results


def test_phone_to_home_every_pair_connects_on_its_expected_path():
    scenario = SCENARIOS["phone-to-home"]
    results = {(r.a, r.b): r for r in run_and_check(scenario)}
    # The measured punch table: the two cones punch through, the cafe's restricted cone also reaches
    # the phone's symmetric carrier NAT; home (port-restricted) <-> phone needs the relay or a birthday hit.
    assert results[("home", "laptop")].expected == "direct"
    assert results[("laptop", "phone")].expected == "direct"
    assert results[("home", "phone")].expected == "either"


def test_matrix_cells_pr_pr_direct_sym_sym_relay_udp_blocked_relay():
    results = {(r.a, r.b): r for r in run_and_check(MATRIX_CELLS)}
    assert results[("pr-1", "pr-2")].path == "direct"
    assert results[("sym-1", "sym-2")].path == "relay"
    for other in ("pr-1", "sym-1", "full-cone", "public"):
        assert results[("udp-blocked", other)].path == "relay"

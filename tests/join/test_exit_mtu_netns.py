"""The exit policy table's default routes in a real kernel (issue 16): meshwg.io.oscfg.subnet_routes, run in a
namespace of the test's own (one end of a veth pair stands in for the mesh's interface), puts `mtu 1375` on the
IPv4 and IPv6 default routes of table M while the exit node in use is relayed, and `ip route replace` without it
really clears it when the exit node goes direct; close() leaves the table empty.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from conftest import require_real_components
from scenarios.netns import Netns

pytestmark = pytest.mark.netns

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
MARK = "51820"   # the first table number from 51820 nobody uses: a fresh namespace uses none
STEPS = """
import sys
sys.path.insert(0, sys.argv[1])
from meshwg.io.oscfg.subnet_routes import SubnetRouting
r = SubnetRouting("mwt0")
mtus = {"relayed": {"0.0.0.0/0": 1375, "::/0": 1375}, "direct": {}}
for line in sys.stdin:
    step = line.strip()
    if step == "close":
        r.close()
    else:
        r.apply(forwarding=False, masquerade=False, exit_mark=int(sys.argv[2]), exit_mtus=mtus[step])
    print("done", flush=True)
"""


def table(ns, fam: str) -> str:
    return ns.run("ip", fam, "route", "show", "table", MARK, check=False)


def step(proc, name: str) -> None:
    proc.stdin.write(name + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done", name   # EOF: the script died (the test fails)


def test_the_exit_tables_default_routes_carry_1375_while_relayed_and_none_when_direct():
    require_real_components("ip")
    ns = Netns("mwx")
    try:
        ns.run("ip", "link", "add", "mwt0", "mtu", "1420", "type", "veth", "peer", "name", "mwt1")
        ns.run("ip", "link", "set", "mwt1", "up")
        ns.run("ip", "link", "set", "mwt0", "up")
        proc = ns.popen(sys.executable, "-c", STEPS, ROOT, MARK, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True)
        step(proc, "relayed")
        for fam in ("-4", "-6"):
            assert "default dev mwt0" in table(ns, fam) and "mtu 1375" in table(ns, fam), table(ns, fam)
        step(proc, "direct")
        for fam in ("-4", "-6"):
            assert "default dev mwt0" in table(ns, fam) and "mtu" not in table(ns, fam), table(ns, fam)
        step(proc, "relayed")
        assert "mtu 1375" in table(ns, "-4") and "mtu 1375" in table(ns, "-6")
        step(proc, "close")
        assert table(ns, "-4").strip() == "" and table(ns, "-6").strip() == ""
        proc.stdin.close()
        proc.wait(10)
    finally:
        ns.close()

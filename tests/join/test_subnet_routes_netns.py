"""The host side of subnet routes in real namespaces (issue 12, review): a "mesh" host reaches, through a router
running meshwg.io.oscfg.subnet_routes (its mesh interface stood in for by a veth), only the route the router
advertises, not another network the router reaches, unless it advertises an exit node; a router killed with
SIGKILL leaves forwarding on and its table, and the next run on the same state directory undoes both.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from conftest import require_real_components
from scenarios.netns import Netns, veth, wait_for

pytestmark = pytest.mark.netns

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
ADVERTISED, OTHER = "10.77.0.2", "10.88.0.2"   # two hosts behind the router: one in the advertised route
ROUTER = """
import sys
sys.path.insert(0, sys.argv[1])
from meshwg.io.oscfg.subnet_routes import SubnetRouting
r = SubnetRouting("mwt0", sys.argv[2])
r.recover()
r.apply(forwarding=True, masquerade=True, exit_mark=None, routes=("10.77.0.0/24",), advertise_exit=sys.argv[3] == "exit")
print("ready", flush=True)
sys.stdin.read()
r.close()
"""


def reaches(ns, host: str) -> bool:
    return subprocess.run(ns.argv("ping", "-c", "1", "-W", "1", host), capture_output=True, timeout=10).returncode == 0


def forwarding(ns) -> str:
    return ns.run("cat", "/proc/sys/net/ipv4/ip_forward").strip() + ns.run(
        "cat", "/proc/sys/net/ipv6/conf/all/forwarding").strip()


def start_router(router, state: str, mode: str):
    proc = router.popen(sys.executable, "-c", ROUTER, ROOT, state, mode, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"   # the router prints it or exits (EOF: the test fails)
    return proc


def test_forward_filter_and_crash_recovery(tmp_path):
    require_real_components("ip", "ping", "nft")
    state = str(tmp_path / "state")
    os.mkdir(state, 0o700)
    mesh, router, lan = Netns("mwm"), Netns("mwr"), Netns("mwl")
    try:
        veth(mesh, "eth0", ["10.99.0.2/24"], router, "mwt0", ["10.99.0.1/24"])
        veth(router, "lan0", ["10.77.0.1/24", "10.88.0.1/24"], lan, "eth0", [f"{ADVERTISED}/24", f"{OTHER}/24"])
        mesh.run("ip", "route", "add", "default", "via", "10.99.0.1")
        assert forwarding(router) == "00"

        proc = start_router(router, state, "routes")
        assert forwarding(router) == "11"
        assert reaches(mesh, ADVERTISED)
        assert not reaches(mesh, OTHER)   # forwarding is global: only the filter keeps this out
        assert "counter packets 0 " not in router.run("nft", "list", "table", "inet", "meshwg-mwt0")   # counted

        os.killpg(proc.pid, signal.SIGKILL)   # a crash: close() never runs
        proc.wait(5)
        router.stop(proc)
        assert forwarding(router) == "11" and "meshwg-mwt0" in router.run("nft", "list", "tables")

        proc = start_router(router, state, "exit")   # undoes the crash first, then advertises an exit node
        assert reaches(mesh, ADVERTISED) and reaches(mesh, OTHER)
        proc.stdin.close()                           # a clean stop
        proc.wait(10)
        assert proc.returncode == 0
        assert forwarding(router) == "00"            # the values before the crash, not the 1 it left
        assert "meshwg-mwt0" not in router.run("nft", "list", "tables")
        assert not os.listdir(state)
    finally:
        for ns in (mesh, router, lan):
            ns.close()

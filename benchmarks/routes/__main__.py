"""How fast a subnet route reaches the mesh (issue 12): `meshwg-signal routes approve` on one node's advertised
route, then the time until it is in the routing table of every other node (real `meshwg join` agents in network
namespaces on one bridge), and the time until it leaves them all after the node stops advertising it
(`meshwg set --advertise-routes none`). Goal: within 1 s with 10 nodes.

Run (as root): .venv/bin/python benchmarks/routes [--nodes 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path[:0] = [REPO, os.path.join(REPO, "tests", "join")]

from joinnet import ENV, PY, BridgeNet  # noqa: E402
from scenarios.netns import wait_for  # noqa: E402

ROUTE = "10.250.0.0/24"


def routed(node) -> bool:
    return ROUTE in node.ns.run("ip", "-4", "route", "show", "dev", node.iface, check=False)


def everywhere(nodes, present: bool, timeout: float = 10.0) -> float:
    """Seconds until every node's routing table has (or lacks) the route."""
    t0 = time.monotonic()
    pending = list(nodes)
    while pending:
        pending = [n for n in pending if routed(n) != present]
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{len(pending)} nodes still {'without' if present else 'with'} {ROUTE}")
    return time.monotonic() - t0


def meshwg(node, *args: str) -> None:
    subprocess.run(node.ns.argv(PY, "-m", "meshwg", *args, "--interface", node.iface), check=True, env=ENV,
                   cwd=REPO, capture_output=True, timeout=20)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10, help="nodes that must learn the route (besides the advertiser)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    net = BridgeNet(n=93)
    try:
        invite = net.start_server()
        home = net.node("home")
        home.start(invite)
        others = [net.node(f"n{i}") for i in range(args.nodes)]
        for n in others:
            n.start(invite)
        wait_for(lambda: all(n.mesh_ip() for n in [home, *others]), timeout=60, what="every node joined")
        adds, removals = [], []
        for r in range(args.rounds):
            meshwg(home, "set", "--advertise-routes", ROUTE)
            wait_for(lambda: ROUTE in net.signal("routes", "list").stdout, timeout=10, what="the advertisement")
            time.sleep(0.5)
            assert not any(routed(n) for n in others), "routed before the approval"
            t0 = time.monotonic()
            res = net.signal("routes", "approve", "home", ROUTE)
            assert res.returncode == 0, res.stderr
            cli = time.monotonic() - t0
            adds.append(cli + everywhere(others, True))
            t0 = time.monotonic()
            meshwg(home, "set", "--advertise-routes", "none")
            cmd = time.monotonic() - t0
            removals.append(cmd + everywhere(others, False))
            net.signal("routes", "reject", "home", ROUTE)  # the next round starts from no decision in force
            print(f"round {r + 1}: approved -> in {args.nodes} routing tables {adds[-1]:.3f} s "
                  f"(the CLI took {cli:.3f} s of it); withdrawn -> gone from all {removals[-1]:.3f} s")
        print(f"{args.nodes} nodes: route added everywhere median {statistics.median(adds):.3f} s "
              f"(max {max(adds):.3f}), removed everywhere median {statistics.median(removals):.3f} s "
              f"(max {max(removals):.3f}); goal <= 1 s")
        return 0
    finally:
        net.close()


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue 15: a network switch (the default-route interface replaced, as Wi-Fi -> wired) re-STUNs and publishes
the new candidate within 1 s, from the kernel's netlink events (before: `ip` every 10 s).

Two nodes and the server on one bridge (tests/join/joinnet.py). "mover" gets a second link in another subnet with
the default route through it (wired plugged in), then loses its first link (Wi-Fi gone): from the switch's start its
STUN answer (the server sees the new source address) and the candidate the peer holds (the server's directory)
must be the new address within 1.0 s, and the old address must leave the peer's candidates within 8 s (it stays
while it is the path that answers: 4.5 s after its last pong, then the next poll; before, it stayed for good).
(The control connection's address went with eth0: the agent reconnects at
once rather than waiting for its heartbeats to time out, or the new candidate would wait ~30 s.) Status is read from the agents' status sockets (no process per poll).
"""

from __future__ import annotations

import time

import pytest

from conftest import require_real_components
from joinnet import BridgeNet
from meshwg.io.ipc import status_server
from scenarios.netns import unique_name, veth, wait_for

pytestmark = pytest.mark.netns


def status(node) -> dict:
    try:
        st = status_server.query(node.iface, {"op": "status"}, timeout=5)
    except (OSError, ValueError):
        return {}
    return {} if "error" in st else st


def candidates_of(viewer, name: str) -> list:
    return next((p["candidates"] for p in status(viewer).get("peers", []) if p["name"] == name), [])


def test_default_route_interface_switch_restuns_and_publishes_within_1s():
    require_real_components("ip", "ping")
    net = BridgeNet(62)
    try:
        invite = net.start_server()
        net.srv.run("ip", "addr", "add", "10.62.1.1/24", "dev", "br0")   # the "wired" network's gateway
        mover, watcher = net.node("mover"), net.node("watcher")
        mover.start(invite)
        watcher.start(invite)
        port = wait_for(lambda: status(mover).get("listen_port"), timeout=20, what="mover's agent")
        old, new = f"{mover.ip}:{port}", f"10.62.1.2:{port}"
        wait_for(lambda: status(mover)["nat"]["reflexive"] == [old] and old in candidates_of(watcher, "mover"),
                 timeout=20, what="mover's first STUN answer in watcher's directory")

        # The switch, timed from its start: wired plugged in (a second link, the default route through it), then
        # Wi-Fi gone (the first link deleted): the server is now reached through eth1, from 10.62.1.2.
        t0 = time.monotonic()
        wired = unique_name("pw")
        veth(net.srv, wired, [], mover.ns, "eth1", ["10.62.1.2/24"])
        net.srv.run("ip", "link", "set", wired, "master", "br0")
        mover.ns.run("ip", "route", "add", "default", "via", "10.62.1.1", "dev", "eth1")
        mover.ns.run("ip", "link", "del", "eth0")
        print(f"network switch: the ip commands took {time.monotonic() - t0:.3f} s")
        restun = published = gone = None
        deadline = t0 + 12.0
        while time.monotonic() < deadline and (restun is None or published is None or gone is None):
            if restun is None and status(mover).get("nat", {}).get("reflexive") == [new]:
                restun = time.monotonic() - t0
            cands = candidates_of(watcher, "mover")
            if published is None and new in cands:
                published = time.monotonic() - t0
            if gone is None and published is not None and old not in cands:
                gone = time.monotonic() - t0
            time.sleep(0.02)
        print(f"network switch: re-STUN answered after {restun} s, new candidate at the peer after {published} s, "
              f"old one gone after {gone} s")
        print(f"watcher's candidates for mover now: {candidates_of(watcher, 'mover')}")
        assert restun is not None and restun <= 1.0, f"re-STUN {restun} s after the switch (must be <= 1 s)"
        assert published is not None and published <= 1.0, f"candidate published {published} s after the switch"
        # The old address leaves the peer's candidates (it stayed there beside the new one before).
        assert gone is not None and gone <= 8.0, f"old address still a candidate {gone} s after the switch"
    except BaseException:
        net.print_logs()
        raise
    finally:
        net.close()


def test_default_route_metric_swap_restuns_within_1s():
    """Two links up, the default routes' metrics swapped: no address comes or goes, but the way out (and so the
    reflexive address the server sees) moves. The default-route event alone must re-STUN within 1 s (before, only
    an address or link event did: the next periodic STUN said it)."""
    require_real_components("ip", "ping")
    net = BridgeNet(64)
    try:
        invite = net.start_server()
        net.srv.run("ip", "addr", "add", "10.64.1.1/24", "dev", "br0")   # the second link's gateway
        mover = net.node("mover")
        # The server (10.64.0.1) reached through a default route, not eth0's own subnet: the metric decides the link.
        mover.ns.run("ip", "route", "del", "10.64.0.0/24", "dev", "eth0")
        mover.ns.run("ip", "route", "add", "default", "via", "10.64.0.1", "dev", "eth0", "onlink", "metric", "100")
        wired = unique_name("pw")
        veth(net.srv, wired, [], mover.ns, "eth1", ["10.64.1.2/24"])
        net.srv.run("ip", "link", "set", wired, "master", "br0")
        mover.ns.run("ip", "route", "add", "default", "via", "10.64.1.1", "dev", "eth1", "metric", "200")
        mover.start(invite)
        port = wait_for(lambda: status(mover).get("listen_port"), timeout=20, what="mover's agent")
        old, new = f"{mover.ip}:{port}", f"10.64.1.2:{port}"
        wait_for(lambda: status(mover).get("nat", {}).get("reflexive") == [old], timeout=20,
                 what="mover's first STUN answer, through eth0")
        time.sleep(0.5)  # the start's own events are over: what follows comes from the swap
        t0 = time.monotonic()
        mover.ns.run("ip", "route", "del", "default", "via", "10.64.0.1", "dev", "eth0", "metric", "100")
        mover.ns.run("ip", "route", "add", "default", "via", "10.64.0.1", "dev", "eth0", "onlink", "metric", "300")
        restun = None
        deadline = t0 + 5.0
        while time.monotonic() < deadline and restun is None:
            if status(mover).get("nat", {}).get("reflexive") == [new]:
                restun = time.monotonic() - t0
            time.sleep(0.02)
        print(f"metric swap: re-STUN answered through eth1 after {restun} s")
        assert restun is not None and restun <= 1.0, f"re-STUN {restun} s after the metric swap (must be <= 1 s)"
    except BaseException:
        net.print_logs()
        raise
    finally:
        net.close()

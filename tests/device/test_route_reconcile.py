"""A real MeshDevice in a namespace keeps its peers' routes in the kernel: routes someone deletes come
back, a prefix another interface holds is left alone and warned about (issue 10, item 14)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import require_real_components  # tests/conftest.py
from scenarios.netns import Netns, unique_name

pytestmark = pytest.mark.netns

PROBE = textwrap.dedent("""
    import ipaddress, json, os, subprocess, sys, tempfile, time, trio
    from meshwg.io.agent import mesh_shell
    from meshwg.mesh.netmap import PeerSpec
    from meshwg.wg.crypto import clamp

    iface, other, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    PEER = {"10.77.0.2/32", "fd77::2/128"}
    THEIRS = "10.78.0.0/24"

    def ip(*args):
        return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout

    def routes_via(dev):
        out = set()
        for family in ("-4", "-6"):
            for r in json.loads(ip("-j", family, "route", "show", "table", "main", "dev", dev) or "[]"):
                if r.get("dst", "default") != "default":
                    out.add(str(ipaddress.ip_network(r["dst"], strict=False)))
        return out

    async def wait_until(predicate, seconds):
        # Seconds until predicate() held, None if it did not within `seconds`.
        t0 = time.monotonic()
        with trio.move_on_after(seconds):
            while not predicate():
                await trio.sleep(0.1)
            return time.monotonic() - t0
        return None

    def counter(dev, name):
        return dev.route_status().get(name)

    def no_events():
        raise OSError("events disabled by the test")

    async def main():
        if mode == "periodic" and hasattr(mesh_shell, "rtnl"):
            mesh_shell.rtnl.event_socket = no_events
        # "Another interface": one end of a veth pair (no dummy module on every test host).
        ip("link", "add", other, "type", "veth", "peer", "name", other + "p")
        ip("link", "set", other + "p", "up")
        ip("link", "set", other, "up")
        ip("route", "add", THEIRS, "dev", other)                         # someone else's, before we start
        ip("route", "add", "10.77.0.2/32", "dev", other, "table", "100")  # another table: irrelevant
        dev = mesh_shell.MeshDevice(iface, clamp(os.urandom(32)), uapi_dir=tempfile.mkdtemp())
        result = {}
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(dev.run)
                await dev.set_addresses(["10.77.0.1/24", "fd77::1/64"])
                key = os.urandom(32)
                spec = PeerSpec.make(key, "peer", sorted(PEER) + [THEIRS])
                dev.node.apply_netmap({key: spec}, time.monotonic())
                await dev.driver.flush()
                result["first_routes_after"] = await wait_until(lambda: PEER <= routes_via(iface), 5)
                result["theirs_kept"] = THEIRS in routes_via(other) and THEIRS not in routes_via(iface)
                result["conflicts_at_start"] = counter(dev, "conflicts")

                # An admin deletes our routes: they come back.
                ip("route", "del", "10.77.0.2/32", "dev", iface)
                ip("-6", "route", "del", "fd77::2/128", "dev", iface)
                result["restored_after"] = await wait_until(lambda: PEER <= routes_via(iface), 15)
                result["restored"] = counter(dev, "restored")

                # The link goes down and up (IPv4 drops its routes without a route event).
                ip("link", "set", iface, "down")
                ip("link", "set", iface, "up")
                result["relinked_after"] = await wait_until(lambda: PEER <= routes_via(iface), 15)

                # Someone replaces our route with theirs: we warn and do not take it back.
                ip("route", "replace", "10.77.0.2/32", "dev", other)
                result["conflict_seen_after"] = await wait_until(lambda: counter(dev, "conflicts") == 2, 15)
                result["replaced_kept"] = ("10.77.0.2/32" in routes_via(other)
                                           and "10.77.0.2/32" not in routes_via(iface))
                result["counters"] = dev.route_status()
                nursery.cancel_scope.cancel()
        finally:
            dev.close()
        print(json.dumps(result))

    trio.run(main)
""")


def _probe(mode: str) -> dict:
    require_real_components("ip")
    ns = Netns("rtr")
    try:
        out = ns.run(sys.executable, "-c", PROBE, unique_name("rt"), unique_name("ve"), mode, timeout=120)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        ns.close()


def _check(result: dict) -> None:
    assert result["first_routes_after"] is not None, result
    assert result["theirs_kept"], result              # another interface's prefix is not stolen at start...
    assert result["conflicts_at_start"] == 1, result  # ...but warned about
    assert result["restored_after"] is not None, result  # deleted routes are back within 15 s
    assert result["restored"] == 2, result
    assert result["relinked_after"] is not None, result
    assert result["conflict_seen_after"] is not None, result
    assert result["replaced_kept"], result            # a route replaced through another interface stays theirs
    assert result["counters"]["conflicts"] == 2, result


def test_deleted_routes_come_back_and_other_interfaces_routes_are_left_alone():
    result = _probe("events")
    _check(result)
    # Route events, not the 10 s period, put them back.
    assert result["restored_after"] < 5 and result["relinked_after"] < 5, result


def test_without_route_events_the_periodic_check_restores_routes():
    _check(_probe("periodic"))

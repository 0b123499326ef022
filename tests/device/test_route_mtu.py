"""The route MTU of relayed peers (issue 16) on the device's side: the planner asks for `route change ... mtu N` where
our route's MTU is not the wanted one, rtnetlink reads a route's MTU, and a real MeshDevice in a namespace puts the
MTU on its routes, keeps it when a route is re-added, and takes it off again."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import sys
import textwrap

import pytest

from conftest import require_real_components  # tests/conftest.py
from meshwg.io.oscfg import rtnl
from meshwg.io.oscfg.route_plan import KernelRoute, plan
from scenarios.netns import Netns, unique_name

OURS, ETH = 7, 2


# ---- the plan ------------------------------------------------------------------------------------
def test_our_route_without_the_wanted_mtu_is_retuned_and_one_with_an_unwanted_mtu_is_cleared():
    found = [KernelRoute("10.0.0.2/32", frozenset({OURS})),
             KernelRoute("10.0.0.3/32", frozenset({OURS}), mtu=1375),
             KernelRoute("10.0.0.4/32", frozenset({OURS}), mtu=1375),
             KernelRoute("10.0.0.5/32", frozenset({ETH}), mtu=1200)]          # someone else's: left alone
    wanted = ["10.0.0.2/32", "10.0.0.3/32", "10.0.0.4/32", "10.0.0.5/32", "10.0.0.6/32"]
    p = plan(wanted, found, OURS, mtus={"10.0.0.2/32": 1375, "10.0.0.4/32": 1375, "10.0.0.6/32": 1375})
    assert p.retune == (("10.0.0.2/32", 1375), ("10.0.0.3/32", 0))
    assert p.add == ("10.0.0.6/32",) and [c[0] for c in p.conflicts] == ["10.0.0.5/32"]
    assert plan(wanted, found, OURS).retune == ()                              # MTUs not asked about


# ---- rtnetlink -----------------------------------------------------------------------------------
def _rta(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def _route(net: str, metrics: bytes | None) -> bytes:
    n = ipaddress.ip_network(net)
    family = socket.AF_INET if n.version == 4 else socket.AF_INET6
    body = struct.pack("=BBBBBBBBI", family, n.prefixlen, 0, 0, 254, 3, 0, 1, 0)
    body += _rta(rtnl.RTA_DST, n.network_address.packed) + _rta(rtnl.RTA_OIF, struct.pack("=i", OURS))
    if metrics is not None:
        body += _rta(rtnl.RTA_METRICS, metrics)
    return body


def test_a_routes_mtu_metric_is_read_and_bad_metrics_read_as_none():
    mtu = _rta(rtnl.RTAX_MTU, struct.pack("=I", 1375))
    assert rtnl.parse_route(_route("10.0.0.2/32", mtu)).mtu == 1375
    assert rtnl.parse_route(_route("fd00::2/128", _rta(8, struct.pack("=I", 1)) + mtu)).mtu == 1375  # after another
    assert rtnl.parse_route(_route("10.0.0.2/32", None)).mtu == 0
    for bad in (b"", b"\x01", _rta(rtnl.RTAX_MTU, b"\x01\x02"), struct.pack("=HH", 200, rtnl.RTAX_MTU) + bytes(4)):
        route = rtnl.parse_route(_route("10.0.0.2/32", bad))
        assert route is not None and route.mtu == 0 and route.devs == frozenset({OURS})


# ---- a real device ---------------------------------------------------------------------------------
PROBE = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile, time, trio
    from meshwg.io.agent import mesh_shell
    from meshwg.mesh.netmap import PeerSpec
    from meshwg.wg.crypto import clamp

    iface = sys.argv[1]
    PEER = ["10.77.0.2/32", "fd77::2/128", "10.88.0.0/24"]

    def ip(*args):
        return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout

    def mtus():
        # prefix -> the route's mtu metric (0: none), as `ip` shows our routes
        out = {}
        for family in ("-4", "-6"):
            for r in json.loads(ip("-j", family, "route", "show", "table", "main", "dev", iface) or "[]"):
                m = [x["mtu"] for x in r.get("metrics", []) if isinstance(x, dict) and "mtu" in x]
                dst = r.get("dst", "")
                out[dst if "/" in dst else dst + ("/128" if ":" in dst else "/32")] = m[0] if m else 0
        return out

    async def wait_until(predicate, seconds):
        t0 = time.monotonic()
        with trio.move_on_after(seconds):
            while not predicate():
                await trio.sleep(0.05)
            return round(time.monotonic() - t0, 3)
        return None

    async def main():
        dev = mesh_shell.MeshDevice(iface, clamp(os.urandom(32)), uapi_dir=tempfile.mkdtemp())
        result = {}
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(dev.run)
                await dev.set_addresses(["10.77.0.1/32", "fd77::1/128"])
                key = os.urandom(32)
                dev.node.apply_netmap({key: PeerSpec.make(key, "peer", PEER)}, time.monotonic())
                await dev.driver.flush()
                result["routes_after"] = await wait_until(lambda: all(mtus().get(p) == 0 for p in PEER), 5)
                dev.set_route_mtus({p: 1375 for p in PEER})                      # the peer is relayed
                result["mtu_after"] = await wait_until(lambda: all(mtus().get(p) == 1375 for p in PEER), 5)
                result["route_get"] = ip("route", "get", "10.77.0.2")
                ip("route", "del", "10.77.0.2/32", "dev", iface)                 # an admin deletes it
                result["readded_after"] = await wait_until(lambda: mtus().get("10.77.0.2/32") == 1375, 15)
                dev.set_route_mtus({})                                           # direct again
                result["cleared_after"] = await wait_until(lambda: all(mtus().get(p) == 0 for p in PEER), 5)
                # A peer added while its routes' MTU is already wanted gets its routes with it.
                dev.set_route_mtus({"10.99.0.2/32": 1375})
                k2 = os.urandom(32)
                dev.node.apply_netmap({key: PeerSpec.make(key, "peer", PEER),
                                       k2: PeerSpec.make(k2, "p2", ["10.99.0.2/32"])}, time.monotonic())
                await dev.driver.flush()
                result["new_after"] = await wait_until(lambda: mtus().get("10.99.0.2/32") == 1375, 5)
                result["final"] = {p: m for p, m in mtus().items() if p in PEER + ["10.99.0.2/32"]}
                result["counters"] = dict(dev.route_counters)
                nursery.cancel_scope.cancel()
        finally:
            dev.close()
        print(json.dumps(result))

    trio.run(main)
""")


@pytest.mark.netns
def test_a_real_device_puts_the_mtu_on_its_routes_keeps_it_when_readded_and_takes_it_off():
    require_real_components("ip")
    ns = Netns("rtm")
    try:
        out = ns.run(sys.executable, "-c", PROBE, unique_name("rm"), timeout=120)
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        ns.close()
    assert r["routes_after"] is not None, r
    assert r["mtu_after"] is not None and "mtu 1375" in r["route_get"], r
    assert r["readded_after"] is not None, r
    assert r["cleared_after"] is not None, r
    assert r["new_after"] is not None, r
    assert r["final"] == {"10.77.0.2/32": 0, "fd77::2/128": 0, "10.88.0.0/24": 0, "10.99.0.2/32": 1375}, r

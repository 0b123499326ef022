"""`meshwg netcheck`'s port-mapping line against a real gateway: miniupnpd (Debian's miniupnpd-nftables:
UPnP IGD, NAT-PMP and PCP) on the LAN side of a lab NAT router, and a router without it.

The lab's outside addresses are documentation ones (198.51.100.0/24), which miniupnpd calls reserved: it
answers NAT-PMP with "network failure" (3) and netcheck must say so instead of claiming NAT-PMP works.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import require_real_components

from scenarios.nat import NatType
from scenarios.netns import wait_for
from scenarios.node_commands import PY
from scenarios.services import listening
from scenarios.topology import Lab

pytestmark = pytest.mark.netns

MINIUPNPD_CONF = """ext_ifname=wan0
listening_ip=lan0
http_port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=yes
uuid=3a1a6a1e-0000-4000-8000-00000000beef
lease_file={dir}/miniupnpd.leases
allow 1024-65535 {lan}.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


@pytest.fixture(scope="module")
def lab():
    require_real_components("ip", "nft", "miniupnpd", "unshare")
    with Lab() as lab:
        lab.public_host("stun")
        upnp = lab.router("upnp", NatType.PORT_RESTRICTED)
        lab.host("behind-upnp", upnp)
        lab.host("behind-plain", lab.router("plain", NatType.PORT_RESTRICTED))
        d = lab.hosts["behind-upnp"].dir
        (d / "miniupnpd.conf").write_text(MINIUPNPD_CONF.format(dir=d, lan=upnp.lan_prefix))
        with open(d / "miniupnpd.log", "wb") as log:
            proc = upnp.ns.spawn(upnp.ns.argv("miniupnpd", "-d", "-4", "-f", str(d / "miniupnpd.conf"),
                                              "-P", str(d / "miniupnpd.pid")), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: proc.poll() is not None or listening(upnp, 5351), timeout=10, what="miniupnpd on 5351")
            assert proc.poll() is None, (d / "miniupnpd.log").read_text()
            yield lab
        finally:
            upnp.ns.stop(proc)
            print((d / "miniupnpd.log").read_text(errors="replace")[-3000:])


def netcheck(lab, host_name: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    host = lab.hosts[host_name]
    t0 = time.monotonic()
    res = host.run_proc(PY, "-m", "meshwg", "netcheck", "--state-dir", str(host.dir / "state"), "--interface",
                        "nc0", "--server", f"{lab.hosts['stun'].addr}:3478", *args, timeout=30)
    assert res.returncode == 0, res.stderr.decode()
    return res, time.monotonic() - t0


def test_miniupnpd_gateway_answers_upnp_and_pcp_and_refuses_natpmp(lab):
    gw = lab.routers["upnp"].lan_gw
    res, took = netcheck(lab, "behind-upnp", "--json")
    pm = json.loads(res.stdout)["port_mapping"]
    assert pm["gateway"] == gw and pm["protocols"] == ["UPnP", "PCP"], pm
    assert pm["natpmp"] == {"result": 3, "external_ip": None} and pm["pcp"] == {"result": 0}
    assert pm["upnp"]["device"] == gw and "MiniUPnPd" in pm["upnp"]["server"], pm
    assert pm["drops"] == {}
    assert took < 6.0   # the server address does not answer: the whole check is still time-boxed
    text, _ = netcheck(lab, "behind-upnp")
    lines = text.stdout.decode().splitlines()
    assert f"  port mapping: UPnP, PCP (gateway {gw}; NAT-PMP refused: network failure (3))" in lines, lines
    assert any(ln.startswith("  summary: ") and ln.endswith("; port mapping UPnP, PCP") for ln in lines), lines


def test_a_gateway_without_port_mapping_says_none(lab):
    res, _ = netcheck(lab, "behind-plain")
    lines = res.stdout.decode().splitlines()
    assert f"  port mapping: none (gateway {lab.routers['plain'].lan_gw})" in lines, lines
    assert "  IPv6: no (no global IPv6 address)" in lines, lines

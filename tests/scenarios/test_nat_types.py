"""The NAT lab behaves like the NATs it claims to be (plain UDP probes and STUN via coturn + stun-client),
hole punching works or fails where it should, and the lab leaves nothing behind."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from scenarios.nat import NatType
from scenarios.services import PROBES, probe, start_coturn, start_reflector
from scenarios.netns import RUN_ID, wait_for
from scenarios.topology import Lab
from conftest import require_real_components
from stun_verdicts import STUN_CLASS

pytestmark = pytest.mark.netns

TYPES = [NatType.FULL_CONE, NatType.RESTRICTED_CONE, NatType.PORT_RESTRICTED, NatType.SYMMETRIC, NatType.UDP_BLOCKED]
_ports = itertools.count(20000)


def fresh_port() -> int:
    """A source port no earlier case used (old conntrack entries survive rule changes)."""
    return next(_ports)


@pytest.fixture(scope="module")
def lab():
    require_real_components("ip", "nft", "conntrack", "turnserver", "stun", "unshare")
    with Lab() as lab:
        server = lab.public_host("server", extra_addrs=1)
        lab.s1, lab.s2 = server.addr, server.extra_addrs[0]
        start_reflector(server, [f"{lab.s1}:4000", f"{lab.s1}:4001", f"{lab.s2}:4000"], tcp=f"{lab.s1}:4100")
        start_coturn(server)
        lab.public_host("open")
        for nat in TYPES:
            lab.host(f"h-{nat.value}", lab.router(nat.value, nat))
        lab.host("h-port-restricted-2", lab.router("port-restricted-2", NatType.PORT_RESTRICTED))
        lab.host("h-symmetric-2", lab.router("symmetric-2", NatType.SYMMETRIC))
        cgn = lab.router("cgn", NatType.SYMMETRIC, cgn=True)
        lab.host("h-double", lab.router("home-behind-cgn", NatType.PORT_RESTRICTED, upstream=cgn))
        office = lab.router("office", NatType.PORT_RESTRICTED, hairpin=True)
        lab.host("lan-a", office)
        lab.host("lan-b", office)
        yield lab


def host_for(lab: Lab, nat: NatType):
    return lab.hosts["open" if nat is NatType.NONE else f"h-{nat.value}"]


# Expected (mapping is endpoint-independent, reply sources that get through) per type.
BEHAVIOUR = {
    NatType.FULL_CONE: (True, {"s1:4000", "s1:4001", "s2:4000"}),
    NatType.RESTRICTED_CONE: (True, {"s1:4000", "s1:4001"}),
    NatType.PORT_RESTRICTED: (True, {"s1:4000"}),
    NatType.SYMMETRIC: (False, {"s1:4000"}),
}


@pytest.mark.parametrize("nat", list(BEHAVIOUR), ids=lambda n: n.value)
def test_mapping_and_filtering_with_udp_probes(lab, nat):
    host, router = host_for(lab, nat), lab.routers[nat.value]
    named = {f"{lab.s1}:4000": "s1:4000", f"{lab.s1}:4001": "s1:4001", f"{lab.s2}:4000": "s2:4000"}
    port = fresh_port()
    mapping = probe(host, "send", "--port", str(port), *[a for t in named for a in ("--to", t)])
    observed = {r["observed"] for r in mapping["replies"]}
    assert len(mapping["replies"]) == 3
    assert all(o.startswith(router.public_ip + ":") for o in observed)
    eim, allowed = BEHAVIOUR[nat]
    if eim:
        assert observed == {f"{router.public_ip}:{port}"}      # one mapping, source port kept
    else:
        assert len(observed) == 3                             # a new mapping per destination

    # Contact only s1:4000, then ask the reflector to answer from every socket it has.
    filtered = probe(host, "send", "--port", str(fresh_port()), "--to", f"{lab.s1}:4000",
                     *[a for t in named for a in ("--reply-from", t)])
    assert {named[r["from"]] for r in filtered["replies"]} == allowed


@pytest.mark.parametrize("nat", list(STUN_CLASS), ids=lambda n: n.value)
def test_stun_client_classifies_each_type_against_coturn(lab, nat):
    result = host_for(lab, nat).run_proc("stun", lab.s1, "-p", str(fresh_port()), timeout=20)
    primary = [line for line in result.stdout.decode().splitlines() if line.startswith("Primary:")]
    assert primary, result.stdout.decode()
    assert primary[0].startswith(f"Primary: {STUN_CLASS[nat]}"), primary[0]


def punch(lab: Lab, a_name: str, b_name: str, duration: float = 1.5) -> tuple[dict, dict]:
    """Both hosts learn their mapping from the reflector, swap them, and send every 20 ms."""
    procs = []
    for name in (a_name, b_name):
        argv = [sys.executable, PROBES, "punch", "--port", str(fresh_port()),
                "--reflector", f"{lab.s1}:4000", "--duration", str(duration)]
        procs.append((lab.hosts[name], lab.hosts[name].popen(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)))
    try:
        mappings = [json.loads(p.stdout.readline())["mapping"] for _, p in procs]
        assert all(mappings), mappings
        for (_, p), peer in zip(procs, reversed(mappings)):
            p.stdin.write(f"{peer}\n".encode())
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for _, p in procs]
        for _, p in procs:
            p.wait(5)
        return results[0], results[1]
    finally:
        for host, p in procs:
            host.stop(p)


@pytest.mark.parametrize(("a", "b", "direct"), [
    ("h-port-restricted", "h-port-restricted-2", True),
    ("h-full-cone", "h-symmetric", True),          # the cone side answers the observed source
    ("h-restricted-cone", "h-symmetric", True),
    ("h-port-restricted", "h-symmetric", False),   # one probe socket cannot guess the symmetric port
    ("h-symmetric", "h-symmetric-2", False),
])
def test_udp_hole_punching(lab, a, b, direct):
    ra, rb = punch(lab, a, b)
    if direct:
        assert ra["received"] > 0 and rb["received"] > 0, (ra, rb)
    else:
        assert ra["received"] == 0 or rb["received"] == 0, (ra, rb)
        assert not (ra["received"] and rb["received"])


def test_udp_blocked_host_has_tcp_only(lab):
    host = lab.hosts["h-udp-blocked"]
    udp = probe(host, "send", "--port", str(fresh_port()), "--to", f"{lab.s1}:4000")
    assert udp["replies"] == []
    tcp = probe(host, "tcp", "--to", f"{lab.s1}:4100")
    assert tcp["ok"] and tcp["observed"].startswith(lab.routers["udp-blocked"].public_ip + ":")


def test_double_nat_behind_carrier_grade_nat(lab):
    host, home, cgn = lab.hosts["h-double"], lab.routers["home-behind-cgn"], lab.routers["cgn"]
    assert home.wan_ip.startswith("100.64.") and home.public_ip == cgn.wan_ip
    assert host.nat_label == "port-restricted+symmetric(cgn)"
    result = probe(host, "send", "--port", str(fresh_port()), "--to", f"{lab.s1}:4000", "--to", f"{lab.s2}:4000")
    observed = {r["observed"] for r in result["replies"]}
    assert len(observed) == 2 and all(o.startswith(cgn.wan_ip + ":") for o in observed)


def test_lan_peers_reach_each_other_directly_and_by_hairpin(lab):
    a, b = lab.hosts["lan-a"], lab.hosts["lan-b"]
    a.run("ping", "-c", "1", "-W", "2", b.addr)
    ra, rb = punch(lab, "lan-a", "lan-b")   # each sends to the other's public mapping: hairpin
    assert ra["received"] > 0 and rb["received"] > 0, (ra, rb)


def test_hosts_have_private_run_wireguard(lab):
    a, b = lab.hosts["lan-a"], lab.hosts["lan-b"]
    a.run("touch", "/run/wireguard/mine.sock")
    assert a.run("ls", "/run/wireguard").split() == ["mine.sock"]
    assert "mine.sock" not in b.run("ls", "/run/wireguard")
    assert not os.path.exists("/run/wireguard/mine.sock")


def test_same_wireguard_interface_name_on_two_hosts(lab):
    """wireguard-go's UAPI socket dir is per host in the lab (`ip netns exec` does not separate /var/run/wireguard)."""
    require_real_components("wireguard-go", "wg")
    hosts = [lab.hosts["lan-a"], lab.hosts["lan-b"]]
    procs = [h.popen("wireguard-go", "-f", "wg0", env={"WG_PROCESS_FOREGROUND": "1"},
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for h in hosts]
    try:
        for h in hosts:
            wait_for(lambda: (h.dir / "run" / "wireguard" / "wg0.sock").exists(), timeout=10, what="wg0.sock")
        keys = []
        for h in hosts:
            key = h.run("wg", "genkey").strip()
            h.run("wg", "set", "wg0", "private-key", "/dev/stdin", input=key.encode())
            keys.append(h.run("wg", "show", "wg0", "public-key").strip())
        assert keys[0] != keys[1]
    finally:
        for h, p in zip(hosts, procs):
            h.stop(p)


def netns_names() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout.splitlines() if line.strip()}


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_close_removes_namespaces_links_and_processes():
    require_real_components("ip", "nft", "unshare")
    lab = Lab()
    with lab:
        router = lab.router("r", NatType.PORT_RESTRICTED)
        host = lab.host("h", router)
        proc = host.popen("sleep", "300")
        names, workdir = set(lab.namespaces), lab.workdir
        assert names <= netns_names()
    assert not names & netns_names()
    assert proc.poll() is not None
    assert RUN_ID not in links()      # no temporary veth end left in the root namespace
    assert not workdir.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_tears_the_lab_down(signum):
    require_real_components("ip", "nft", "unshare")
    script = (
        "import json, signal, time\n"
        "from scenarios.topology import Lab\n"
        # A shell's background job starts with SIGINT ignored; act like a foreground Ctrl-C target.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "with Lab() as lab:\n"
        "    h = lab.host('h', lab.router('r', 'symmetric'))\n"
        "    p = h.popen('sleep', '300')\n"
        "    print(json.dumps({'ns': lab.namespaces, 'pid': p.pid, 'dir': str(lab.workdir)}), flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    info = {"ns": [], "pid": None}
    try:
        info = json.loads(child.stdout.readline())
        assert set(info["ns"]) <= netns_names()
        child.send_signal(signum)
        child.wait(20)
    finally:
        if child.poll() is None:
            # The child did not tear down: kill it and remove what it built, so the failure leaks nothing.
            child.kill()
            child.wait()
            if info["pid"]:
                subprocess.run(["kill", "-KILL", f"-{info['pid']}"], capture_output=True)
            for name in info["ns"]:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            if info.get("dir"):
                shutil.rmtree(info["dir"], ignore_errors=True)
    assert not set(info["ns"]) & netns_names()
    assert not os.path.exists(info["dir"])
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)

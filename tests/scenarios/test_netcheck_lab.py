"""NAT filtering against our own signal server in the NAT lab: no coturn, no third-party STUN.

The server runs with the runner's own command line (scenarios/node_commands.py: two addresses, default
alternate port), so the lab's 2 x 2 STUN layout is what every scenario gets. The `stun` binary must give
the verdicts it gives against coturn (tests/scenarios/test_nat_types.py), and `meshwg netcheck --json`
must report the right mapping and filtering, standalone and next to a running `meshwg join`.
"""

from __future__ import annotations

import itertools
import json
import subprocess

import pytest
from conftest import require_real_components

from scenarios.nat import NatType
from scenarios.netns import wait_for
from scenarios.node_commands import PY, RELAY_TCP_PORT, SIGNAL_PORT, STUN_PORT, command
from scenarios.services import listening
from scenarios.topology import Lab
from stun_verdicts import STUN_CLASS as COTURN_STUN_CLASS

pytestmark = pytest.mark.netns

TYPES = [NatType.FULL_CONE, NatType.RESTRICTED_CONE, NatType.PORT_RESTRICTED, NatType.SYMMETRIC]
_ports = itertools.count(21000)

# Our server must draw the same verdicts as coturn (the UDP-blocked host cannot reach either).
STUN_CLASS = {nat: verdict for nat, verdict in COTURN_STUN_CLASS.items() if nat is not NatType.UDP_BLOCKED}
EIM, ADM, APDM = "endpoint-independent", "address-dependent", "address-and-port-dependent"
NETCHECK = {   # (mapping, filtering) in RFC 4787 terms
    NatType.FULL_CONE: (EIM, EIM),
    NatType.RESTRICTED_CONE: (EIM, ADM),
    NatType.PORT_RESTRICTED: (EIM, APDM),
    NatType.SYMMETRIC: (APDM, APDM),
}


@pytest.fixture(scope="module")
def lab():
    require_real_components("ip", "nft", "conntrack", "stun", "unshare")
    with Lab() as lab:
        sig = lab.public_host("signal", extra_addrs=1)
        lab.sig = sig
        lab.public_host("open")
        for nat in TYPES:
            lab.host(f"h-{nat.value}", lab.router(nat.value, nat))
        db = str(sig.dir / "signal.db")
        argv = command("signal_serve", db=db, signal_ip=sig.addr, signal_ip2=sig.extra_addrs[0],
                       signal_port=SIGNAL_PORT, stun_port=STUN_PORT, relay_tcp_port=RELAY_TCP_PORT)
        with open(sig.dir / "signal.log", "wb") as log:
            lab.server = sig.popen(*argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: lab.server.poll() is not None or listening(sig, STUN_PORT + 1), timeout=15,
                     what="signal server's alternate STUN port")
            assert lab.server.poll() is None, (sig.dir / "signal.log").read_text()
            wait_for(lambda: listening(sig, SIGNAL_PORT, "tcp"), timeout=15, what="signal server control port")
            lab.invite = sig.run(*command("invite_create", db=db, signal_ip=sig.addr,
                                          signal_port=SIGNAL_PORT)).strip().splitlines()[-1]
            yield lab
        except BaseException:
            print((sig.dir / "signal.log").read_text(errors="replace")[-3000:])
            raise


def host_for(lab: Lab, nat: NatType):
    return lab.hosts["open" if nat is NatType.NONE else f"h-{nat.value}"]


def test_server_has_the_2x2_stun_layout(lab):
    out = lab.sig.ns.run("ss", "-H", "-uln")
    for ip in (lab.sig.addr, lab.sig.extra_addrs[0]):
        for port in (STUN_PORT, STUN_PORT + 1):
            assert f"{ip}:{port}" in out, out


@pytest.mark.parametrize("nat", list(STUN_CLASS), ids=lambda n: n.value)
def test_stun_client_classifies_like_against_coturn(lab, nat):
    result = host_for(lab, nat).run_proc("stun", lab.sig.addr, "-p", str(next(_ports)), timeout=20)
    primary = [line for line in result.stdout.decode().splitlines() if line.startswith("Primary:")]
    assert primary, result.stdout.decode()
    assert primary[0].startswith(f"Primary: {STUN_CLASS[nat]}"), primary[0]


def netcheck(host, *args: str) -> dict:
    res = host.run_proc(PY, "-m", "meshwg", "netcheck", "--json", "--state-dir", str(host.dir / "state"),
                        "--interface", "nc0", *args, timeout=30)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout)


@pytest.mark.parametrize("nat", TYPES, ids=lambda n: n.value)
def test_netcheck_standalone_reports_mapping_and_filtering(lab, nat):
    host = host_for(lab, nat)
    rep = netcheck(host, "--server", f"{lab.sig.addr}:{STUN_PORT}")
    assert (rep["mapping"], rep["filtering"]) == NETCHECK[nat], json.dumps(rep["nat_probe"]["tests"], indent=1)
    assert rep["hard"] == (nat is NatType.SYMMETRIC)
    assert rep["reflexive"][0].startswith(host.router.public_ip + ":")
    assert rep["nat_probe"]["behind_nat"] is True
    assert rep["nat_probe"]["other_address"] == f"{lab.sig.extra_addrs[0]}:{STUN_PORT + 1}"


def test_netcheck_next_to_a_running_join(lab):
    """No --server: the agent names the STUN servers; mapping/relay from the agent, filtering from our probe."""
    require_real_components("ip")
    host = host_for(lab, NatType.PORT_RESTRICTED)
    state = str(host.dir / "state")
    with open(host.dir / "join.log", "wb") as log:
        join = host.popen(*command("join", invite=lab.invite, name="pr", state_dir=state, interface="nc0"),
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        def status():
            res = host.run_proc(*command("status", state_dir=state, interface="nc0"))
            return json.loads(res.stdout) if res.returncode == 0 else None

        wait_for(lambda: (s := status()) and s["nat"]["mapping"], timeout=20, what="agent up with a STUN verdict")
        rep = netcheck(host)
        assert (rep["mapping"], rep["filtering"]) == (EIM, APDM), rep
        assert rep["nat_probe"]["other_address"] == f"{lab.sig.extra_addrs[0]}:{STUN_PORT + 1}"
        assert rep["relay_latency_ms"] is not None
        assert rep["reflexive"][0].startswith(host.router.public_ip + ":")
    except BaseException:
        print((host.dir / "join.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        host.stop(join)

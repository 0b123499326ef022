"""The scenario runner end to end, with a stand-in for the node software (tests/scenarios/fake_node.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_real_components
from scenarios import node_commands, runner
from scenarios.definitions import LAN, PLAIN, SCENARIOS, NodeSpec, RouterSpec, Scenario, expected_path
from scenarios.nat import NatType
from scenarios.netns import RUN_ID
from scenarios.topology import teardown_manifest

FAKE = str(Path(__file__).with_name("fake_node.py"))
FAKE_PLAIN = str(Path(__file__).with_name("fake_plain.py"))
PY = sys.executable


def fake_commands(join_extra: list[str]) -> dict:
    return {
        "signal_serve": [PY, FAKE, "serve", "{db}", "{signal_port}", "{signal_ip}"],
        "invite_create": [PY, FAKE, "invite", "{db}"],
        "join": [PY, FAKE, "join", "{invite}", "{name}", "{state_dir}", *join_extra],
        "status": [PY, FAKE, "status", "{state_dir}"],
    }


def fake_plain_commands(pidfile: Path, *, up_extra: tuple[str, ...] = ()) -> dict:
    """fake_commands plus the plain-device and route commands (fake_plain.py); the device's daemon writes its PID
    to `pidfile`, outside the lab (which is gone after the run)."""
    return {
        **fake_commands([]),
        "status": [PY, FAKE_PLAIN, "status", "{state_dir}"],
        "signal_plain": node_commands.COMMANDS["signal_plain"],
        "join_routes": node_commands.COMMANDS["join_routes"],
        "routes_list": [PY, FAKE_PLAIN, "routes-list", "{db}"],
        "routes_approve": [PY, FAKE_PLAIN, "routes-approve", "{db}", "{node}", "{cidr}"],
        "plain_add": [PY, FAKE_PLAIN, "plain-add", "{db}", "{name}", "{png}", "{endpoint}"],
        "qr_decode": [PY, FAKE_PLAIN, "cat", "{png}"],
        "wg_quick_up": [PY, FAKE_PLAIN, "wg-quick-up", "{conf}", str(pidfile), *up_extra],
        "wg_endpoints": [PY, FAKE_PLAIN, "endpoints", "{conf}"],
    }


# Everything on one LAN: fake_node's "mesh addresses" are the hosts' own, so the fakes reach each other directly.
HOME_LAN = Scenario(
    name="home-lan", description="fake home with a NAS, a laptop and a plain phone",
    routers=(RouterSpec("home-router", NatType.FULL_CONE),),
    nodes=(NodeSpec("home", "home-router", advertise_lan=True), NodeSpec("laptop", "home-router"),
           NodeSpec("phone-app", "home-router", kind=PLAIN, to=("home",)),
           NodeSpec("nas", "home-router", kind=LAN)),
)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited: only its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


PUBLIC_PAIR = Scenario(name="public-pair", description="two public nodes", routers=(),
                       nodes=(NodeSpec("a", None), NodeSpec("b", None), NodeSpec("c", None)), matrix=True)


def netns_names() -> set[str]:
    """Namespaces made by this process (others may be building labs in parallel)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if RUN_ID in line}


@pytest.mark.netns
def test_runner_checks_every_pair_and_prints_the_table(monkeypatch):
    require_real_components("ip", "nft", "unshare")
    monkeypatch.setattr(node_commands, "COMMANDS", fake_commands([]))
    before = netns_names()
    lines: list[str] = []
    outcome = runner.run(PUBLIC_PAIR, say=lines.append)
    text = "\n".join(lines)
    assert outcome.ok, text
    assert [(r.a, r.b) for r in outcome.results] == [("a", "b"), ("a", "c"), ("b", "c")]
    for r in outcome.results:
        assert r.path == "direct" and r.tcp_ok and r.rtt_ms is not None and r.first_ping_s is not None
        assert r.direct_s is not None
    assert "a <-> b" in text and "first ping" in text and "All pairs connected as expected." in text
    assert "direct" in runner.format_matrix(PUBLIC_PAIR, outcome.results)
    assert netns_names() <= before


@pytest.mark.netns
def test_runner_fails_clearly_when_join_fails(monkeypatch):
    require_real_components("ip", "nft", "unshare")
    monkeypatch.setattr(node_commands, "COMMANDS", fake_commands(["fail"]))
    before = netns_names()
    lines: list[str] = []
    outcome = runner.run(SCENARIOS["pr-pr"], say=lines.append)
    assert not outcome.ok
    assert "`meshwg join` exited with status 1" in outcome.error
    assert "fake failure" in outcome.error
    assert netns_names() <= before


def test_expected_paths_follow_the_measured_punch_table():
    N = NatType
    assert expected_path(N.PORT_RESTRICTED, N.PORT_RESTRICTED) == "direct"
    assert expected_path(N.SYMMETRIC, N.SYMMETRIC) == "relay"
    assert expected_path(N.RESTRICTED_CONE, N.SYMMETRIC) == "direct"
    assert expected_path(N.PORT_RESTRICTED, N.SYMMETRIC) == "either"
    assert all(expected_path(N.UDP_BLOCKED, t) == "relay" for t in N)
    p2h = SCENARIOS["phone-to-home"]
    home, laptop, phone = p2h.mesh_nodes()
    assert p2h.effective_nat(phone) is N.SYMMETRIC
    assert p2h.expected(home, laptop) == "direct" and p2h.expected(laptop, phone) == "direct"
    lan = SCENARIOS["lan-peers"]
    assert lan.expected(lan.nodes[0], lan.nodes[1]) == "direct"
    matrix = SCENARIOS["matrix"]
    double = next(n for n in matrix.nodes if n.name == "double-nat")
    assert matrix.effective_nat(double) is N.SYMMETRIC


def test_table_and_matrix_formatting():
    results = [runner.PairResult("home", "phone", "port-restricted", "symmetric(cgn)", "either", path="relay",
                                 first_ping_s=0.8, direct_s=None, rtt_ms=1.234, tcp_ok=True)]
    table = runner.format_table(results)
    assert "home <-> phone" in table and "relay" in table and "0.8 s" in table and "1.23 ms" in table
    assert " ok" in table and "RTT" in table
    assert "plain rows" not in table


def test_plain_rows_say_plain_wireguard_and_which_lan():
    results = [
        runner.PairResult("phone-app", "home", "symmetric(cgn)", "port-restricted", "relay", path="relay",
                          first_ping_s=0.1, rtt_ms=2.0, tcp_ok=True, plain=True),
        runner.PairResult("phone-app", "nas", "symmetric(cgn)", "port-restricted", "relay", path="relay",
                          first_ping_s=0.2, rtt_ms=3.0, tcp_ok=True, plain=True, b_where="home LAN"),
        runner.PairResult("phone-app", "home", "symmetric(cgn)", "port-restricted", "relay", path="direct/relay",
                          first_ping_s=0.1, rtt_ms=2.0, tcp_ok=True, plain=True, note="expected relay"),
    ]
    table = runner.format_table(results)
    assert re.search(r"^phone-app <-> home +symmetric\(cgn\) / port-restricted +relay \(plain WireGuard\) +0\.1 s +- "
                     r"+2\.00 ms +ok$", table, re.M), table
    assert re.search(r"^phone-app <-> nas \(home LAN\) +symmetric\(cgn\) / port-restricted +relay \(plain WireGuard\) "
                     r"+0\.2 s +- +3\.00 ms +ok$", table, re.M), table
    assert re.search(r"direct/relay \(plain WireGuard\) .* FAIL expected relay$", table, re.M), table
    assert "plain rows" in table


def test_plain_devices_pair_with_their_nodes_and_the_lans_those_advertise():
    p2h = SCENARIOS["phone-to-home"]
    assert [(a.name, b.name) for a, b in p2h.pairs()] == [
        ("home", "laptop"), ("home", "phone"), ("laptop", "phone"), ("phone-app", "home"), ("phone-app", "nas")]
    app, home, nas = p2h.node("phone-app"), p2h.node("home"), p2h.node("nas")
    assert app.kind == PLAIN and nas.kind == LAN and home.advertise_lan
    assert p2h.effective_nat(app) is NatType.SYMMETRIC and p2h.router(app.behind).cgn
    assert p2h.expected(app, home) == "relay" and p2h.expected(app, nas) == "relay"
    assert p2h.carrier(app, nas) == home and p2h.carrier(app, home) == home
    # A LAN whose node does not advertise it, and a node the device may not reach, give no pair.
    quiet = Scenario("quiet", "", routers=(RouterSpec("r", NatType.FULL_CONE), RouterSpec("s", NatType.FULL_CONE)),
                     nodes=(NodeSpec("home", "r"), NodeSpec("office", "s", advertise_lan=True),
                            NodeSpec("app", None, kind=PLAIN, to=("home",)), NodeSpec("nas", "r", kind=LAN),
                            NodeSpec("printer", "s", kind=LAN)))
    assert [(a.name, b.name) for a, b in quiet.pairs()] == [("home", "office"), ("app", "home")]


@pytest.mark.parametrize("device, problem", [
    (NodeSpec("app", "r", kind=PLAIN), "app: a plain device needs the nodes it may reach"),
    (NodeSpec("app", "r", kind=PLAIN, to=("nas",)), "app: may reach only meshwg nodes, not 'nas'"),
    (NodeSpec("app", "r", to=("home",)), "app: only a plain device has nodes to reach"),
    (NodeSpec("x", "r", kind="phone"), "x: unknown kind 'phone'"),
    (NodeSpec("x", "nowhere"), "x: behind unknown router 'nowhere'"),
    (NodeSpec("x", None, kind=LAN), "x: a LAN device sits behind a router"),
    (NodeSpec("x", None, advertise_lan=True), "x: only a meshwg node behind a router advertises its LAN"),
    (NodeSpec("home", "r"), "two devices named 'home'"),
])
def test_bad_definitions_are_refused_naming_the_device(device, problem):
    with pytest.raises(ValueError, match=re.escape(f"scenario 'bad': {problem}")):
        Scenario("bad", "", routers=(RouterSpec("r", NatType.FULL_CONE),),
                 nodes=(NodeSpec("home", "r"), NodeSpec("nas", "r", kind=LAN), device))


def test_a_plain_device_is_on_the_relay_only_when_both_ends_say_so():
    relay = "203.0.113.10:51820"
    node = node_commands.PeerStatus("phone-app", [], "relay", None, None, plain=True)
    assert runner.plain_path(node, [relay], relay) == "relay"
    assert runner.plain_path(node, ["198.51.100.10:41641"], relay) == "direct/relay"   # the device went elsewhere
    assert runner.plain_path(None, [relay], relay) == "?/relay"                       # the node does not list it
    assert runner.plain_path(node_commands.PeerStatus("phone-app", [], "relay", None, None), [relay], relay) \
        == "?/relay"                                                                   # ... not as a plain peer
    assert runner.plain_path(node, [], relay) == "?/relay"
    assert runner.plain_path(node, ["(none)"], relay) == "?/relay"                     # never sent: no view
    assert runner.plain_path(None, [], relay) is None                                 # "none" in the table


def test_route_listing_wg_endpoints_and_the_plain_flag_are_read():
    listing = (f"{'NODE':20} {'ROUTE':43} STATE\n"
               f"{'home':20} {'192.168.1.0/24':43} pending\n"
               f"{'home':20} {'10.9.0.0/16':43} approved (not advertised)\n"
               f"{'laptop':20} {'192.168.1.0/24':43} pending; refused: overlaps home's 192.168.1.0/24\n")
    assert node_commands.route_state(listing, "home", "192.168.1.0/24") == "pending"
    assert node_commands.route_state(listing, "home", "10.9.0.0/16") == "approved (not advertised)"
    assert node_commands.route_state(listing, "laptop", "192.168.1.0/24").startswith("pending; refused")
    assert node_commands.route_state(listing, "home", "192.168.2.0/24") is None
    assert node_commands.route_state(listing, "NODE", "ROUTE") is None
    shown = "jVca+/bAo=\t203.0.113.10:51820\nRuQ1+/CHUk=\t(none)\n"
    assert node_commands.parse_wg_endpoints(shown) == ["203.0.113.10:51820", "(none)"]
    status = node_commands.parse_status('{"addresses": ["100.64.0.1/32"], "peers": ['
                                        '{"name": "phone-app", "addresses": [], "path": "relay", "plain": true}, '
                                        '{"name": "laptop", "addresses": [], "path": "direct", "plain": false}]}')
    assert status.peers["phone-app"].plain and not status.peers["laptop"].plain


def test_the_admin_and_node_command_lines_parse_with_the_real_clis(tmp_path):
    """The templates the runner fills in are accepted by `meshwg-signal` and `meshwg` as they are today."""
    from meshwg.cli import build_parser as meshwg_parser
    from signal_server.cli import build_parser as signal_parser

    def argv(which: str, *extra: str, **values) -> list[str]:
        cmd = node_commands.command(which, **values) + list(extra)
        assert cmd[:3] == [PY, "-m", cmd[2]]
        return cmd[3:]

    sig = dict(db=tmp_path / "signal.db", signal_ip="203.0.113.10", signal_ip2="203.0.113.11", signal_port=7300,
               stun_port=3478, relay_tcp_port=7301, plain_port=51820, endpoint="203.0.113.10:51820")
    serve = signal_parser().parse_args(argv("signal_serve", *node_commands.command("signal_plain", **sig), **sig))
    assert serve.plain_udp == "203.0.113.10:51820"
    add = signal_parser().parse_args(argv("plain_add", "--to", "home", name="phone-app", png="/x.png", **sig))
    assert (add.cmd, add.action, add.name, add.to, add.qr_png) == ("plain", "add", "phone-app", ["home"], "/x.png")
    approve = signal_parser().parse_args(argv("routes_approve", node="home", cidr="192.168.1.0/24", **sig))
    assert (approve.action, approve.node, approve.route) == ("approve", "home", "192.168.1.0/24")
    assert signal_parser().parse_args(argv("routes_list", **sig)).action == "list"
    join = meshwg_parser().parse_args(argv("join", *node_commands.command("join_routes", routes="192.168.1.0/24"),
                                           invite="inv", name="home", state_dir="/s", interface="mesh0"))
    assert "192.168.1.0/24" in str(join.advertise_routes)



@pytest.mark.netns
def test_runner_brings_up_a_plain_device_from_its_qr_code_and_keeps_the_lab(monkeypatch, tmp_path):
    """The plain-device flow with stand-ins: the LAN route approved, the device added, its config decoded and
    brought up; its pairs in order, on the relay; --keep prints how to enter it; `scenarios down` stops the
    daemon its wg-quick left running (not our child, as wireguard-go is not) and removes the namespaces."""
    require_real_components("ip", "nft", "unshare")
    pidfile = tmp_path / "daemon.pid"
    monkeypatch.setattr(node_commands, "COMMANDS", fake_plain_commands(pidfile))
    before = netns_names()
    lines: list[str] = []
    outcome = runner.run(HOME_LAN, keep=True, say=lines.append)
    text = "\n".join(lines)
    manifest = re.search(r"scenarios down (\S+)", text)
    try:
        assert outcome.ok, text
        assert [(r.a, r.b) for r in outcome.results] == [("home", "laptop"), ("phone-app", "home"), ("phone-app", "nas")]
        mesh, home, nas = outcome.results
        assert not mesh.plain and mesh.path == "direct"
        for r in (home, nas):
            assert r.plain and r.path == "relay" and r.tcp_ok and r.first_ping_s is not None and r.direct_s is None
        assert home.b_where == "" and nas.b_where == "home LAN"
        assert re.search(r"approved home's LAN: meshwg-signal routes approve home 192\.168\.\d+\.0/24", text), text
        assert "added phone-app: meshwg-signal plain add phone-app --to home --qr-png phone-app.png" in text
        assert "phone-app reads the QR code (zbarimg --raw) and runs wg-quick up on that config (wireguard-go)" in text
        assert "phone-app <-> nas (home LAN)" in text and "relay (plain WireGuard)" in text
        assert re.search(r"^  phone-app +ip netns exec ", text, re.M), text      # how to enter the device
        assert "phone-app runs only wg-quick + wireguard-go with " in text
        assert alive(int(pidfile.read_text()))                                  # kept: still running
    finally:
        if manifest:
            teardown_manifest(manifest.group(1))
    assert not alive(int(pidfile.read_text())), "`scenarios down` left the plain device's daemon running"
    assert netns_names() <= before


@pytest.mark.netns
def test_a_failed_wg_quick_up_fails_the_run_and_still_stops_its_daemon(monkeypatch, tmp_path):
    require_real_components("ip", "nft", "unshare")
    pidfile = tmp_path / "daemon.pid"
    monkeypatch.setattr(node_commands, "COMMANDS", fake_plain_commands(pidfile, up_extra=("fail",)))
    scenario = Scenario("home-phone", "home and a plain phone", routers=(RouterSpec("r", NatType.FULL_CONE),),
                        nodes=(NodeSpec("home", "r"), NodeSpec("phone-app", "r", kind=PLAIN, to=("home",))))
    before = netns_names()
    lines: list[str] = []
    outcome = runner.run(scenario, say=lines.append)
    assert not outcome.ok and outcome.error
    assert "`wg-quick up " in outcome.error and "failed on phone-app (1)" in outcome.error
    assert not alive(int(pidfile.read_text())), "the run left the plain device's daemon running"
    assert netns_names() <= before


@pytest.mark.netns
@pytest.mark.parametrize("change, message", [
    ({"plain_add": [PY, FAKE_PLAIN, "plain-add", "{db}", "{name}", "{png}", "{endpoint}", "fail"]},
     "`meshwg-signal plain add phone-app` failed (1): error: unknown node in --to (fake failure)"),
    ({"qr_decode": [PY, FAKE_PLAIN, "cat", os.devnull]},     # a decoder that reads nothing back
     "did not decode to the config `plain add` printed"),
])
def test_a_failed_admin_step_fails_the_run_naming_it(monkeypatch, tmp_path, change, message):
    require_real_components("ip", "nft", "unshare")
    monkeypatch.setattr(node_commands, "COMMANDS", {**fake_plain_commands(tmp_path / "pid"), **change})
    before = netns_names()
    outcome = runner.run(HOME_LAN, say=lambda line: None)
    assert outcome.error and message in outcome.error, outcome.error
    assert netns_names() <= before

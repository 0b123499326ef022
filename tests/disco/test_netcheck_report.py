"""`meshwg netcheck`'s report: the summary agrees with the fields, IPv6 reachability, progress lines, one time box.

The probes that would leave the machine (port mapping: the real gateway and the SSDP multicast group) are
replaced here; STUN goes to responders on loopback. The port-mapping probe itself: test_netcheck_portmap.py;
in a NAT lab with miniupnpd: tests/join/test_netcheck_portmap_lab.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import trio

from meshwg import cli
from meshwg.commands import mesh
from meshwg.disco import netcheck as NC
from meshwg.disco import stun
from meshwg.errors import UserError
from meshwg.io.agent import netcheck_probe, portmap_probe

EIM, APDM = "endpoint-independent", "address-and-port-dependent"
PORTMAP = {"gateway": "192.168.1.1", "protocols": ["PCP"], "natpmp": {"result": 3, "external_ip": None},
           "pcp": {"result": 0}, "upnp": None, "ssdp_answers": 0, "drops": {}}


def _args(tmp_path, *extra: str):
    return cli.parse_args(["netcheck", "--state-dir", str(tmp_path), "--interface", "ncx0", *extra])


@pytest.fixture
def no_lan_probes(monkeypatch):
    """The port-mapping probe would talk to this machine's real gateway: a canned answer instead."""
    async def fake(**kw):
        return dict(PORTMAP)
    monkeypatch.setattr(portmap_probe, "probe", fake)


def _agent_report():
    """What a running agent answers: mapping from its shared socket, no filtering verdict, its own summary."""
    rep = NC.NetcheckReport(udp=True, mapping=EIM, filtering=NC.UNKNOWN, reflexive=[("198.51.100.7", 41641)])
    return {"udp": True, "mapping": EIM, "filtering": NC.UNKNOWN, "hard": False, "reflexive": ["198.51.100.7:41641"],
            "stun_servers": ["203.0.113.1:3478"], "summary": rep.summary(),
            "relay": {"mode": "udp", "udp": ["203.0.113.1:3478"], "latency_ms": 2.0}, "relay_latency_ms": 2.0}


def _probe_result(filtering=APDM):
    return {"server": "203.0.113.1:3478", "other_address": "203.0.113.2:3479", "udp": True, "mapping": EIM,
            "filtering": filtering, "hard": False, "reflexive": ["198.51.100.7:50000"], "preserves_port": False,
            "behind_nat": True, "stun_rtt_ms": 3.0, "summary": "-", "tests": [], "send_errors": 0}


def test_json_summary_agrees_with_the_merged_filtering(tmp_path, monkeypatch, capsys, no_lan_probes):
    """The bug: the agent's summary said "filtering unknown" beside the probe's known filtering."""
    monkeypatch.setattr(mesh, "_query", lambda args, req: _agent_report())

    async def probe_servers(servers, timeout):
        return _probe_result()
    monkeypatch.setattr(netcheck_probe, "probe_servers", probe_servers)
    assert mesh.run_netcheck(_args(tmp_path, "--json")) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["filtering"] == APDM
    assert rep["summary"] == NC.summarize(rep)
    assert f"filtering {APDM}" in rep["summary"] and "filtering unknown" not in rep["summary"], rep["summary"]
    assert rep["summary"].startswith(f"mapping {EIM}, filtering {APDM}, reflexive 198.51.100.7:41641")
    assert rep["summary"].endswith("; IPv6 unknown (no IPv6 server address); port mapping PCP") or \
        rep["summary"].endswith("; IPv6 no (no global IPv6 address); port mapping PCP"), rep["summary"]


def test_the_text_prints_the_same_verdicts_as_the_json(tmp_path, monkeypatch, capsys, no_lan_probes):
    monkeypatch.setattr(mesh, "_query", lambda args, req: _agent_report())

    async def probe_servers(servers, timeout):
        return _probe_result()
    monkeypatch.setattr(netcheck_probe, "probe_servers", probe_servers)
    mesh.run_netcheck(_args(tmp_path, "--json"))
    rep = json.loads(capsys.readouterr().out)
    mesh.run_netcheck(_args(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert f"  filtering: {APDM} (RFC 5780 tests via 203.0.113.1:3478 + 203.0.113.2:3479)" in lines
    assert "  port mapping: PCP (gateway 192.168.1.1; NAT-PMP refused: network failure (3))" in lines
    assert f"  summary: {rep['summary']}" in lines
    assert any(ln.startswith("  IPv6: ") for ln in lines)


def test_summary_text_is_derived_from_each_field():
    base = {"udp": True, "mapping": EIM, "filtering": APDM, "reflexive": ["198.51.100.7:1"], "agent": True}
    assert NC.summarize(base) == f"mapping {EIM}, filtering {APDM}, reflexive 198.51.100.7:1"
    assert NC.summarize({**base, "filtering": "address-dependent"}).startswith(f"mapping {EIM}, filtering address-dep")
    assert NC.summarize({**base, "udp": False}) == "UDP blocked: relay only"
    assert NC.summarize({**base, "agent": False}).startswith("no agent running: mapping ")
    v6 = {"addresses": ["2a01:4f8::1"], "server": "[2a01:4f8::53]:3478", "udp": True, "reflexive": "[2a01:4f8::1]:5"}
    assert NC.summarize({**base, "ipv6": v6}).endswith("; IPv6 yes")
    assert NC.summarize({**base, "ipv6": {**v6, "udp": False}}).endswith(
        "; IPv6 no (no STUN answer from [2a01:4f8::53]:3478)")
    assert NC.summarize({**base, "port_mapping": {"protocols": []}}).endswith("; port mapping none")
    # NetcheckReport (the agent's) uses the same words, with IPv6 reflexive addresses in brackets.
    r = NC.NetcheckReport(udp=True, mapping=EIM, filtering=NC.UNKNOWN, reflexive=[("2001:db8::1", 7)])
    assert r.summary() == f"mapping {EIM}, filtering unknown, reflexive [2001:db8::1]:7"


def test_global_ipv6_addresses_from_proc():
    text = "\n".join([
        "fe800000000000000000000000000001 02 40 20 80 eth0",     # link-local
        "fd000000000000000000000000000001 02 40 00 80 eth0",     # ULA: global scope, not internet
        "2a0104f8000000000000000000000002 02 40 00 40 eth0",     # tentative (DAD running)
        "2a0104f8000000000000000000000003 02 40 00 08 eth0",     # DAD failed
        "2a0104f8000000000000000000000001 02 40 00 00 eth0",     # usable
        "00000000000000000000000000000001 01 80 10 80 lo",
        "zz garbage", ""])
    assert NC.global_ipv6_untrusted(text) == ["2a01:4f8::1"]


def _stun_responder(family: int, host: str):
    """A Binding responder on loopback (a thread: run_netcheck runs its own trio loop)."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, src = s.recvfrom(2048)
            except OSError:
                continue
            txid = stun.parse_binding_request_untrusted(data)
            if txid is not None:
                s.sendto(stun.build_binding_response(txid, src[:2]), src)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return s, stop, t


async def test_ipv6_stun_answers_and_reflexive_address():
    s, stop, t = _stun_responder(socket.AF_INET6, "::1")
    port = s.getsockname()[1]
    try:
        with trio.fail_after(5):
            v6 = await netcheck_probe.probe_ipv6([("127.0.0.1", 9), ("::1", port)], timeout=0.5,
                                                 addresses=["2a01:4f8::1"])
    finally:
        stop.set()
        t.join(2)
        s.close()
    assert v6["server"] == f"[::1]:{port}"
    assert v6["udp"] is True and v6["reflexive"].startswith("[::1]:"), v6
    assert NC.ipv6_verdict(v6) == "yes"


async def test_ipv6_without_a_server_address_says_so():
    with trio.fail_after(5):
        v6 = await netcheck_probe.probe_ipv6([("127.0.0.1", 9)], timeout=0.2, addresses=["2a01:4f8::1"])
    assert v6 == {"addresses": ["2a01:4f8::1"], "server": None, "udp": None, "reflexive": None}
    assert NC.ipv6_verdict(v6) == "unknown (no IPv6 server address)"
    assert NC.ipv6_verdict({**v6, "addresses": []}) == "no (no global IPv6 address)"


async def test_ipv6_server_that_does_not_answer():
    silent = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    silent.bind(("::1", 0))
    try:
        with trio.fail_after(5):
            v6 = await netcheck_probe.probe_ipv6([("::1", silent.getsockname()[1])], timeout=0.2, addresses=[])
    finally:
        silent.close()
    assert v6["udp"] is False and v6["reflexive"] is None


def test_standalone_json_reports_ipv6_and_port_mapping(tmp_path, monkeypatch, capsys, no_lan_probes):
    monkeypatch.setattr(mesh, "_query", lambda args, req: (_ for _ in ()).throw(UserError("no agent")))
    s4, stop4, t4 = _stun_responder(socket.AF_INET, "127.0.0.1")
    s6, stop6, t6 = _stun_responder(socket.AF_INET6, "::1")
    try:
        mesh.run_netcheck(_args(tmp_path, "--json", "--timeout", "0.3", "--server", f"127.0.0.1:{s4.getsockname()[1]}",
                                "--server", f"[::1]:{s6.getsockname()[1]}"))
    finally:
        for stop, t, s in ((stop4, t4, s4), (stop6, t6, s6)):
            stop.set()
            t.join(2)
            s.close()
    rep = json.loads(capsys.readouterr().out)
    assert rep["agent"] is False and rep["udp"] is True
    assert rep["ipv6"]["udp"] is True and rep["ipv6"]["reflexive"].startswith("[::1]:")
    assert rep["port_mapping"]["protocols"] == ["PCP"]
    assert rep["summary"] == NC.summarize(rep) and rep["summary"].startswith("no agent running: mapping ")
    assert "; IPv6 yes; port mapping PCP" in rep["summary"]


def test_progress_lines_on_a_terminal_only(tmp_path, monkeypatch, capsys, no_lan_probes):
    monkeypatch.setattr(mesh, "_query", lambda args, req: _agent_report())

    async def probe_servers(servers, timeout):
        return _probe_result()
    monkeypatch.setattr(netcheck_probe, "probe_servers", probe_servers)
    monkeypatch.setattr(mesh, "_progress_enabled", lambda: True)
    mesh.run_netcheck(_args(tmp_path, "--json"))
    err = capsys.readouterr().err.splitlines()
    steps = [ln for ln in err if ln.startswith("netcheck: ")]
    for what in ("asking the agent...", "NAT mapping and filtering tests...", "IPv6 reachability...",
                 "port mapping (UPnP, PCP, NAT-PMP)...", "port mapping (UPnP, PCP, NAT-PMP): done"):
        assert any(ln.startswith(f"netcheck: {what} (") for ln in steps), (what, err)
    monkeypatch.setattr(mesh, "_progress_enabled", lambda: False)
    mesh.run_netcheck(_args(tmp_path, "--json"))
    err = capsys.readouterr().err.splitlines()
    assert not [ln for ln in err if ln.startswith("netcheck: ")] and err[-1].strip().endswith(" s)"), err


def test_the_whole_netcheck_is_time_boxed(tmp_path, monkeypatch, capsys):
    """A probe that hangs (a gateway that never closes its description's connection, say) cannot hold the
    command: with --timeout 0.2 the answer comes within 3 s, the hung probe reported as unknown."""
    async def hang(**kw):
        await trio.sleep(30)
    monkeypatch.setattr(portmap_probe, "probe", hang)
    monkeypatch.setattr(mesh, "_query", lambda args, req: (_ for _ in ()).throw(UserError("no agent")))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    t0 = time.monotonic()
    try:
        mesh.run_netcheck(_args(tmp_path, "--timeout", "0.2", "--server", f"127.0.0.1:{silent.getsockname()[1]}"))
    finally:
        silent.close()
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert took < 3.0, took
    assert "  port mapping: unknown (no answer in time)" in out.splitlines(), out
    assert "  UDP: no (relay over TCP only)" in out.splitlines()


def test_stun_option_runs_rfc5780_tests_within_the_timeout(tmp_path, monkeypatch, capsys, no_lan_probes):
    """--stun against a server that answers plain Bindings only: a verdict in about a second (pystun3's
    classic mode took 17 s), its mapping fills in what the (absent) meshwg server left unknown."""
    monkeypatch.setattr(mesh, "_query", lambda args, req: (_ for _ in ()).throw(UserError("no agent")))
    s, stop, t = _stun_responder(socket.AF_INET, "127.0.0.1")
    port = s.getsockname()[1]
    t0 = time.monotonic()
    try:
        mesh.run_netcheck(_args(tmp_path, "--json", "--timeout", "0.3", "--stun", f"127.0.0.1:{port}"))
    finally:
        stop.set()
        t.join(2)
        s.close()
    took = time.monotonic() - t0
    rep = json.loads(capsys.readouterr().out)
    assert took < 3.0, took
    assert rep["stun"]["server"] == f"127.0.0.1:{port}" and rep["udp"] is True
    assert rep["reflexive"][0].startswith("127.0.0.1:")

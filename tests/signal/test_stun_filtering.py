"""NAT filtering tests against our own server: RFC 3489/5780 CHANGE-REQUEST, OTHER-ADDRESS/CHANGED-ADDRESS.

Pure layers first (codec, which socket answers, the NatProbe against simulated NATs), then the real
server on loopback with two addresses (127.0.0.1 and 127.0.0.2) against our codec, the `stun` binary,
pystun3 and `meshwg netcheck --server`. Real NATs: tests/scenarios/test_netcheck_lab.py.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from sig_helpers import require_real_components, start_server

from meshwg.signaling import relay_wire as W
from meshwg.disco import netcheck as NC
from meshwg.disco import stun
from signal_server.cli import build_parser
from signal_server.stun_responder import StunResponder, StunSocket

CIP, CPORT = stun.CHANGE_IP, stun.CHANGE_PORT
A1, A2 = "203.0.113.10", "203.0.113.11"
LAYOUT = [StunSocket((A1, 3478), False), StunSocket((A2, 3478), False),
          StunSocket((A1, 3479), True), StunSocket((A2, 3479), True)]
CLIENT = ("198.51.100.7", 40000)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- codec


def test_change_request_and_rfc5780_attributes_round_trip():
    txid = os.urandom(12)
    for change in (0, CIP, CPORT, CIP | CPORT):
        req = stun.parse_any_binding_request_untrusted(stun.build_binding_request(txid, change=change, fingerprint=True))
        assert req == stun.BindingRequest(txid, False, change)
        assert stun.parse_binding_request_untrusted(stun.build_binding_request(txid, change=change)) == txid
    with pytest.raises(ValueError):
        stun.build_binding_request(txid, change=1)
    data = stun.build_binding_response(txid, CLIENT, response_origin=(A2, 3479), other_address=(A2, 3479))
    full = stun.parse_binding_response_full_untrusted(data)
    assert full == stun.BindingResponse(txid, CLIENT, (A2, 3479), (A2, 3479))
    assert stun.parse_binding_response_untrusted(data) == (txid, CLIENT)   # the old API is unchanged
    plain = stun.parse_binding_response_full_untrusted(stun.build_binding_response(txid, CLIENT))
    assert plain.other_address is None and plain.response_origin is None
    # classic (RFC 3489): 16-byte id, CHANGED-ADDRESS stands in for OTHER-ADDRESS
    t16 = b"\x01" + os.urandom(15)
    req = stun.parse_any_binding_request_untrusted(stun.build_classic_binding_request(t16, CPORT))
    assert req == stun.BindingRequest(t16, True, CPORT)
    resp = stun.parse_classic_binding_response_untrusted(
        stun.build_classic_binding_response(t16, CLIENT, (A1, 3479), (A2, 3479)))
    assert resp == stun.BindingResponse(t16, CLIENT, (A2, 3479), (A1, 3479))
    # 3489 makes CHANGED-ADDRESS mandatory: a lone server names itself, as before
    assert stun.parse_classic_binding_response_untrusted(
        stun.build_classic_binding_response(t16, CLIENT, (A1, 3478))).other_address == (A1, 3478)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_new_parsers_never_raise(data):
    stun.parse_any_binding_request_untrusted(data)
    stun.parse_binding_response_full_untrusted(data)
    stun.parse_classic_binding_response_untrusted(data)
    StunResponder(LAYOUT).handle_untrusted(0, data, CLIENT, 0.0)


def test_truncated_and_flipped_responses_never_raise():
    data = stun.build_binding_response(os.urandom(12), CLIENT, response_origin=(A1, 3478), other_address=(A2, 3479))
    for i in range(len(data)):
        stun.parse_binding_response_full_untrusted(data[:i])
        flipped = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        stun.parse_binding_response_full_untrusted(flipped)
        stun.parse_classic_binding_response_untrusted(flipped)
    # a bad FINGERPRINT rejects the whole answer
    assert stun.parse_binding_response_full_untrusted(data[:-1] + bytes([data[-1] ^ 1])) is None


# --- which socket answers


def test_responder_layout_2x2():
    r = StunResponder(LAYOUT)
    expect = {  # receiving socket -> {flags: answering socket}
        0: {0: 0, CIP: 1, CPORT: 2, CIP | CPORT: 3},
        1: {0: 1, CIP: 0, CPORT: 3, CIP | CPORT: 2},
        2: {0: 2, CIP: 3, CPORT: 0, CIP | CPORT: 1},
        3: {0: 3, CIP: 2, CPORT: 1, CIP | CPORT: 0},
    }
    for idx, row in expect.items():
        for flags, out in row.items():
            assert r.target(idx, flags) == out, (idx, flags)
    assert r.other_address(0) == (A2, 3479) and r.other_address(3) == (A1, 3478)
    txid = os.urandom(12)
    reply, counters = r.handle_untrusted(0, stun.build_binding_request(txid, change=CIP | CPORT), CLIENT, 0.0)
    assert reply.sock == 3 and counters == ("stun_requests", "stun_change_requests")
    assert stun.parse_binding_response_full_untrusted(reply.data) == stun.BindingResponse(
        txid, CLIENT, (A2, 3479), (A2, 3479))
    t16 = b"\x02" + os.urandom(15)
    reply, counters = r.handle_untrusted(1, stun.build_classic_binding_request(t16, CPORT), CLIENT, 0.0)
    assert reply.sock == 3 and counters == ("stun_classic_requests", "stun_change_requests")
    assert stun.parse_classic_binding_response_untrusted(reply.data) == stun.BindingResponse(
        t16, CLIENT, (A1, 3479), (A2, 3479))


def test_responder_drops_changes_it_cannot_honour():
    one_addr_alt = StunResponder([StunSocket((A1, 3478), False), StunSocket((A1, 3479), True)])
    assert one_addr_alt.target(0, CPORT) == 1 and one_addr_alt.target(0, CIP) is None
    assert one_addr_alt.other_address(0) is None
    reply, counters = one_addr_alt.handle_untrusted(0, stun.build_binding_request(os.urandom(12), change=CIP), CLIENT, 0.0)
    assert reply is None and counters == ("stun_change_unsupported",)
    # a lone socket answers plain requests without OTHER-ADDRESS, and no RESPONSE-ORIGIN for a wildcard
    wild = StunResponder([StunSocket(("0.0.0.0", 3478), False), StunSocket(("0.0.0.0", 3479), True)])
    reply, _ = wild.handle_untrusted(0, stun.build_binding_request(b"x" * 12), CLIENT, 0.0)
    full = stun.parse_binding_response_full_untrusted(reply.data)
    assert full.other_address is None and full.response_origin is None and wild.target(0, CIP) is None
    # two addresses, no alternate port: change IP works, change port does not
    two = StunResponder([StunSocket((A1, 3478), False), StunSocket((A2, 3478), False)])
    assert two.target(0, CIP) == 1 and two.target(0, CPORT) is None and two.other_address(0) is None
    # families never mix, classic requests from IPv6 are dropped, junk is counted
    mixed = StunResponder([StunSocket((A1, 3478), False), StunSocket(("2001:db8::1", 3478), False)])
    assert mixed.target(0, CIP) is None
    assert StunResponder(LAYOUT).handle_untrusted(0, stun.build_classic_binding_request(b"\x03" * 16), ("::1", 5), 0.0) \
        == (None, ("stun_classic_v6_dropped",))
    assert StunResponder(LAYOUT).handle_untrusted(0, b"\x00" * 30, CLIENT, 0.0) == (None, ("udp_dropped_unknown",))


# --- the probe against simulated NATs (explicit time)


class SimNat:
    """One public IP; mapping 'eim' | 'adm' | 'apdm'; filtering 'eif' | 'adf' | 'apdf'."""

    def __init__(self, mapping: str, filtering: str, ip: str = "198.51.100.9") -> None:
        self.mapping, self.filtering, self.ip = mapping, filtering, ip
        self.ports: dict = {}
        self.owner: dict[int, int] = {}
        self.sent: set = set()

    def outbound(self, sock: int, dest) -> tuple:
        key = {"eim": sock, "adm": (sock, dest[0]), "apdm": (sock, dest)}[self.mapping]
        if key not in self.ports:
            self.ports[key] = 40000 + 7 * len(self.ports)
            self.owner[self.ports[key]] = sock
        port = self.ports[key]
        self.sent.add((port, dest[0], dest[1]))
        return self.ip, port

    def inbound(self, port: int, src) -> int | None:
        if port not in self.owner:
            return None
        ok = {"eif": True, "adf": any(p == port and ip == src[0] for p, ip, _ in self.sent),
              "apdf": (port, src[0], src[1]) in self.sent}[self.filtering]
        return self.owner[port] if ok else None


def drive(probe: NC.NatProbe, nat: SimNat, responder: StunResponder, *, loss=None, now: float = 0.0):
    by_addr = {s.addr: i for i, s in enumerate(responder.sockets)}
    while not probe.done:
        for sock, data, dest in probe.datagrams_to_send():
            if loss and loss():
                continue
            public = nat.outbound(sock, dest)
            if dest not in by_addr:
                continue
            reply, _ = responder.handle_untrusted(by_addr[dest], data, public, now)
            if reply is None:
                continue
            src = responder.sockets[reply.sock].addr
            back = nat.inbound(public[1], src)
            if back is not None and not (loss and loss()):
                probe.receive_datagram(back, reply.data, src, now + 0.001)
        if probe.done:
            break
        now = max(now + 0.001, min(probe.get_timer(), now + 10))
        probe.handle_timer(now)
    return probe.report(), now


CASES = [
    ("eim", "eif", NC.EIM, NC.EIM),          # full cone
    ("eim", "adf", NC.EIM, NC.ADM),          # restricted cone
    ("eim", "apdf", NC.EIM, NC.APDM),        # port-restricted cone (Linux masquerade)
    ("apdm", "apdf", NC.APDM, NC.APDM),      # symmetric
    ("adm", "adf", NC.ADM, NC.ADM),
]


@pytest.mark.parametrize(("mapping", "filtering", "want_map", "want_filter"), CASES)
def test_probe_classifies_simulated_nats(mapping, filtering, want_map, want_filter):
    rng = random.Random(f"{mapping}{filtering}")
    probe = NC.NatProbe((A1, 3478), 0.0, lambda n: rng.randbytes(n), timeout=1.0, local_port=5555)
    rep, end = drive(probe, SimNat(mapping, filtering), StunResponder(LAYOUT))
    assert (rep.mapping, rep.filtering) == (want_map, want_filter), [(t.name, t.answered) for t in probe.tests]
    assert probe.other == (A2, 3479) and rep.udp and rep.reflexive[0][0] == "198.51.100.9"
    assert end <= 1.1   # the unanswered filtering tests end at the timeout
    # the filtering socket never sent to the other address (that would open the NAT for it)
    assert all(t.dest == (A1, 3478) for t in probe.tests if t.sock == NC.FILTER_SOCK)


def test_probe_tests_mapping_when_the_filter_answer_arrives_first():
    # Under load the filter socket's answer can beat the mapping socket's; the mapping tests towards the
    # other address must still go out (a real lab run once reported mapping "unknown" this way).
    rng = random.Random(11)
    probe = NC.NatProbe((A1, 3478), 0.0, rng.randbytes, timeout=1.0)
    first = {sock: (data, dest) for sock, data, dest in probe.datagrams_to_send() if dest == (A1, 3478)
             and stun.parse_any_binding_request_untrusted(data).change == 0}
    responder, nat = StunResponder(LAYOUT), SimNat("eim", "eif")
    for sock in (NC.FILTER_SOCK, NC.MAP_SOCK):   # the filter answer first
        data, dest = first[sock]
        public = nat.outbound(sock, dest)
        reply, _ = responder.handle_untrusted(0, data, public, 0.01)
        probe.receive_datagram(nat.inbound(public[1], responder.sockets[reply.sock].addr), reply.data,
                               responder.sockets[reply.sock].addr, 0.01)
    assert {t.name for t in probe.tests} >= {"map_other_ip", "map_other_ip_port"}
    rep, _ = drive(probe, nat, responder, now=0.01)
    assert (rep.mapping, rep.filtering) == (NC.EIM, NC.EIM)


def test_probe_survives_loss_and_refuses_to_guess():
    rng = random.Random(7)
    drops = iter([True, True, True] + [False] * 1000)   # the first three datagrams are lost
    probe = NC.NatProbe((A1, 3478), 0.0, rng.randbytes, timeout=1.0)
    rep, _ = drive(probe, SimNat("eim", "adf"), StunResponder(LAYOUT), loss=lambda: next(drops))
    assert (rep.mapping, rep.filtering) == (NC.EIM, NC.ADM)
    assert max(t.sent for t in probe.tests) >= 2

    # a server with one address: no OTHER-ADDRESS, so no filtering verdict (silence proves nothing)
    single = StunResponder([StunSocket((A1, 3478), False), StunSocket((A1, 3479), True)])
    rep, _ = drive(NC.NatProbe((A1, 3478), 0.0, rng.randbytes), SimNat("eim", "apdf"), single)
    assert rep.udp and rep.filtering == NC.UNKNOWN and rep.mapping == NC.UNKNOWN

    class IgnoresChange(StunResponder):   # the old behaviour: answer everything from where it came
        def target(self, idx, change):
            return idx

    probe = NC.NatProbe((A1, 3478), 0.0, rng.randbytes)
    rep, _ = drive(probe, SimNat("eim", "eif"), IgnoresChange(LAYOUT))
    assert rep.filtering == NC.UNKNOWN and probe.test("filter_change_port").wrong_source

    # nothing answers: UDP blocked, done at the timeout
    rep, end = drive(NC.NatProbe((A1, 3478), 0.0, rng.randbytes, timeout=0.5), SimNat("eim", "eif"),
                     StunResponder([StunSocket(("192.0.2.1", 1), False)]))
    assert not rep.udp and end <= 0.6


def test_probe_drops_junk_and_foreign_answers():
    probe = NC.NatProbe((A1, 3478), 0.0, os.urandom)
    probe.receive_datagram(NC.MAP_SOCK, b"junk", (A1, 3478), 0.01)
    probe.receive_datagram(NC.MAP_SOCK, stun.build_binding_response(os.urandom(12), CLIENT), (A1, 3478), 0.01)
    txid = probe.test("filter").txid   # right id, wrong socket
    probe.receive_datagram(NC.MAP_SOCK, stun.build_binding_response(txid, CLIENT), (A1, 3478), 0.01)
    assert probe.drops == 3 and not any(t.answer for t in probe.tests)


# --- the real server on loopback with two addresses


def test_cli_alt_port_flag():
    p = build_parser()
    assert p.parse_args(["serve"]).stun_alt_port == "auto"
    assert p.parse_args(["serve", "--stun-alt-port", "none"]).stun_alt_port is None
    assert p.parse_args(["serve", "--stun-alt-port", "4000"]).stun_alt_port == 4000
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--stun-alt-port", "70000"])


def _free_udp_pair(host: str) -> int:
    """A port P with P and P+1 free on host (and on 127.0.0.2)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            for h in (host, "127.0.0.2"):
                for p in (port, port + 1):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as t:
                        t.bind((h, p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port pair")


async def _two_address_server(nursery, tmp_path, **kw):
    port = _free_udp_pair("127.0.0.1")
    return await start_server(nursery, tmp_path, udp=[("127.0.0.1", port), ("127.0.0.2", port)], **kw)


async def _ask(s, data: bytes, dest, timeout: float = 0.5):
    """Send once; (data, source) of the answer or None."""
    await s.sendto(data, dest)
    with trio.move_on_after(timeout):
        return await s.recvfrom(2048)
    return None


async def test_server_answers_change_requests_from_the_matching_socket(nursery, tmp_path):
    h = await _two_address_server(nursery, tmp_path)
    (ip1, p1), (ip2, p2) = h.server.bound.udp
    assert h.server.bound.stun_alt == [(ip1, p1 + 1), (ip2, p2 + 1)] and p1 == p2
    s = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await s.bind(("127.0.0.1", 0))
    me = ("127.0.0.1", s.getsockname()[1])
    want = {0: (ip1, p1), CIP: (ip2, p1), CPORT: (ip1, p1 + 1), CIP | CPORT: (ip2, p1 + 1)}
    for change, source in want.items():
        txid = os.urandom(12)
        data, src = await _ask(s, stun.build_binding_request(txid, change=change, fingerprint=True), (ip1, p1))
        assert src[:2] == source, change
        # RESPONSE-ORIGIN only when the answer comes from elsewhere than asked (answers are kept small)
        assert stun.parse_binding_response_full_untrusted(data) == stun.BindingResponse(
            txid, me, (ip2, p1 + 1), source if change else None)
    # classic requests to the alternate address: CHANGED-ADDRESS is the receiving socket's other
    t16 = b"\x05" + os.urandom(15)
    data, src = await _ask(s, stun.build_classic_binding_request(t16, CPORT), (ip2, p1 + 1))
    assert src[:2] == (ip2, p1)
    assert stun.parse_classic_binding_response_untrusted(data) == stun.BindingResponse(t16, me, (ip1, p1), (ip2, p1))
    # the relay lives on the main ports only: a relay frame to an alternate port is dropped and counted
    assert await _ask(s, W.MAGIC + b"\x01" + b"\x00" * (W.HELLO_LEN - 5), (ip1, p1 + 1), 0.2) is None
    assert h.server.counters["udp_dropped_unknown"] >= 1 and h.server.counters["stun_change_requests"] == 4
    s.close()
    h.admin.close()


async def test_alt_port_disabled_or_taken(nursery, tmp_path):
    port = _free_udp_pair("127.0.0.1")
    h = await start_server(nursery, tmp_path, udp=[("127.0.0.1", port), ("127.0.0.2", port)], stun_alt_port=None)
    assert h.server.bound.stun_alt == []
    s = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await s.bind(("127.0.0.1", 0))
    # change port cannot be honoured: silence (never an answer from the wrong place); change IP still works
    assert await _ask(s, stun.build_binding_request(os.urandom(12), change=CPORT), ("127.0.0.1", port), 0.2) is None
    _, src = await _ask(s, stun.build_binding_request(os.urandom(12), change=CIP), ("127.0.0.1", port))
    assert src[:2] == ("127.0.0.2", port) and h.server.counters["stun_change_unsupported"] == 1
    h.admin.close()
    # "auto" with port+1 taken on one address: no alternate port anywhere (all or none), server still up
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port2 = _free_udp_pair("127.0.0.1")
    blocker.bind(("127.0.0.2", port2 + 1))
    try:
        (tmp_path / "b").mkdir()
        h2 = await start_server(nursery, tmp_path / "b", udp=[("127.0.0.1", port2), ("127.0.0.2", port2)])
        assert h2.server.bound.stun_alt == [] and len(h2.server.bound.udp) == 2
        h2.admin.close()
    finally:
        blocker.close()
    s.close()


async def test_classic_clients_classify_loopback_as_open(nursery, tmp_path):
    """Before: `stun` said "Firewall" (no change-IP answer). Loopback has no NAT: both must say open."""
    require_real_components("stun")
    h = await _two_address_server(nursery, tmp_path)
    ip, port = h.server.bound.udp[0]
    r = await trio.run_process(["stun", f"{ip}:{port}", "-p", "0"], capture_stdout=True, capture_stderr=True,
                               check=False)
    primary = [line for line in r.stdout.decode().splitlines() if line.startswith("Primary:")]
    assert primary and primary[0].startswith("Primary: Open"), r.stdout.decode()

    def pystun():
        import stun as pystun3

        return pystun3.get_ip_info(source_ip="127.0.0.1", source_port=0, stun_host=ip, stun_port=port)

    verdict, ext_ip, _ = await trio.to_thread.run_sync(pystun)
    assert (verdict, ext_ip) == ("Open Internet", "127.0.0.1")
    h.admin.close()


async def test_meshwg_netcheck_standalone_against_our_server(nursery, tmp_path):
    h = await _two_address_server(nursery, tmp_path)
    ip, port = h.server.bound.udp[0]
    r = await trio.run_process([sys.executable, "-m", "meshwg", "netcheck", "--json", "--server", f"{ip}:{port}",
                                "--interface", "nc-none0", "--state-dir", str(tmp_path)],
                               capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(r.stdout)
    assert (rep["mapping"], rep["filtering"]) == (NC.EIM, NC.EIM), rep
    assert rep["udp"] and not rep["hard"] and rep["nat_probe"]["behind_nat"] is False
    assert rep["nat_probe"]["other_address"] == f"127.0.0.2:{port + 1}"
    assert rep["reflexive"][0].startswith("127.0.0.1:") and rep["stun_rtt_ms"] < 100
    assert all(t["answered"] for t in rep["nat_probe"]["tests"])

    # No agent, no --server: the STUN addresses of the last welcome in the state dir's cache, else an error.
    argv = [sys.executable, "-m", "meshwg", "netcheck", "--interface", "nc-none0", "--state-dir", str(tmp_path)]
    r = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    assert r.returncode != 0 and b"no meshwg agent" in r.stderr
    from meshwg.io.agent.agent_state import save_cache

    save_cache(str(tmp_path), {"stun": [[ip, port], ["127.0.0.2", port]]}, [])
    r = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode()
    assert "filtering: endpoint-independent (RFC 5780 tests via" in text and "no NAT" in text, text
    h.admin.close()

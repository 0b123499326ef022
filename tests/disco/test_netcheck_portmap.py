"""Port-mapping wire formats (meshwg.disco.portmap) and the probe shell against a loopback gateway.

Recorded answers are miniupnpd 2.3.1's (Debian's miniupnpd-nftables) in the NAT lab of
tests/join/test_netcheck_portmap_lab.py, whose outside address is private: NAT-PMP answers "network failure".
"""

from __future__ import annotations

import struct

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from meshwg.disco import portmap as PM
from meshwg.io.agent import portmap_probe

# miniupnpd 2.3.1, recorded: NAT-PMP external address (result 3: its WAN address is private), PCP ANNOUNCE.
MINIUPNPD_NATPMP = bytes.fromhex("008000030000705f00000000")
MINIUPNPD_PCP_ANNOUNCE = bytes.fromhex("02800000000000000000705f000000000000000000000000")
MINIUPNPD_SSDP = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                  b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
                  b"USN: uuid:3a1a6a1e-0000-4000-8000-00000000beef::urn:schemas-upnp-org:device:InternetGatewayDevice:1"
                  b"\r\nEXT:\r\nSERVER: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
                  b"LOCATION: http://192.168.1.1:40955/rootDesc.xml\r\n\r\n")
DESCRIPTION = (b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n\r\n<?xml version=\"1.0\"?><root>"
               b"<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType><deviceList>"
               b"<device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType><serviceList><service>"
               b"<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType></service></serviceList>"
               b"</device></deviceList></device></root>")
# A NAT-PMP success (RFC 6886 3.2): epoch 1000, external 203.0.113.7.
NATPMP_OK = bytes((0, 128)) + struct.pack("!HI", 0, 1000) + bytes((203, 0, 113, 7))


def test_requests_match_the_rfcs():
    assert PM.natpmp_external_request() == b"\x00\x00"
    req = PM.pcp_announce_request("192.168.1.2")
    assert len(req) == 24 and req[:8] == bytes((2, 0, 0, 0, 0, 0, 0, 0))
    assert req[8:] == b"\0" * 10 + b"\xff\xff" + bytes((192, 168, 1, 2))   # IPv4-mapped (RFC 6887 5)
    search = PM.ssdp_search().decode()
    assert search.startswith("M-SEARCH * HTTP/1.1\r\n") and 'MAN: "ssdp:discover"' in search
    assert search.endswith("\r\n\r\n") and "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1" in search


def test_recorded_miniupnpd_answers_parse():
    ans = PM.parse_natpmp_untrusted(MINIUPNPD_NATPMP)
    assert (ans.result, ans.epoch, ans.external_ip) == (3, 0x705F, None)
    assert PM.parse_natpmp_untrusted(NATPMP_OK) == PM.NatPmpAnswer(0, 1000, "203.0.113.7")
    assert PM.parse_pcp_untrusted(MINIUPNPD_PCP_ANNOUNCE) == PM.PcpAnswer(0, 0x705F)
    ssdp = PM.parse_ssdp_untrusted(MINIUPNPD_SSDP)
    assert ssdp.location == "http://192.168.1.1:40955/rootDesc.xml" and "MiniUPnPd" in ssdp.server
    assert PM.is_igd_description_untrusted(DESCRIPTION)


def test_answers_of_the_wrong_kind_are_refused():
    assert PM.parse_natpmp_untrusted(MINIUPNPD_PCP_ANNOUNCE) is None       # version 2 is PCP
    assert PM.parse_pcp_untrusted(MINIUPNPD_NATPMP) is None                # version 0 is NAT-PMP
    assert PM.parse_natpmp_untrusted(NATPMP_OK[:11]) is None               # success without the address
    assert PM.parse_natpmp_untrusted(b"\x00\x00" + NATPMP_OK[2:]) is None  # a request, not a response
    assert PM.parse_pcp_untrusted(b"\0" + MINIUPNPD_PCP_ANNOUNCE[1:]) is None   # 24 bytes, but version 0
    assert PM.parse_pcp_untrusted(MINIUPNPD_PCP_ANNOUNCE[:20]) is None
    assert PM.parse_pcp_untrusted(MINIUPNPD_PCP_ANNOUNCE + b"\0\0") is None   # not a multiple of 4
    assert PM.parse_ssdp_untrusted(MINIUPNPD_SSDP.replace(b"200 OK", b"404 NF")) is None
    assert PM.parse_ssdp_untrusted(MINIUPNPD_SSDP.replace(b"LOCATION", b"X-LOC")) is None
    assert not PM.is_igd_description_untrusted(DESCRIPTION.replace(b"WANIPConnection", b"Layer3Forwarding"))
    assert not PM.is_igd_description_untrusted(DESCRIPTION.replace(b"200 OK", b"500 Oops"))


def test_the_description_is_fetched_only_from_the_device_that_answered():
    assert PM.description_target("http://192.168.1.1:40955/rootDesc.xml", "192.168.1.1") == \
        ("192.168.1.1", 40955, "/rootDesc.xml")
    assert PM.description_target("http://192.168.1.9:40955/rootDesc.xml", "192.168.1.1") is None
    assert PM.description_target("http://example.com/rootDesc.xml", "192.168.1.1") is None
    assert PM.description_target("https://192.168.1.1/x", "192.168.1.1") is None
    assert PM.description_target("http://192.168.1.1:99999/x", "192.168.1.1") is None
    assert PM.description_target("http://192.168.1.1/a b", "192.168.1.1") is None


def test_findings_name_only_what_would_map_and_count_the_rest():
    f = PM.PortMapFindings()
    f.on_natpmp(MINIUPNPD_NATPMP, "192.168.1.1", "192.168.1.1")
    f.on_pcp(MINIUPNPD_PCP_ANNOUNCE, "192.168.1.1", "192.168.1.1")
    f.on_pcp(MINIUPNPD_PCP_ANNOUNCE, "192.168.1.66", "192.168.1.1")   # not the gateway
    f.on_natpmp(NATPMP_OK, "192.168.1.66", "192.168.1.1")             # a LAN neighbour, not the gateway
    f.on_natpmp(b"junk", "192.168.1.1", "192.168.1.1")
    assert f.protocols() == ["PCP"]                                    # NAT-PMP answered but refused
    assert f.drops == {"pcp": 1, "natpmp": 2}
    assert f.on_ssdp(MINIUPNPD_SSDP, "192.168.1.1") is not None
    assert f.on_ssdp(MINIUPNPD_SSDP, "192.168.1.1") is None             # once per device
    assert f.on_ssdp(MINIUPNPD_SSDP, "192.168.1.7") is None             # LOCATION names another host
    f.on_description(DESCRIPTION, "192.168.1.1")
    assert f.protocols() == ["UPnP", "PCP"]
    d = f.as_dict("192.168.1.1")
    assert PM.portmap_text(d) == "UPnP, PCP (gateway 192.168.1.1; NAT-PMP refused: network failure (3))"
    assert PM.portmap_text(None) == "unknown (no answer in time)"
    assert PM.portmap_text(PM.PortMapFindings().as_dict(None)) == "none"


def test_pcp_probe_answered_by_a_natpmp_only_gateway_is_not_pcp():
    f = PM.PortMapFindings()
    f.on_pcp(bytes((0, 128, 0, 1, 0, 0, 0, 9)), "10.0.0.1", "10.0.0.1")   # RFC 6887 9: "unsupported version"
    assert f.pcp is None and f.pcp_seen_natpmp_reply and f.protocols() == [] and not f.drops


def test_default_gateway_from_proc_net_route():
    text = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
            "eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
            "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert PM.default_gateway_untrusted(text) == "192.168.1.1"
    assert PM.default_gateway_untrusted(text.splitlines()[0] + "\neth0\t00000000\tzz\t0003\n") is None
    assert PM.default_gateway_untrusted("") is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1200), st.sampled_from(["10.0.0.1", "10.0.0.2"]))
def test_untrusted_input_never_raises(data, src):
    f = PM.PortMapFindings()
    f.on_natpmp(data, src, "10.0.0.1")
    f.on_pcp(data, src, "10.0.0.1")
    f.on_ssdp(data, src)
    f.on_description(data, src)
    PM.parse_natpmp_untrusted(data), PM.parse_pcp_untrusted(data), PM.parse_ssdp_untrusted(data)
    PM.default_gateway_untrusted(data.decode("latin-1"))
    PM.description_target(data.decode("latin-1"), src)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=12))
def test_any_12_bytes_after_a_natpmp_header_parse_or_drop(tail):
    data = bytes((0, 128)) + tail[2:]
    ans = PM.parse_natpmp_untrusted(data)
    assert ans is not None and (ans.external_ip is not None) == (ans.result == 0)


# --- the shell against a loopback gateway: NAT-PMP/PCP responder, SSDP responder, HTTP description server.

async def _gateway(task_status=trio.TASK_STATUS_IGNORED, *, natpmp=NATPMP_OK, pcp=MINIUPNPD_PCP_ANNOUNCE,
                   seen=None):
    pmp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    ssdp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await pmp.bind(("127.0.0.1", 0))
    await ssdp.bind(("127.0.0.1", 0))
    http = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    http_port = http.socket.getsockname()[1]
    seen = seen if seen is not None else []

    async def serve_pmp():
        while True:
            data, src = await pmp.recvfrom(2048)
            seen.append(data)
            if data[0] == 0 and natpmp is not None:
                await pmp.sendto(natpmp, src)
            elif data[0] == 2 and pcp is not None:
                await pmp.sendto(pcp, src)

    async def serve_ssdp():
        while True:
            data, src = await ssdp.recvfrom(2048)
            if data.startswith(b"M-SEARCH"):
                await ssdp.sendto(MINIUPNPD_SSDP.replace(b"192.168.1.1:40955", f"127.0.0.1:{http_port}".encode()),
                                  src)

    async def serve_http(stream):
        async with stream:
            req = await stream.receive_some(4096)
            seen.append(req)
            await stream.send_all(DESCRIPTION)

    async with trio.open_nursery() as n:
        n.start_soon(serve_pmp)
        n.start_soon(serve_ssdp)
        n.start_soon(trio.serve_listeners, serve_http, [http])
        task_status.started((pmp.getsockname()[1], ssdp.getsockname()[1]))


async def test_probe_names_every_protocol_a_loopback_gateway_answers_and_ends_early():
    seen = []
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            pmp_port, ssdp_port = await n.start(lambda task_status: _gateway(task_status, seen=seen))
            t0 = trio.current_time()
            rep = await portmap_probe.probe(gateway="127.0.0.1", natpmp_port=pmp_port,
                                            ssdp_dest=("127.0.0.1", ssdp_port), timeout=3.0)
            took = trio.current_time() - t0
            n.cancel_scope.cancel()
    assert rep["protocols"] == ["UPnP", "PCP", "NAT-PMP"], rep
    assert rep["natpmp"] == {"result": 0, "external_ip": "203.0.113.7"} and rep["gateway"] == "127.0.0.1"
    assert rep["upnp"]["device"] == "127.0.0.1" and "MiniUPnPd" in rep["upnp"]["server"]
    assert took < 1.0   # everything answered: no waiting out the 3 s box
    assert any(r.startswith(b"GET /rootDesc.xml HTTP/1.1\r\n") for r in seen)


async def test_probe_is_time_boxed_when_nothing_answers():
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            pmp_port, _ = await n.start(lambda task_status: _gateway(task_status, natpmp=None, pcp=None))
            silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await silent.bind(("127.0.0.1", 0))
            t0 = trio.current_time()
            rep = await portmap_probe.probe(gateway="127.0.0.1", natpmp_port=pmp_port,
                                            ssdp_dest=silent.getsockname(), timeout=0.5)
            took = trio.current_time() - t0
            silent.close()
            n.cancel_scope.cancel()
    assert rep["protocols"] == [] and rep["natpmp"] is None and rep["upnp"] is None
    assert 0.4 < took < 1.5

"""Review (hostile LAN and Internet) of the port-mapping probe: an SSDP answer makes us open a TCP connection and
send a GET, so who may answer, and how many, is bounded."""

from __future__ import annotations

from meshwg.disco import portmap as PM


def ssdp(location: str) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            b"LOCATION: " + location.encode() + b"\r\n\r\n")


def test_an_answer_from_outside_the_lan_is_not_fetched():
    """The SSDP socket listens on every address: a datagram from the Internet (or a LAN spoofer naming a public
    host) must not make us connect out to a host of its choosing."""
    f = PM.PortMapFindings()
    assert f.on_ssdp(ssdp("http://93.184.216.34:80/rootDesc.xml"), "93.184.216.34") is None
    assert f.on_ssdp(ssdp("http://8.8.8.8:53/x"), "8.8.8.8") is None
    assert f.on_ssdp(ssdp("http://100.64.0.7:80/x"), "100.64.0.7") is None   # shared (CGNAT / mesh) space
    assert PM.description_target("http://93.184.216.34/rootDesc.xml", "93.184.216.34") is None
    assert f.drops.get("ssdp") == 3 and not f.ssdp
    # the LAN's gateway (and a device on a private or link-local address) still is
    assert f.on_ssdp(ssdp("http://192.168.1.1:40955/rootDesc.xml"), "192.168.1.1") is not None
    assert f.on_ssdp(ssdp("http://169.254.1.1:5000/d.xml"), "169.254.1.1") is not None


def test_a_flood_of_ssdp_responders_starts_few_fetches():
    """Each new responder gets one GET: a LAN host spoofing thousands of sources must not make us open thousands
    of connections within the probe's second."""
    f = PM.PortMapFindings()
    started = sum(f.on_ssdp(ssdp(f"http://10.1.{i // 250}.{i % 250 + 1}:80/d.xml"), f"10.1.{i // 250}.{i % 250 + 1}")
                  is not None for i in range(1000))
    assert started <= 8
    assert f.drops.get("ssdp_too_many", 0) >= 992

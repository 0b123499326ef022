"""Plain peers' configs carry `DNS = <node>, <domain>` when the server has a mesh domain (issue 15, names): the
device asks that node (the exit node, else its first target) for names; wg-quick's parser reads the line back as
a nameserver and a search domain. Without a domain, no line."""

from __future__ import annotations

from meshwg.config import wgquick
from meshwg.wg import crypto
from signal_server.plain_config import TargetNode, render_config

SK = crypto.clamp(bytes(range(1, 33)))
HOME = TargetNode("home", crypto.dh_pub(crypto.clamp(b"\x21" * 32)), ["100.64.0.1/32"])


def test_dns_line_with_a_domain():
    text = render_config(name="phone", addresses=["100.64.0.9/32"], targets=[HOME], server_endpoint=("203.0.113.1", 51820),
                         private_key=SK, dns=("100.64.0.1", "mesh.internal"))
    assert "\nDNS = 100.64.0.1, mesh.internal\n" in text
    cfg = wgquick.parse(text)
    assert [str(d) for d in cfg.interface.dns] == ["100.64.0.1"] and cfg.interface.dns_search == ["mesh.internal"]


def test_no_dns_line_without_a_domain():
    text = render_config(name="phone", addresses=["100.64.0.9/32"], targets=[HOME], server_endpoint=("203.0.113.1", 51820),
                         private_key=SK)
    assert "DNS" not in text

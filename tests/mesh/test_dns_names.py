"""meshwg.mesh.dns_names (issue 15, names): what a node answers, decided on parsed queries, on explicit time.
The wire codec (dnslib) is meshwg.io.agent.dns_server's: these tests go through it for the full bytes-in,
bytes-out behaviour."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from meshwg.control.events import PeerInfo, Welcome
from meshwg.io.agent.dns_server import FORWARD, answer_untrusted
from meshwg.mesh import dns_names as D

WELCOME = Welcome(1, "alpha", "100.64.0.1", "fd7a::1", "100.64.0.0/10", "fd7a::/48", (), (), (), 10.0, b"k" * 32)
PEERS = [PeerInfo(b"b" * 32, 2, "beta", "100.64.0.2", "fd7a::2", (), True),
         PeerInfo(b"c" * 32, 3, "phone", "100.64.0.3", "fd7a::3", (), True, kind="plain"),
         PeerInfo(b"d" * 32, 4, "alpha", "100.64.0.4", "fd7a::4", (), True),       # our own name, claimed again
         PeerInfo(b"e" * 32, 5, "bad_name", "100.64.0.5", "fd7a::5", (), True)]    # no DNS label: no record


def resolver(**kw) -> D.Resolver:
    return D.Resolver(D.table_from("mesh.internal", WELCOME, PEERS), **kw)


def ask(r, name, qtype="A", src="100.64.0.1", now=0.0):
    out = answer_untrusted(r, DNSRecord.question(name, qtype).pack(), src, now)
    return out if out is None or out == FORWARD else DNSRecord.parse(out)


def rcode(reply) -> str:
    return RCODE[reply.header.rcode]


def test_a_and_aaaa_of_a_peer_and_of_this_node():
    r = resolver()
    assert [str(x.rdata) for x in ask(r, "beta.mesh.internal").rr] == ["100.64.0.2"]
    assert [str(x.rdata) for x in ask(r, "beta.mesh.internal", "AAAA").rr] == ["fd7a::2"]
    assert [str(x.rdata) for x in ask(r, "alpha.mesh.internal").rr] == ["100.64.0.1"]   # ours, not the duplicate's
    assert ask(r, "beta.mesh.internal").header.aa == 1
    assert sorted(str(x.rdata) for x in ask(r, "beta.mesh.internal", "ANY").rr) == ["100.64.0.2", "fd7a::2"]


def test_case_insensitive_and_the_question_echoed_as_asked():
    reply = ask(resolver(), "BeTa.MeSh.InTeRnAl.")
    assert [str(x.rdata) for x in reply.rr] == ["100.64.0.2"]
    assert str(reply.rr[0].rname) == "BeTa.MeSh.InTeRnAl."   # 0x20-randomising resolvers compare the case


def test_ptr_for_mesh_addresses():
    r = resolver()
    assert [str(x.rdata) for x in ask(r, "2.0.64.100.in-addr.arpa", "PTR").rr] == ["beta.mesh.internal."]
    v6 = ipaddress.ip_address("fd7a::2").reverse_pointer
    assert [str(x.rdata) for x in ask(r, v6, "PTR").rr] == ["beta.mesh.internal."]
    assert rcode(ask(r, "99.0.64.100.in-addr.arpa", "PTR")) == "NXDOMAIN"   # in the mesh prefix, nobody's
    assert rcode(ask(r, "1.1.1.1.in-addr.arpa", "PTR")) == "REFUSED"        # not ours to answer
    assert rcode(ask(r, "64.100.in-addr.arpa", "PTR")) == "REFUSED"         # a partial reverse name


def test_nxdomain_for_unknown_names_under_the_domain_with_the_soa():
    r = resolver()
    for name in ("nobody.mesh.internal", "x.beta.mesh.internal", "bad_name.mesh.internal"):
        reply = ask(r, name)
        assert rcode(reply) == "NXDOMAIN" and not reply.rr, name
        assert [QTYPE[a.rtype] for a in reply.auth] == ["SOA"]
    nodata = ask(r, "beta.mesh.internal", "MX")      # the name exists: NOERROR, no records
    assert rcode(nodata) == "NOERROR" and not nodata.rr and nodata.auth
    assert rcode(ask(r, "mesh.internal")) == "NOERROR"


@pytest.mark.parametrize("name", ["example.com", "beta.mesh.internal.evil.example", "evilmesh.internal",
                                  "beta.internal", "internal", "."])
def test_refused_outside_the_domain(name):
    r = resolver()
    reply = ask(r, name)
    assert rcode(reply) == "REFUSED" and not reply.rr
    assert r.counters["dns_rcode_refused"] == 1


def test_names_off_refuses_everything():
    r = D.Resolver(D.table_from("", WELCOME, PEERS))
    assert rcode(ask(r, "beta.mesh.internal", src="127.0.0.1")) == "REFUSED"
    assert rcode(ask(r, "2.0.64.100.in-addr.arpa", "PTR", src="127.0.0.1")) == "REFUSED"
    assert ask(r, "beta.mesh.internal") is None   # no mesh prefix known: no mesh source either (dropped)


def test_only_plain_peers_queries_outside_the_domain_are_forwarded():
    r = resolver()
    assert ask(r, "example.com", src="100.64.0.3") == FORWARD          # the phone: its DNS line sends everything
    assert rcode(ask(r, "example.com", src="100.64.0.2")) == "REFUSED"  # a node: no open resolver
    assert ask(r, "example.com", src="192.0.2.7") is None   # outside the mesh: dropped, not even REFUSED
    assert [str(x.rdata) for x in ask(r, "beta.mesh.internal", src="100.64.0.3").rr] == ["100.64.0.2"]
    assert rcode(ask(resolver(forward=False), "example.com", src="100.64.0.3")) == "REFUSED"   # no upstream


def test_per_source_rate_limit_drops_and_counts():
    r = resolver()
    answered = sum(ask(r, "beta.mesh.internal", now=5.0) is not None for _ in range(150))
    assert answered == 100 and r.counters["dns_drop_rate"] == 50       # the burst, at one instant
    assert ask(r, "beta.mesh.internal", src="100.64.0.2", now=5.0) is not None   # another source has its own
    assert ask(r, "beta.mesh.internal", now=6.0) is not None           # refilled a second later


def test_domain_names_validated():
    assert D.normalize_domain("Mesh.Internal.") == "mesh.internal"
    assert D.normalize_domain("corp") == "corp"
    for bad in ("", "a..b", "-a.b", "a_b.c", "a.b-", "x" * 64 + ".b", "1.2.3.4", "a b", ".", "é.com"):
        assert D.normalize_domain(bad) is None, bad
    assert D.dns_domain_untrusted(None) == "" and D.dns_domain_untrusted(7) == ""
    assert D.dns_domain_untrusted("evil..name") == "" and D.dns_domain_untrusted("Home.Arpa") == "home.arpa"


def test_upstreams_from_resolv_conf():
    text = ("# comment\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver junk\nsearch lan\n"
            "nameserver 100.64.0.1\nnameserver 10.0.0.54\nnameserver 10.0.0.55\n")
    assert D.upstreams_from_resolv_conf(text, exclude=("100.64.0.1",)) == ("10.0.0.53", "fe80::1", "10.0.0.54")

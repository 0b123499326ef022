"""Hypothesis strategies for wg-quick configs, shared by the config tests."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from meshwg.config import keys, wgquick
from meshwg.config.wgquick import Endpoint, InterfaceConfig, PeerConfig, WgQuickConfig

_comment_text = st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=20)
_comment = _comment_text.map(lambda t: ("#" + t).strip())
_key32 = st.binary(min_size=32, max_size=32)
_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
_ip = st.one_of(_v4, _v6)
_iface_addr = _ip.flatmap(lambda ip: st.integers(0, ip.max_prefixlen).map(lambda n: ipaddress.ip_interface(f"{ip}/{n}")))
_network = _ip.flatmap(lambda ip: st.integers(0, ip.max_prefixlen).map(lambda n: ipaddress.ip_network(f"{ip}/{n}", strict=False)))
_label = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,8}[a-z0-9_])?", fullmatch=True)
_hostname = st.lists(_label, min_size=1, max_size=3).map(".".join).filter(lambda h: not all(c in "0123456789." for c in h))
_hook = st.text(alphabet=st.characters(blacklist_characters="\n#", blacklist_categories=("Cs",)), max_size=30).map(str.strip)
_ip_endpoint = st.builds(Endpoint, st.one_of(_v4.map(str), _v6.map(str)), st.integers(1, 65535))
_endpoint = st.one_of(_ip_endpoint, st.builds(Endpoint, _hostname, st.integers(1, 65535)))


@st.composite
def _with_comments(draw, obj, header):
    names = [header, *(canon for canon, _ in wgquick._lines(obj))]
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        obj.comments[name] = draw(st.lists(_comment, min_size=1, max_size=2))
    return obj


@st.composite
def configs(draw, hostnames: bool = True):
    """Valid WgQuickConfig objects (comments only where formatting keeps them in place)."""
    iface = InterfaceConfig(
        private_key=draw(_key32),
        listen_port=draw(st.none() | st.integers(0, 65535)),
        fwmark=draw(st.none() | st.integers(0, 2**32 - 1)),
        addresses=draw(st.lists(_iface_addr, max_size=3)),
        dns=draw(st.lists(_ip, max_size=2)),
        dns_search=draw(st.lists(_hostname, max_size=2)),
        table=draw(st.none() | st.sampled_from(["off", "auto", "main", "1234", "0"])),
        mtu=draw(st.none() | st.integers(68, 65535)),
        pre_up=draw(st.lists(_hook, max_size=2)),
        post_up=draw(st.lists(_hook, max_size=2)),
        pre_down=draw(st.lists(_hook, max_size=2)),
        post_down=draw(st.lists(_hook, max_size=2)),
        save_config=draw(st.none() | st.booleans()),
    )
    iface = draw(_with_comments(iface, "[Interface]"))
    own = keys.public_key(iface.private_key)
    peers = []
    for pk in draw(st.lists(_key32.filter(lambda k: k != own), max_size=3, unique=True)):
        peer = PeerConfig(
            public_key=pk,
            preshared_key=draw(st.none() | _key32),
            allowed_ips=draw(st.lists(_network, max_size=3)),
            endpoint=draw(st.none() | (_endpoint if hostnames else _ip_endpoint)),
            persistent_keepalive=draw(st.none() | st.integers(0, 65535)),
        )
        peers.append(draw(_with_comments(peer, "[Peer]")))
    trailing = draw(st.lists(_comment, max_size=2))
    return WgQuickConfig(interface=iface, peers=peers, trailing_comments=trailing)

"""Property tests: parsers and the core never raise on network bytes; allowed-IPs agrees with a naive table."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from wg_pair import A_ADDR, Pair

from meshwg.wg import messages
from meshwg.wg.allowed_ips import AllowedIPs

_established = Pair(seed=7)
_established.send_a()
_established.send_b()
_VALID = [d for _, _, d in _established.sent]


@given(st.binary(max_size=300))
def test_parse_untrusted_never_raises(data):
    msg = messages.parse_untrusted(data)
    if msg is not None:
        assert messages.encode(msg) == data


@settings(max_examples=300)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda t, rest: bytes([t, 0, 0, 0]) + rest, st.integers(1, 4), st.binary(max_size=200)),
    st.builds(lambda i, pos, x: _mutate(_VALID[i % len(_VALID)], pos, x),
              st.integers(0, 100), st.integers(0, 2000), st.integers(1, 255)),
))
def test_receive_random_bytes_never_raises(data):
    core = _established.b
    before = sum(core.drops.values())
    core.receive_datagram(data, ("203.0.113.1", 9), _established.now)
    core.datagrams_to_send()
    assert core.tun_packets_to_write() == []
    core.pop_events()
    # Every input here is bad (a replay at best): exactly one drop counted, whatever the reason.
    assert sum(core.drops.values()) == before + 1
    assert _established.pb.endpoint == A_ADDR  # no unauthenticated roaming


def _mutate(data: bytes, pos: int, x: int) -> bytes:
    b = bytearray(data)
    b[pos % len(b)] ^= x
    return bytes(b)


def _naive(entries, addr):
    best = None
    for net, peer in entries.items():
        if addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, peer)
    return best[1] if best else None


v4_net = st.builds(lambda a, l: ipaddress.ip_network((a, l), strict=False),
                   st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_net = st.builds(lambda a, l: ipaddress.ip_network((a, l), strict=False),
                   st.integers(0, 2**128 - 1), st.integers(0, 128))


@settings(max_examples=200)
@given(st.lists(st.tuples(st.one_of(v4_net, v6_net), st.integers(0, 4), st.booleans()), max_size=40),
       st.lists(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                          st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)), max_size=30))
def test_allowed_ips_matches_naive_longest_prefix(ops, probes):
    table, naive = AllowedIPs(), {}
    peers = [object() for _ in range(5)]
    for net, who, insert in ops:
        if insert:
            table.insert(net, peers[who])
            naive[net] = peers[who]
        elif table.remove(net):
            del naive[net]
        else:
            assert net not in naive
        # probe inside every network too, so matches are exercised, not only misses
    for addr in probes + [n.network_address for n in naive] + [n.broadcast_address for n in naive]:
        assert table.lookup(addr) is _naive(naive, addr)
    for peer in peers:
        assert sorted(map(str, table.networks_of(peer))) == sorted(str(n) for n, p in naive.items() if p is peer)

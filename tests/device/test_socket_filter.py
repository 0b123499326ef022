"""The kernel socket filter: it passes what the demultiplexer and the core can use (a handshake
message may have more bytes behind it: a GRO-coalesced read), and nothing else.

Real sockets on loopback (IPv4 and IPv6), the real kernel running the program. Each datagram is
followed by a sentinel (a relay frame, always accepted); loopback keeps order, so whether the datagram
arrived before the sentinel is the kernel's verdict, with no timeout to guess.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_real_components  # tests/conftest.py
from meshwg.io.dataplane import socket_filter, udp
from meshwg.mesh.demux import UNKNOWN, WIREGUARD_EXACT_SIZES, classify
from meshwg.wg.device import WireGuardCore
from scenarios.netns import Netns, unique_name

TAG = 0xBEEF
SENTINEL = b"\xffMWR sentinel"
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)


def _index(tag: int, low: int = 0x1234) -> bytes:
    return ((tag << 16) | low).to_bytes(4, "little")


def expected_verdict(data: bytes, tag: int) -> bool:
    """What the filter must do: what classify accepts, minus WireGuard replies and data naming another tag.
    A handshake message is judged by its own size, whatever follows it (a coalesced read)."""
    if data[:1] and 1 <= data[0] <= 3 and data[1:4] == b"\0\0\0":
        data = data[:WIREGUARD_EXACT_SIZES[data[0]]]
    if classify(data) == UNKNOWN:
        return False
    index_at = {2: 8, 3: 4, 4: 4}.get(data[0]) if data[1:4] == b"\0\0\0" else None
    return index_at is None or data[index_at + 2:index_at + 4] == tag.to_bytes(2, "little")


class FilteredPair:
    def __init__(self, family: int, tag: int | None = TAG):
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.rx = socket.socket(family, socket.SOCK_DGRAM)
        self.tx = socket.socket(family, socket.SOCK_DGRAM)
        self.rx.bind((host, 0))
        self.rx.settimeout(2)
        socket_filter.attach(self.rx, socket_filter.program(tag))
        self.addr = self.rx.getsockname()[:2]

    def passes(self, data: bytes) -> bool:
        self.tx.sendto(data, self.addr)
        self.tx.sendto(SENTINEL, self.addr)
        got = []
        while (pkt := self.rx.recv(65535)) != SENTINEL:
            got.append(pkt)
        assert got in ([], [data])
        return got == [data]

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def pair(request):
    p = FilteredPair(request.param)
    yield p
    p.close()


CASES = {
    "initiation": (b"\x01\0\0\0" + os.urandom(144), True),
    "initiation, one byte short": (b"\x01\0\0\0" + os.urandom(143), False),
    # What GRO hands over when a peer sends an initiation and a discovery ping back to back.
    "initiation, then a coalesced discovery ping": (b"\x01\0\0\0" + os.urandom(144) + b"MWDsco" + os.urandom(126), True),
    "response, then a coalesced transport message": (b"\x02\0\0\0" + os.urandom(4) + _index(TAG) + os.urandom(80)
                                                     + b"\x04\0\0\0" + _index(TAG) + os.urandom(40), True),
    "initiation, reserved byte set": (b"\x01\0\1\0" + os.urandom(144), False),
    "response to our index": (b"\x02\0\0\0" + os.urandom(4) + _index(TAG) + os.urandom(80), True),
    "response to a foreign index": (b"\x02\0\0\0" + os.urandom(4) + _index(TAG ^ 1) + os.urandom(80), False),
    "cookie reply to our index": (b"\x03\0\0\0" + _index(TAG) + os.urandom(56), True),
    "cookie reply to a foreign index": (b"\x03\0\0\0" + _index(0x0102) + os.urandom(56), False),
    "keepalive": (b"\x04\0\0\0" + _index(TAG) + os.urandom(24), True),
    # 1420-byte packet padded only up to the MTU: 1452 bytes, not a multiple of 16.
    "full-MTU transport": (b"\x04\0\0\0" + _index(TAG) + os.urandom(8 + 1420 + 16), True),
    "transport to a foreign index": (b"\x04\0\0\0" + _index(0xBEEE) + os.urandom(1000), False),
    "transport, too short": (b"\x04\0\0\0" + _index(TAG) + os.urandom(23), False),
    "STUN binding response": (b"\x01\x01\0\x0c" + struct.pack("!I", 0x2112A442) + os.urandom(24), True),
    "STUN-like, wrong cookie": (b"\x01\x01\0\x0c" + os.urandom(28), False),
    "discovery": (b"MWDsco" + os.urandom(80), True),
    "relay frame": (b"\xffMWR" + os.urandom(80), True),
    "three bytes": (b"\x04\0\0", False),
    "empty": (b"", False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_filter_verdicts(pair, name):
    data, accepted = CASES[name]
    assert expected_verdict(data, TAG) == accepted, "the table disagrees with the reference rule"
    assert pair.passes(data) == accepted


def test_without_a_tag_every_index_passes():
    untagged = FilteredPair(socket.AF_INET, tag=None)
    try:
        assert untagged.passes(b"\x04\0\0\0" + _index(0x0102) + os.urandom(40))
        assert untagged.passes(b"\x02\0\0\0" + os.urandom(4) + _index(0x0102) + os.urandom(80))
        assert not untagged.passes(os.urandom(1) + b"junk that fits no protocol")
    finally:
        untagged.close()


_wireguard_like = st.builds(
    lambda kind, reserved, index, rest: bytes([kind]) + reserved + index + rest,
    st.integers(1, 4), st.sampled_from([b"\0\0\0", b"\0\1\0"]),
    st.sampled_from([_index(TAG), _index(TAG ^ 0x100), os.urandom(4)]), st.binary(max_size=200))
_sized_handshakes = st.builds(
    lambda kind, index, body: bytes([kind, 0, 0, 0]) + (body[:4] + index if kind == 2 else index) + body,
    st.integers(1, 3), st.sampled_from([_index(TAG), _index(0xBEEE)]), st.binary(min_size=140, max_size=140)
).map(lambda d: d[:{1: 148, 2: 92, 3: 64}[d[0]]])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), _wireguard_like, _sized_handshakes))
def test_filter_agrees_with_the_demultiplexer(data):
    p = FilteredPair(socket.AF_INET)
    try:
        assert p.passes(data) == expected_verdict(data, TAG)
    finally:
        p.close()


def test_a_tagged_core_names_only_tagged_indices_on_the_wire():
    """Every index a peer must echo back (initiation and response sender indices) carries the tag, so
    the peer's responses, cookie replies and data pass the filter."""
    a = WireGuardCore(os.urandom(32), random_bytes=os.urandom, index_tag=0xA1A1)
    b = WireGuardCore(os.urandom(32), random_bytes=os.urandom, index_tag=0xB2B2)
    a.set_endpoint(a.add_peer(b.public_key), ("192.0.2.2", 51820))
    a.set_allowed_ips(a.peers[b.public_key], [ipaddress.ip_network("10.0.0.2/32")])
    b.set_allowed_ips(b.add_peer(a.public_key), [ipaddress.ip_network("10.0.0.1/32")])
    packet = bytes([0x45, 0, 0, 28]) + bytes(8) + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + bytes(8)
    seen = []
    a.send_ip_packet(packet, 0.0)
    for _ in range(4):
        for data, _ in a.datagrams_to_send():
            seen.append(("a", data))
            b.receive_datagram(data, ("192.0.2.1", 51820), 0.0)
        for data, _ in b.datagrams_to_send():
            seen.append(("b", data))
            a.receive_datagram(data, ("192.0.2.2", 51820), 0.0)
    kinds = [(who, data[0]) for who, data in seen]
    assert ("a", 1) in kinds and ("b", 2) in kinds and ("a", 4) in kinds
    for who, data in seen:
        sender_tag = {"a": 0xA1A1, "b": 0xB2B2}[who]
        receiver_tag = {"a": 0xB2B2, "b": 0xA1A1}[who]
        if data[0] in (1, 2):
            assert int.from_bytes(data[4:8], "little") >> 16 == sender_tag
        if data[0] == 2:
            assert int.from_bytes(data[8:12], "little") >> 16 == receiver_tag
        if data[0] == 4:
            assert int.from_bytes(data[4:8], "little") >> 16 == receiver_tag
            assert expected_verdict(data, receiver_tag)
    assert b.tun_packets_to_write() == [packet]
    untagged = WireGuardCore(random_bytes=os.urandom)
    assert len({untagged._new_index() >> 16 for _ in range(200)}) > 1


def test_coalesced_reads_are_split_when_the_kernel_adds_other_cmsgs():
    """Once a socket has dropped anything (the filter does), the kernel may put a drop count cmsg
    (SO_RXQ_OVFL) beside the GRO segment size: the size must still be found, or three datagrams read
    as one would fail to decrypt."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        rx.setsockopt(udp.SOL_UDP, udp.UDP_GRO, 1)
        rx.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        socket_filter.attach(rx, socket_filter.program(None))
        tx.sendto(b"junk", rx.getsockname())
        segments = [b"\x04\0\0\0" + bytes([i]) * 60 for i in range(3)]
        tx.sendmsg([b"".join(segments)], [(udp.SOL_UDP, udp.UDP_SEGMENT, (64).to_bytes(2, sys.byteorder))], 0,
                   rx.getsockname())
        got = []
        while not got:
            got = udp.recv_batch(rx, 64)
        assert [data for data, _ in got] == segments
        assert udp.socket_drops(rx) == 1
    finally:
        rx.close()
        tx.close()


# Run inside a namespace: a real MeshDevice (TUN, shared UDP socket, the driver that runs the mesh node).
MESH_DEVICE_PROBE = textwrap.dedent("""
    import json, os, socket, sys, tempfile, trio
    from meshwg.io.agent.mesh_shell import MeshDevice
    from meshwg.wg.crypto import clamp

    async def main():
        dev = MeshDevice(sys.argv[1], clamp(os.urandom(32)), uapi_dir=tempfile.mkdtemp())
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(dev.run)
                tag = dev.core.index_tag
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for t in (tag ^ 1, tag):  # a foreign index, then an unknown one of ours
                    index = (t << 16 | 0x4242).to_bytes(4, "little")
                    tx.sendto(b"\\x04\\0\\0\\0" + index + bytes(40), ("127.0.0.1", dev.port))
                    await trio.sleep(0.3)
                print(json.dumps({"tag": tag, "kernel": dev.device.udp.kernel_drops(),
                                  "unknown_index": dev.core.drops["unknown_index"]}))
                nursery.cancel_scope.cancel()
        finally:
            dev.close()

    trio.run(main)
""")


@pytest.mark.netns
def test_a_mesh_node_filters_with_its_cores_tag():
    """The mesh node's driver (not the plain device's) reads the sockets: its filter must carry the
    core's tag, or a flood naming foreign indices reaches Python."""
    require_real_components("ip")
    ns = Netns("sfm")
    try:
        out = ns.run(sys.executable, "-c", MESH_DEVICE_PROBE, unique_name("sfm"))
        result = json.loads(out.strip().splitlines()[-1])
        assert result["tag"] is not None
        assert result["kernel"] == 1, result         # the foreign index: dropped by the kernel
        assert result["unknown_index"] == 1, result  # ours, passed to the core, which knows no such session
    finally:
        ns.close()


def test_kernel_drop_counts_survive_rebinding_and_closing():
    """`socket=` in the drop log counts the device's whole life, not only its current sockets."""
    bind = udp.UdpBind()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        bind.open(0)

        def junk_to_current_socket() -> None:
            socket_filter.attach(bind.v4, socket_filter.program(TAG))
            tx.sendto(b"junk", ("127.0.0.1", bind.port))
            tx.sendto(SENTINEL, ("127.0.0.1", bind.port))
            bind.v4.settimeout(2)
            assert bind.v4.recv(100) == SENTINEL

        junk_to_current_socket()
        bind.open(bind.port)  # the same port: the old sockets are closed first
        assert bind.kernel_drops() == 1
        junk_to_current_socket()
        bind.open(0)          # another port: old sockets replaced
        junk_to_current_socket()
        assert bind.kernel_drops() == 3
        bind.close()
        assert bind.kernel_drops() == 3
    finally:
        bind.close()
        tx.close()

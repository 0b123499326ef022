"""RelayShell after a control reconnect: a restarted relay forgot our session, so nothing may go out under
the old token (the relay refuses it and the packet, e.g. a handshake response, is lost) before the new
session's HELLO_OK; what is sent meanwhile waits and follows the HELLO_OK."""

from __future__ import annotations

import os
import time

from meshwg.io.agent.relay_shell import RelayShell
from meshwg.wg import crypto
from signal_server.relay import RelayCore

SERVER_SK = bytes(range(100, 132))
SERVER_ADDR = ("203.0.113.10", 3478)


class Net:
    """Frames to the relay are held until deliver(): the test decides what the relay has seen when."""

    def __init__(self):
        self.relay = self.new_relay()
        self.wire: list[tuple[bytes, tuple]] = []
        self.shells: dict[tuple, RelayShell] = {}
        self.got: list[tuple[str, bytes, bytes]] = []
        self.now = 100.0

    def new_relay(self) -> RelayCore:
        return RelayCore(SERVER_SK, os.urandom)

    def shell(self, name: str, sk: bytes, addr: tuple) -> RelayShell:
        def udp_send(data, dst):
            assert dst == SERVER_ADDR
            self.wire.append((data, addr))
            return True
        sh = RelayShell(sk, udp_send=udp_send, deliver=lambda src, pkt: self.got.append((name, src, pkt)),
                        after_rx=None, clock=lambda: self.now, random_bytes=os.urandom)
        self.shells[addr] = sh
        return sh

    def deliver(self) -> None:
        while self.wire:
            data, src = self.wire.pop(0)
            for frame, dst in self.relay.handle_untrusted(data, src, self.now, time.time()):
                self.shells[dst].handle_udp(frame, SERVER_ADDR, self.now)


def test_server_restarted_holds_sends_until_the_new_session_is_ready():
    sk_x, sk_y = bytes(range(1, 33)), bytes(range(33, 65))
    pk_x, pk_y = crypto.dh_pub(crypto.clamp(sk_x)), crypto.dh_pub(crypto.clamp(sk_y))
    net = Net()
    net.relay.set_allowed([pk_x, pk_y])
    server_pk = crypto.dh_pub(crypto.clamp(SERVER_SK))
    x = net.shell("x", sk_x, ("198.51.100.1", 1000))
    y = net.shell("y", sk_y, ("198.51.100.2", 2000))
    for sh in (x, y):
        sh.configure(server_pk, [SERVER_ADDR], [])
    net.deliver()
    assert x.ready() and y.ready()
    x.send(pk_y, b"before")
    net.deliver()
    assert net.got == [("y", pk_x, b"before")]

    # The server restarts: a fresh relay without sessions. Both nodes reconnect their control channel.
    net.relay = net.new_relay()
    net.relay.set_allowed([pk_x, pk_y])
    net.now += 1
    y.server_restarted()
    net.deliver()                        # y's new session is up
    x.server_restarted()                 # x's HELLO is still on its way ...
    x.send(pk_y, b"answer")              # ... when x answers y (a handshake response, say)
    assert x.counters["queue_not_ready"] == 1
    net.deliver()
    assert net.got[-1] == ("y", pk_x, b"answer")
    assert net.relay.counters["refused_no_session"] == 0


def test_relay_shell_counters_follow_the_convention():
    """meshwg.counters' convention: verb first, drop_<reason> for what is lost; a notice code is named, and
    one we do not know (anyone can forge a notice) is one key, not one per code."""
    from meshwg.signaling import relay_wire as W

    sk_x, sk_y = bytes(range(1, 33)), bytes(range(33, 65))
    pk_x, pk_y = crypto.dh_pub(crypto.clamp(sk_x)), crypto.dh_pub(crypto.clamp(sk_y))
    net = Net()
    net.relay.set_allowed([pk_x, pk_y])
    x = net.shell("x", sk_x, ("198.51.100.1", 1000))
    y = net.shell("y", sk_y, ("198.51.100.2", 2000))
    x.send(pk_y, b"early")                   # no session yet: it waits
    for sh in (x, y):
        sh.configure(crypto.dh_pub(crypto.clamp(SERVER_SK)), [SERVER_ADDR], [])
    net.deliver()
    x.send(pk_y, b"later")
    net.deliver()
    assert x.counters == {"queue_not_ready": 1, "send_hello_udp": 1, "send_confirm_udp": 1, "send_udp": 2}
    for code in (W.N_REHELLO, 200, 201):
        y.handle_udp(W.encode_notice(code), SERVER_ADDR, net.now)
    y.handle_udp(W.encode_notice(W.N_REHELLO), ("192.0.2.66", 3478), net.now)
    y.handle_udp(b"\xffMWR\x09", SERVER_ADDR, net.now)
    assert y.counters == {"send_hello_udp": 1, "send_confirm_udp": 1, "recv_udp": 2, "recv_notice_rehello": 1,
                          "recv_notice_unknown": 2, "drop_not_from_relay": 1, "drop_bad_frame": 1}

"""The relay shell owns what the driver's compiled relay path may do for it (issue 16): a destination's SEND
header only under the current token (a new HELLO_OK with a new token drops every cached one; a new session
turns the path off until its HELLO_OK), the peers' endpoints only for keys the node calls peers (never a plain
peer's PLAIN_SOURCE or a stranger), forgotten when the peers change; and the compiled path's counters join the
shell's."""

from __future__ import annotations

import os
import time

import pytest

from meshwg.io.agent.relay_shell import RelayShell
from meshwg.io.dataplane.fastio import fastio
from meshwg.mesh.node import RelayEndpoint
from meshwg.signaling import relay_wire as W
from meshwg.wg import crypto
from signal_server.relay import RelayCore

pytestmark = pytest.mark.skipif(fastio is None, reason="the compiled drain is not built")

SERVER_SK = bytes(range(100, 132))
SERVER_PK = crypto.dh_pub(crypto.clamp(SERVER_SK))
SERVER_ADDR = ("203.0.113.10", 3478)
NODE_ADDR = ("198.51.100.1", 1000)
NODE_SK = bytes(range(1, 33))
PEER = crypto.dh_pub(crypto.clamp(bytes(range(33, 65))))
STRANGER = bytes(range(200, 232))
TRANSPORT = b"\x04\0\0\0" + bytes(60)


class Rig:
    def __init__(self):
        self.now = 100.0
        self.relay = RelayCore(SERVER_SK, os.urandom)
        self.relay.set_allowed([crypto.dh_pub(crypto.clamp(NODE_SK)), PEER])
        self.wire: list[bytes] = []
        self.got: list[tuple[bytes, bytes]] = []
        self.shell = RelayShell(NODE_SK, udp_send=self._udp_send, deliver=lambda src, p: self.got.append((src, p)),
                                after_rx=None, clock=lambda: self.now, endpoint_type=RelayEndpoint,
                                endpoint_for=lambda key: RelayEndpoint(key) if key == PEER else None)

    def _udp_send(self, data, dst):
        assert dst == SERVER_ADDR
        self.wire.append(data)
        return True

    def answer_hellos(self) -> None:
        """The relay answers what the shell sent (HELLO -> HELLO_OK); SENDs are dropped (no peer session)."""
        wire, self.wire = self.wire, []
        for data in wire:
            for frame, dst in self.relay.handle_untrusted(data, NODE_ADDR, self.now, time.time()):
                if dst == NODE_ADDR:
                    self.shell.handle_udp(frame, SERVER_ADDR, self.now)


@pytest.fixture
def rig():
    r = Rig()
    r.shell.configure(SERVER_PK, [SERVER_ADDR], [])
    assert r.shell.route.addr is None                    # no session yet: nothing for the compiled path
    r.answer_hellos()
    assert r.shell.ready()
    return r


def test_a_header_is_cached_under_the_current_token_only(rig):
    shell = rig.shell
    assert shell.route.addr == SERVER_ADDR
    shell.send(PEER, TRANSPORT)                           # the first send: the Python path, which caches it
    token = shell.session.token
    assert rig.wire[-1] == W.encode_send(token, PEER, TRANSPORT)
    assert shell._headers == {PEER: W.encode_send(token, PEER, b"")}

    # The relay restarted: a new session; until its HELLO_OK nothing may go out under the old token.
    rig.relay = RelayCore(SERVER_SK, os.urandom)
    rig.relay.set_allowed([crypto.dh_pub(crypto.clamp(NODE_SK)), PEER])
    rig.now += 1
    shell.server_restarted()
    assert shell.route.addr is None
    rig.answer_hellos()
    assert shell.session.token != token and shell.route.addr == SERVER_ADDR
    assert shell._headers == {}                           # built under the old token: gone
    shell.send(PEER, TRANSPORT)
    assert shell._headers == {PEER: W.encode_send(shell.session.token, PEER, b"")}


def test_the_compiled_path_is_off_once_the_session_lapses_or_udp_is_not_the_transport(rig):
    shell = rig.shell
    until = shell.policy.udp_until
    assert until == shell.session.ready_until
    # The route is handed the session's end: the compiled send compares it with the driver's clock.
    assert fastio.send_datagrams([(TRANSPORT, RelayEndpoint(PEER))], 0, -1, -1, False, False, {},
                                 shell.route.capsule, until) == (0, fastio.NEEDS_PYTHON, 0)


def test_endpoints_are_learnt_for_peers_only_and_forgotten_when_the_peers_change(rig):
    shell = rig.shell
    for src in (PEER, STRANGER, W.PLAIN_SOURCE):
        shell.handle_udp(W.encode_recv(src, TRANSPORT), SERVER_ADDR, rig.now)
    assert [src for src, _ in rig.got] == [PEER, STRANGER, W.PLAIN_SOURCE]   # all delivered, as before
    assert shell._endpoints == {PEER: RelayEndpoint(PEER)}
    shell.handle_udp(W.encode_recv(PEER, TRANSPORT), ("192.0.2.66", 3478), rig.now)   # not from the relay
    assert shell.counters["drop_not_from_relay"] == 1 and len(rig.got) == 3
    shell.forget_endpoints()
    assert shell._endpoints == {}


def test_the_compiled_paths_counters_join_the_shells(rig):
    assert rig.shell.counters == {"send_hello_udp": 1, "send_confirm_udp": 1}   # nothing compiled yet: no keys

"""The agent's trio shell (meshwg/io/agent/agent.py) on trio's MockClock: it times the core's inputs on
its one clock, feeds queued events as one batch and flushes once, and gives the core's answers back.

A stand-in device (a real MeshNode, a counting driver, a recording relay) and control client (an events
channel, recorded sends) replace the TUN and the server; nothing sleeps in real time.
"""

from __future__ import annotations

import ipaddress
import math
import random
import struct

import trio
from nacl.public import PrivateKey

from meshwg.control import reconnect as R
from meshwg.control.client import ConnectionLost
from meshwg.control.events import Connected, DirectoryReset, PeerChanged, PeerInfo, Welcome
from meshwg.io.agent.agent import Agent
from meshwg.mesh import agent_core as A
from meshwg.mesh.node import MeshNode
from meshwg.signaling.invite import Invite
from meshwg.wg.device import WireGuardCore

INVITE = Invite(("192.0.2.1:7300",), bytes(range(32)), "", b"")
WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def peer(n: int, port: int | None = 4000) -> PeerInfo:
    cands = () if port is None else ((f"198.51.100.{n}", port, "stun-eim"),)
    return PeerInfo(key(n), n, f"p{n}", f"100.64.0.{n}", f"fd00::{n}", cands, True)


class Driver:
    def __init__(self) -> None:
        self.flushes = 0

    async def flush(self) -> None:
        self.flushes += 1


class Relay:
    def __init__(self) -> None:
        self.calls: list = []

    def configure(self, *args) -> None:
        self.calls.append("configure")

    def server_restarted(self) -> None:
        self.calls.append("restarted")

    def homes_changed(self) -> None:
        self.calls.append("homes")


class Dev:
    name, port = "mesh0", 5000

    def __init__(self, node: MeshNode) -> None:
        self.node, self.driver, self.relay, self.addresses = node, Driver(), Relay(), []
        self.fwmark = 0

    async def set_fwmark(self, fwmark: int) -> None:
        self.fwmark = fwmark

    async def set_addresses(self, addresses) -> None:
        self.addresses = list(addresses)

    def set_route_mtus(self, mtus) -> None:
        self.route_mtus = dict(mtus)


class Client:
    def __init__(self) -> None:
        self.send, self.events = trio.open_memory_channel(math.inf)
        self.invite, self.candidates, self.punches, self.reports = INVITE, [], [], []
        self.routes: list = []
        self.fwmark = 0

    async def report_routes(self, routes, exit_node) -> bool:
        self.routes.append((list(routes), exit_node))
        return True

    def set_fwmark(self, fwmark: int) -> None:
        self.fwmark = fwmark

    async def request_punch(self, peer_key: bytes) -> bool:
        self.punches.append((trio.current_time(), peer_key))
        return True

    async def report_candidates(self, candidates) -> bool:
        self.reports.append(list(candidates))
        return True


def new_agent(clock=trio.current_time) -> tuple[Agent, Client]:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    agent = Agent(INVITE, name=None, state_dir="/nonexistent", iface="unused0", clock=clock)
    agent.dev = Dev(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb))
    agent.core = A.AgentCore(agent.dev.node, INVITE.addrs)
    agent.client = Client()
    agent.cache_writes = []

    async def write_cache(act):   # the file I/O runs in a thread, which a MockClock test must not wait on
        agent.cache_writes.append(act)

    agent._write_cache = write_cache
    return agent, agent.client


async def test_punch_requests_go_out_at_the_next_tick_timed_on_the_agents_clock(autojump_clock):
    agent, client = new_agent()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(agent._events_task)
            n.start_soon(agent._ticks)
            client.send.send_nowait(Connected(WELCOME))
            client.send.send_nowait(DirectoryReset({key(1): peer(1, port=None)}))
            await trio.sleep(5.0)
            assert client.punches == []                  # no candidates, no traffic: nothing to ask
            t0 = trio.current_time()
            client.send.send_nowait(PeerChanged(peer(1, port=4000)))   # candidates appear
            await trio.sleep(0.5)
            assert [k for _, k in client.punches] == [key(1)]
            asked = client.punches[0][0]
            assert t0 <= asked <= t0 + 0.1 + 1e-6        # within the old 0.1 s tick (now: at once)
            await trio.sleep_until(asked + 0.3)
            client.send.send_nowait(PeerChanged(peer(1, port=5000)))   # within the second: not asked
            await trio.sleep_until(asked + 1.05)
            assert len(client.punches) == 1
            t1 = trio.current_time()                     # a second on, on the agent's clock:
            client.send.send_nowait(PeerChanged(peer(1, port=6000)))   # new candidates are asked for again
            await trio.sleep(0.5)
            assert [k for _, k in client.punches] == [key(1), key(1)]
            assert t1 <= client.punches[1][0] <= t1 + 0.1 + 1e-6
            n.cancel_scope.cancel()


def ipv4_packet(src: str, dst: str) -> bytes:
    """A UDP/IPv4 packet from the TUN (the node reads its destination only)."""
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 60, 0, 0, 64, 17, 0, ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + b"x" * 40


def count_ticks(agent) -> list:
    """The times the agent steps with a Tick (its tick task's wake-ups that reach the core)."""
    ticks, step = [], agent._step

    async def counting(*inputs):
        if any(isinstance(i, A.Tick) for i in inputs):
            ticks.append(trio.current_time())
        await step(*inputs)

    agent._step = counting
    return ticks


async def test_the_tick_task_does_not_wake_while_idle(autojump_clock):
    """Issue 15: an idle agent (peers without traffic, nothing pending) is not ticked; the old tick ran every
    0.1 s (600 ticks a minute)."""
    agent, client = new_agent()
    ticks = count_ticks(agent)
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            n.start_soon(agent._events_task)
            n.start_soon(agent._ticks)
            client.send.send_nowait(Connected(WELCOME))
            client.send.send_nowait(DirectoryReset({key(n): peer(n, port=None) for n in range(1, 5)}))
            await trio.sleep(5.0)                          # the join's own work (the first cache write, ...)
            settled = len(ticks)
            await trio.sleep(60.0)
            assert len(ticks) == settled, ticks[settled:]
            n.cancel_scope.cancel()


async def test_the_devices_news_ticks_at_once_a_relayed_peer_that_got_traffic_is_asked_for(autojump_clock):
    """An idle peer's traffic (the node's PeerActive, through the device's on_news) wakes the tick: its punch
    request goes within the old tick's 0.1 s."""
    agent, client = new_agent()
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            n.start_soon(agent._events_task)
            n.start_soon(agent._ticks)
            client.send.send_nowait(Connected(WELCOME))
            client.send.send_nowait(DirectoryReset({key(1): peer(1, port=None)}))
            await trio.sleep(30.0)
            assert client.punches == []
            t0 = trio.current_time()
            node = agent.dev.node
            node.send_ip_packet(ipv4_packet("100.64.0.7", "100.64.0.1"), agent.clock())
            node.datagrams_to_send()
            assert any(type(e).__name__ == "PeerActive" for e in node.pop_events())
            agent._on_device_news()                        # what the mesh device does on that event
            await trio.sleep(1.0)
            assert [k for _, k in client.punches] == [key(1)]
            assert client.punches[0][0] <= t0 + 0.1 + 1e-6
            n.cancel_scope.cancel()


async def test_queued_events_are_one_batch_and_one_flush(autojump_clock):
    agent, client = new_agent()
    for ev in (Connected(WELCOME), DirectoryReset({key(1): peer(1)}), PeerChanged(peer(2)), PeerChanged(peer(3))):
        client.send.send_nowait(ev)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(agent._events_task)
            await trio.sleep(1.0)
            n.cancel_scope.cancel()
    assert agent.dev.driver.flushes == 1
    assert set(agent.dev.node.core.peers) == {key(1), key(2), key(3)}
    # one batch: the relay configured once and told once that peers' home relays may have moved
    assert agent.dev.addresses == ["100.64.0.7/32", "fd00::7/128"] and agent.dev.relay.calls == ["configure", "homes"]


async def test_a_relayed_peers_route_mtu_reaches_the_device(autojump_clock):
    agent, client = new_agent()
    with trio.fail_after(60):
        await agent._step(Connected(WELCOME), DirectoryReset({key(1): peer(1)}))
    assert agent.dev.route_mtus == {"100.64.0.1/32": 1375, "fd00::1/128": 1375}   # on the relay until direct


async def test_a_report_that_went_out_is_given_back_so_the_next_change_is_reported(autojump_clock):
    agent, client = new_agent()
    with trio.fail_after(60):
        await agent._step(A.LocalAddresses(("192.168.1.5",), 5000))
        assert client.candidates == [("192.168.1.5", 5000, "local")] and client.reports == []
        await agent._step(Connected(WELCOME), A.Tick())
        await agent._step(A.Tick())
        assert client.reports == [[("192.168.1.5", 5000, "local")]]
        await agent._step(A.LocalAddresses(("192.168.1.6",), 5000))
        assert client.reports[-1] == [("192.168.1.6", 5000, "local")] and len(client.reports) == 2


async def test_status_reads_retry_in_on_the_clock_the_client_set_it_on(autojump_clock):
    # The agent's clock on another base than trio's, as time.monotonic is.
    agent, _ = new_agent(clock=lambda: trio.current_time() + 1000.0)
    agent.client = agent._control_client(bytes(range(32)), registered=True)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(agent.client._wait_retry, ConnectionLost("busy", "server busy, retry in 7 s", 7.0),
                         R.TRANSIENT)
            await trio.sleep(1.0)
            retry_in = agent._control_status(agent.clock())["retry_in"]
            # the server's 7 s jittered by [0.8, 1.2], 1 s on, shown rounded to 0.1 s
            assert 4.55 <= retry_in <= 7.45
            n.cancel_scope.cancel()


class Subnet:
    """Records what the agent asks of the host (forwarding, masquerade, exit rules) instead of doing it."""

    def __init__(self) -> None:
        self.calls: list = []
        self.forwarding = False

    def apply(self, *, forwarding, masquerade, exit_mark) -> None:
        self.forwarding = forwarding
        self.calls.append((forwarding, masquerade, exit_mark))

    def choose_mark(self) -> int:
        return 51820


def routing_agent(tmp_path):
    agent, client = new_agent()
    agent.state_dir = str(tmp_path)
    agent.subnet = Subnet()
    agent.fwmark = 51820   # chosen already (the choice reads the kernel's tables, in a thread)

    async def apply_os():   # no thread under the MockClock
        c = agent.core.routing
        agent.subnet.apply(forwarding=c.advertising, masquerade=c.snat,
                           exit_mark=agent.fwmark if agent.exit_name else None)

    agent._apply_os = apply_os
    return agent, client


async def test_set_changes_routes_at_runtime_reports_them_and_persists(autojump_clock, tmp_path):
    from meshwg.io.agent import agent_state as S

    agent, client = routing_agent(tmp_path)
    with trio.fail_after(60):
        await agent._step(Connected(WELCOME), DirectoryReset({key(1): peer(1)}))
        assert client.routes == [([], False)]                     # after the welcome, even with nothing to say
        rep = await agent.handle_query({"op": "set", "advertise_routes": "10.77.0.0/24,10.78.0.0/24"})
        assert rep["ok"] and rep["routing"]["advertise_routes"] == ["10.77.0.0/24", "10.78.0.0/24"]
        assert client.routes[-1] == (["10.77.0.0/24", "10.78.0.0/24"], False)
        assert agent.subnet.calls[-1] == (True, True, None)        # forwarding and masquerade on
        assert S.load_routing(str(tmp_path))["advertise_routes"] == ["10.77.0.0/24", "10.78.0.0/24"]
        # one-line errors naming the value; nothing changes
        for req, err in (({"advertise_routes": "10.77.0.1/24"}, "bad CIDR '10.77.0.1/24'"),
                         ({"exit_node": "nas"}, "no peer named 'nas'"),
                         ({"advertise_routes": "100.64.1.0/24"}, "route 100.64.1.0/24 overlaps the mesh prefix"),
                         ({"advertise_exit_node": "maybe"}, "want on or off, not 'maybe'")):
            rep = await agent.handle_query({"op": "set", **req})
            assert err in rep["error"] and "\n" not in rep["error"]
        assert len(client.routes) == 2
        await agent.handle_query({"op": "set", "advertise_routes": "none"})
        assert client.routes[-1] == ([], False) and agent.subnet.calls[-1] == (False, True, None)


async def test_exit_node_marks_sockets_then_routes_and_unmarks_after(autojump_clock, tmp_path):
    import dataclasses

    agent, client = routing_agent(tmp_path)
    home = dataclasses.replace(peer(1), name="home", exit_node=True)
    with trio.fail_after(60):
        await agent._step(Connected(WELCOME), DirectoryReset({key(1): home}))
        rep = await agent.handle_query({"op": "set", "exit_node": "home"})
        assert rep["routing"]["exit_node_in_use"] == "home"
        assert agent.dev.fwmark == client.fwmark == 51820 and agent.subnet.calls[-1] == (False, True, 51820)
        await agent._step(PeerChanged(dataclasses.replace(home, exit_node=False)))   # approval withdrawn
        assert agent.subnet.calls[-1] == (False, True, None) and agent.dev.fwmark == client.fwmark == 0
        assert agent._routing_status()["exit_node"] == "home" and agent._routing_status()["exit_node_in_use"] is None

"""The exit policy table's default routes carry the relayed MTU while the exit node in use is relayed (issue 16):
the `ip` commands meshwg/io/oscfg/subnet_routes.py issues (recorded, the host untouched), and the agent shell handing
the core's SetExitMtus to it."""

from __future__ import annotations


import trio

from meshwg.io.agent.agent import Agent
from meshwg.io.oscfg import subnet_routes as SR
from meshwg.mesh import agent_core as A
from meshwg.mesh.routing import RoutingChoice
from meshwg.signaling.invite import Invite
from test_subnet_routes_os import _fake_host

RELAYED = {"0.0.0.0/0": 1375, "::/0": 1375}


def fake_host(monkeypatch, tmp_path, fail=()):
    """The subnet-routes tests' fake host (/proc/sys as files, `ip` and `nft` recorded): (command, input) pairs."""
    return _fake_host(monkeypatch, tmp_path, fail)[1]


def lines(calls: list) -> list[str]:
    return [c for c, _ in calls]


def defaults(calls: list) -> list[str]:
    return [c for c in lines(calls) if " route replace default " in c]


def test_the_default_routes_carry_the_mtu_while_relayed_and_are_replaced_without_it_when_direct(monkeypatch, tmp_path):
    calls = fake_host(monkeypatch, tmp_path)
    r = SR.SubnetRouting("mesh0")
    r.apply(forwarding=False, masquerade=True, exit_mark=51820, exit_mtus=RELAYED)   # in use, relayed
    assert defaults(calls) == ["ip -4 route replace default dev mesh0 table 51820 mtu 1375",
                               "ip -6 route replace default dev mesh0 table 51820 mtu 1375"]
    calls.clear()
    r.apply(forwarding=False, masquerade=True, exit_mark=51820, exit_mtus={})         # the exit node went direct
    assert defaults(calls) == ["ip -4 route replace default dev mesh0 table 51820",
                               "ip -6 route replace default dev mesh0 table 51820"]
    assert not [c for c in lines(calls) if " rule " in c]                                    # the rules stay as they are
    calls.clear()
    r.apply(forwarding=False, masquerade=True, exit_mark=51820, exit_mtus={})         # no change: nothing
    r.apply(forwarding=False, masquerade=True, exit_mark=51820)                        # not said: as they are
    assert defaults(calls) == []
    r.apply(forwarding=False, masquerade=True, exit_mark=51820, exit_mtus={"0.0.0.0/0": 1255})   # IPv4 only
    assert defaults(calls) == ["ip -4 route replace default dev mesh0 table 51820 mtu 1255"]
    r.close()


def test_mtus_without_an_exit_node_in_use_wait_for_its_table(monkeypatch, tmp_path):
    calls = fake_host(monkeypatch, tmp_path)
    r = SR.SubnetRouting("mesh0")
    r.apply(forwarding=False, masquerade=True, exit_mark=None, exit_mtus=RELAYED)
    assert not [c for c in lines(calls) if c.startswith("ip ")]
    r.apply(forwarding=False, masquerade=True, exit_mark=51821)                        # the rules go on: with it
    assert defaults(calls) == ["ip -4 route replace default dev mesh0 table 51821 mtu 1375",
                               "ip -6 route replace default dev mesh0 table 51821 mtu 1375"]
    calls.clear()
    r.apply(forwarding=False, masquerade=True, exit_mark=None, exit_mtus={})          # off: the table flushed
    assert "ip -4 route flush table 51821" in lines(calls) and defaults(calls) == []


def test_no_ipv6_default_route_no_ipv6_retune(monkeypatch, tmp_path):
    """IPv6 disabled on the host: the IPv6 policy routing failed; an MTU change touches IPv4 only."""
    calls = fake_host(monkeypatch, tmp_path, fail=[("ip -6 route", "RTNETLINK answers: Permission denied")])
    r = SR.SubnetRouting("mesh0")
    r.apply(forwarding=False, masquerade=True, exit_mark=51820)
    calls.clear()
    r.apply(forwarding=False, masquerade=True, exit_mark=51820, exit_mtus=RELAYED)
    assert defaults(calls) == ["ip -4 route replace default dev mesh0 table 51820 mtu 1375"]


class Subnet:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def apply(self, **kw) -> None:
        self.calls.append(kw)

    def choose_mark(self) -> int:
        return 51820


class Dev:
    async def set_fwmark(self, fwmark: int) -> None:
        self.fwmark = fwmark


class Client:
    def set_fwmark(self, fwmark: int) -> None:
        self.fwmark = fwmark


def test_the_agent_hands_set_exit_mtus_to_the_exit_policy_routing():
    """Real threads (subnet.apply runs in one): trio's real clock, every wait under a deadline."""
    agent = Agent(Invite(("192.0.2.1:7300",), bytes(range(32)), "", b""), name=None, state_dir="/nonexistent",
                  iface="unused0")
    agent.subnet, agent.dev, agent.client = Subnet(), Dev(), Client()
    agent.core = type("Core", (), {"routing": RoutingChoice(exit_node="home")})()
    agent.fwmark = 51820

    async def main():
        with trio.fail_after(10):
            await agent._carry_out(A.SetExitMtus(tuple(RELAYED.items())))   # before the exit node is in use: kept
            assert agent.subnet.calls == []
            await agent._carry_out(A.UseExitNode(b"k" * 32, "home"))
            assert agent.subnet.calls[-1]["exit_mark"] == 51820 and agent.subnet.calls[-1]["exit_mtus"] == RELAYED
            await agent._carry_out(A.SetExitMtus(()))                       # direct now
            assert agent.subnet.calls[-1]["exit_mark"] == 51820 and agent.subnet.calls[-1]["exit_mtus"] == {}
            await agent._carry_out(A.UseExitNode(None, None))
            n = len(agent.subnet.calls)
            await agent._carry_out(A.SetExitMtus(tuple(RELAYED.items())))   # none in use: nothing to apply
            assert len(agent.subnet.calls) == n
    trio.run(main)

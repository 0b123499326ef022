"""Issue 13 item 1 end to end on loopback: a real signal server, a real control client and the agent's shell and
core over a real mesh device (a socketpair stands in for the TUN; no address is set on the host). `meshwg-signal
nodes tag/untag/rename` (the CLI, on its own database connection) reach the node's `meshwg status` within 1 s,
without a reconnect."""

from __future__ import annotations

import os
import socket
import time

import pytest
import trio
from sig_helpers import start_server, start_task, wait_until
from test_plain_cli import run_cli

from meshwg.commands.mesh import format_status
from meshwg.io.agent import mesh_shell
from meshwg.io.agent.agent import Agent
from meshwg.io.dataplane.tun import Tun
from meshwg.mesh import agent_core as A


@pytest.fixture
def device(monkeypatch, tmp_path):
    tun_side, test_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(mesh_shell.Tun, "open", classmethod(lambda cls, name: Tun.from_fd(tun_side.fileno(), name)))
    monkeypatch.setattr(mesh_shell.socket, "if_nametoindex", lambda name: 999)
    dev = mesh_shell.MeshDevice("mwgself0", os.urandom(32), uapi_dir=str(tmp_path))

    async def set_addresses(addresses):   # the interface is a socketpair: nothing to put on the host
        dev.addresses = list(addresses)

    dev.set_addresses = set_addresses
    yield dev
    dev.close()
    test_side.close()


async def tagged_node(nursery, tmp_path, device):
    """A server, and a node "laptop" joined with an invite tagged ops, its agent taking the control events."""
    h = await start_server(nursery, tmp_path)
    inv = h.invite(tag="ops")
    state = tmp_path / "state"
    state.mkdir()
    agent = Agent(inv, name="laptop", state_dir=str(state), iface=device.name)
    agent.dev, agent.core = device, A.AgentCore(device.node, inv.addrs)
    agent.client = agent._control_client(os.urandom(32), registered=False)
    await start_task(nursery, agent.client.run)
    nursery.start_soon(agent._events_task)
    await wait_until(lambda: agent.status()["tags"] == ["ops"], timeout=5.0)
    return h, agent


async def within_1s(pred) -> float:
    t0 = time.monotonic()
    await wait_until(pred, timeout=1.0)
    return time.monotonic() - t0


async def test_status_shows_tags_and_a_new_name_within_1s(nursery, tmp_path, capsys, device):
    h, agent = await tagged_node(nursery, tmp_path, device)
    assert agent.status()["name"] == "laptop" and "laptop" in format_status(agent.status()).splitlines()[0]

    code, out, err = await run_cli(capsys, h, "nodes", "tag", "laptop", "web")
    assert code == 0, err
    await within_1s(lambda: agent.status()["tags"] == ["ops", "web"])
    assert format_status(agent.status()).splitlines()[0].endswith("  tags ops,web")

    code, _, err = await run_cli(capsys, h, "nodes", "untag", "laptop", "ops", "web")
    assert code == 0, err
    await within_1s(lambda: agent.status()["tags"] == [])
    assert "tags" not in format_status(agent.status()).splitlines()[0]

    code, _, err = await run_cli(capsys, h, "nodes", "rename", "laptop", "work-laptop")
    assert code == 0, err
    await within_1s(lambda: agent.status()["name"] == "work-laptop")
    assert format_status(agent.status()).startswith(f"{device.name}: work-laptop ")
    assert agent.client.reconnects == 0 and agent.client.conn.drops == 0   # live, not learned at a reconnect
    assert h.server.counters["self_updates"] == 3

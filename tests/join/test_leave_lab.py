"""`meshwg leave` (issue 15) on real agents in a bridge lab: with the agent running (asked over its status socket)
and with none (the state directory's key), the server forgets the node, its peers drop it within 1 s, and its
state files go; a server that cannot be reached is one line and the state stays."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import require_real_components
from joinnet import BridgeNet
from meshwg.io.ipc import status_server
from scenarios.netns import wait_for

pytestmark = pytest.mark.netns

NODE_FILES = {"private.key", "netmap.json"}


def _peer_names(node) -> set:
    """Straight from the agent's status socket (no CLI start-up in the measured time)."""
    try:
        st = status_server.query(node.iface, {"op": "status"}, timeout=2)
    except OSError:
        return set()
    return {p["name"] for p in st.get("peers", [])}


def _server_nodes(net) -> set:
    res = net.signal("nodes", "--json")
    assert res.returncode == 0, res.stderr
    return {r["name"] for r in json.loads(res.stdout)}


def _gone_within(node, name: str, since: float, limit: float) -> float:
    deadline = since + 5.0
    while name in _peer_names(node):
        assert time.monotonic() < deadline, f"{node.name} still lists {name}"
        time.sleep(0.02)
    return time.monotonic() - since


def test_leave_with_and_without_agent_and_refused():
    require_real_components("ip", "wg", "ping")
    net = BridgeNet(78)
    try:
        invite = net.start_server()
        a, b, c = net.node("alpha"), net.node("beta"), net.node("gamma")
        for n in (a, b, c):
            n.start(invite)
        wait_for(lambda: {"beta", "gamma"} <= _peer_names(a), timeout=20, what="alpha sees beta and gamma")
        assert NODE_FILES <= set(os.listdir(b.state))

        # With the agent running: it sends the leave and stops; alpha drops beta at once.
        res = b.meshwg("leave", "--state-dir", str(b.state))
        done = time.monotonic()
        assert res.returncode == 0, res.stderr
        assert _gone_within(a, "beta", done, 1.0) < 1.0
        wait_for(lambda: b.proc.poll() is not None, timeout=10, what="beta's agent exits")
        assert b.proc.returncode == 0, b.log_text()
        b.proc = None
        assert not os.path.exists(b.state)  # it held only the node's files
        assert "beta" not in _server_nodes(net)

        # No agent, server down: one line, exit 1, state kept.
        c.stop()
        net.stop_server()
        res = c.meshwg("leave", "--state-dir", str(c.state))
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "kept" in res.stderr, res.stderr
        assert NODE_FILES <= set(os.listdir(c.state))

        # Server back, still no agent: the state directory's key deregisters it; other files there stay.
        net.start_server()
        wait_for(lambda: a.status() and a.status()["control"]["connected"], timeout=20, what="alpha reconnects")
        (c.state / "notes.txt").write_text("mine")
        res = c.meshwg("leave", "--state-dir", str(c.state))
        done = time.monotonic()
        assert res.returncode == 0, res.stderr
        assert _gone_within(a, "gamma", done, 1.0) < 1.0
        assert sorted(os.listdir(c.state)) == ["notes.txt"]
        assert _server_nodes(net) == {"alpha"}
    except BaseException:
        net.print_logs()
        raise
    finally:
        net.close()

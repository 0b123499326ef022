"""A real `meshwg join` started with $NOTIFY_SOCKET, as systemd starts meshwg.service (Type=notify): READY=1 comes
once the node has its welcome and its interface carries its mesh address, STATUS= says how its peers are reached and
that it reconnects when the server goes away, STOPPING=1 on SIGTERM (meshwg/io/agent/service_notify.py)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from conftest import require_real_components
from joinnet import ENV, REPO, BridgeNet, PY

pytestmark = pytest.mark.netns


def _until(rx: socket.socket, pred, deadline_s: float) -> str:
    """Notifications until one satisfies pred (returned); fails at the deadline."""
    end = time.monotonic() + deadline_s
    seen = []
    while True:
        left = end - time.monotonic()
        if left <= 0:
            pytest.fail(f"no notification matched in {deadline_s} s; got {seen}")
        rx.settimeout(left)
        try:
            msg = rx.recv(4096).decode()
        except socket.timeout:
            continue
        seen.append(msg)
        if pred(msg):
            return msg


def test_agent_ready_status_and_stopping():
    require_real_components("ip")
    net = BridgeNet(94)
    rx = None
    beta_proc = None
    try:
        invite = net.start_server()
        alpha, beta = net.node("alpha"), net.node("beta")
        alpha.start(invite)
        path = f"{net.dir}/notify"
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(path)   # a path, not an abstract name: those are per network namespace
        with open(beta.log, "ab") as log:
            beta_proc = beta.ns.popen(PY, "-m", "meshwg", "join", invite, "--name", "beta", "--state-dir",
                                      str(beta.state), "--interface", beta.iface, env=dict(ENV, NOTIFY_SOCKET=path),
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        ready = _until(rx, lambda m: "READY=1" in m.split("\n"), 30)
        # At READY the interface is up with its mesh address, and the agent answers with its welcome's name.
        addr = beta.ns.run("ip", "-4", "-o", "address", "show", "dev", beta.iface, check=False)
        assert " inet 100." in addr, (ready, addr)
        assert "UP" in beta.ns.run("ip", "link", "show", "dev", beta.iface)
        st = beta.status()
        assert st["name"] == "beta" and st["control"]["connected"]

        peers = "STATUS=1 peer: 1 direct, 0 relayed"
        if peers not in ready.split("\n"):   # READY carries the status of that moment
            _until(rx, lambda m: m == peers, 30)
        net.stop_server()
        _until(rx, lambda m: m.startswith("STATUS=reconnecting (attempt "), 30)
        beta_proc.terminate()
        _until(rx, lambda m: m == "STOPPING=1", 15)
        assert beta_proc.wait(timeout=20) == 0
    except BaseException:
        net.print_logs()
        raise
    finally:
        if beta_proc is not None and beta_proc.poll() is None:
            beta.ns.stop(beta_proc)
        if rx is not None:
            rx.close()
        net.close()

"""systemd's notify protocol (meshwg/sdnotify.py), the STATUS texts (meshwg/service_status.py), and a real
`meshwg-signal serve` started with $NOTIFY_SOCKET: READY=1 only once its listeners take connections, STOPPING=1
on SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshwg import sdnotify
from meshwg import service_status as SS

REPO = str(Path(__file__).resolve().parents[1])


def _receiver(address) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(10)   # every wait below has this deadline
    return s


def test_sends_to_a_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        n = sdnotify.Notifier(path)
        assert n.enabled and n.ready("2 peers: 1 direct,\n1 relayed")
        assert rx.recv(4096) == b"READY=1\nSTATUS=2 peers: 1 direct, 1 relayed"   # one line
        assert n.stopping() and rx.recv(4096) == b"STOPPING=1"
        n.close()


def test_sends_to_an_abstract_socket():
    name = f"meshwg-test-{os.getpid()}-{random.randrange(1 << 30)}"
    with _receiver(b"\0" + name.encode()) as rx:
        n = sdnotify.Notifier("@" + name)
        assert n.status("connecting to the signal server")
        assert rx.recv(4096) == b"STATUS=connecting to the signal server"
        n.close()


@pytest.mark.parametrize("value", [None, "", "relative/sock", "vsock:2:1234", "@"])
def test_no_or_an_unusable_socket_is_a_no_op(value):
    n = sdnotify.Notifier(value)
    assert not n.enabled and n.ready() is False and n.failed == 0


def test_a_socket_that_is_gone_never_raises(tmp_path):
    n = sdnotify.Notifier(str(tmp_path / "nobody-listens"))
    assert n.enabled and n.ready() is False and n.stopping() is False and n.failed == 2


def test_take_removes_the_variable_once(monkeypatch, tmp_path):
    monkeypatch.setattr(sdnotify, "_taken", None)
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "OTHER": "1"}
    first = sdnotify.take(env)
    assert env == {"OTHER": "1"} and first.address == str(tmp_path / "s")   # children do not inherit it
    assert sdnotify.take({"NOTIFY_SOCKET": "/elsewhere"}) is first


def test_agent_status_lines():
    assert SS.agent_status(welcomed=False, connected=False, failures=0) == "connecting to the signal server"
    assert SS.agent_status(welcomed=False, connected=False, failures=2) == "connecting to the signal server (attempt 3)"
    assert SS.agent_status(welcomed=True, connected=True, failures=0) == "no peers yet"
    assert SS.agent_status(welcomed=True, connected=True, failures=0, direct=2, relayed=1) == \
        "3 peers: 2 direct, 1 relayed"
    assert SS.agent_status(welcomed=True, connected=False, failures=3, direct=1, idle=1) == \
        "reconnecting (attempt 4); 2 peers: 1 direct, 0 relayed, 1 idle"


def test_count_paths_as_status_shows_them():
    rows = [{"path": "direct", "active": True}, {"path": "relay", "active": True},
            {"path": "relay", "active": False}, {"path": "relay", "active": False, "plain": True}]
    assert SS.count_paths(rows) == (1, 2, 1)   # a plain peer is never idle


def test_server_status_lines():
    assert SS.mbit_per_s(0, 12_500_000, 10.0) == 10.0
    assert SS.mbit_per_s(5, 4, 10.0) == 0.0 and SS.mbit_per_s(0, 10, 0.0) == 0.0
    assert SS.server_status(control=True, nodes_connected=1, relay_sessions=2, mbit=3.25) == \
        "1 node connected, 2 relay sessions, relaying 3.2 Mbit/s"
    assert SS.server_status(control=False, nodes_connected=0, relay_sessions=1, mbit=0) == \
        "relay only: 1 relay session, relaying 0.0 Mbit/s"


def _free_ports(host: str, n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize("command", ["serve", "relay"])
def test_real_server_ready_after_listeners_stopping_on_sigterm(tmp_path, command):
    host = f"127.{random.randrange(1, 250)}.{random.randrange(1, 250)}.{random.randrange(2, 250)}"
    control, relay_tcp, udp = _free_ports(host, 3)
    db = str(tmp_path / "signal.db")
    if command == "relay":   # relay runs on an existing database
        subprocess.run([sys.executable, "-m", "signal_server", "--db", db, "service", "install", "--init",
                        "--unit-dir", str(tmp_path / "u"), "--service-config", str(tmp_path / "s.toml")],
                       cwd=REPO, check=True, capture_output=True, timeout=60)
    path = str(tmp_path / "notify")
    rx = _receiver(path)
    env = dict(os.environ, PYTHONPATH=REPO, NOTIFY_SOCKET=path)
    argv = [sys.executable, "-m", "signal_server", command, "--db", db, "--udp", f"{host}:{udp}",
            "--stun-alt-port", "none", "--relay-tcp", f"{host}:{relay_tcp}", "--plain-udp", "none"]
    if command == "serve":
        argv += ["--init", "--listen", f"{host}:{control}"]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = rx.recv(4096).decode()
        assert first.startswith("READY=1\n"), first
        # READY means the listeners are bound: they take a connection at once.
        for port in ([control] if command == "serve" else []) + [relay_tcp]:
            socket.create_connection((host, port), timeout=5).close()
        expected = "STATUS=0 nodes connected" if command == "serve" else "STATUS=relay only: 0 relay sessions"
        assert expected in first
        proc.send_signal(signal.SIGTERM)
        assert rx.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        rx.close()

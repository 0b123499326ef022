"""The real `meshwg-signal` process: CLI admin while it runs, kill -9 and restart keep nodes and addresses."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio
from sig_helpers import new_key

from meshwg.control import ControlConnection, JoinRefusedError, parse_invite
from meshwg.control import client as ev
from meshwg.mesh.agent_core import update_directory

PY = sys.executable


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(db, *args) -> str:
    r = subprocess.run([PY, "-m", "signal_server", *args, "--db", db], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return r.stdout


class ServerProcess:
    def __init__(self, db: str) -> None:
        self.db = db
        self.ctl, self.udp, self.rtcp, self.met = free_port(), free_port(socket.SOCK_DGRAM), free_port(), free_port()
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [PY, "-m", "signal_server", "serve", "--init", "--db", self.db, "--listen", f"127.0.0.1:{self.ctl}",
             "--udp", f"127.0.0.1:{self.udp}", "--relay-tcp", f"127.0.0.1:{self.rtcp}",
             "--metrics", f"127.0.0.1:{self.met}", "--plain-udp", "none", "--heartbeat", "1", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.met), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start: " + self.proc.stderr.read().decode())

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture
def server_proc(tmp_path):
    sp = ServerProcess(str(tmp_path / "state.db"))
    sp.start()
    yield sp
    sp.stop()


def _key_only(inv):
    """The invite a registered node rejoins with: its key alone, no secret (a lost join gets not_registered)."""
    return dataclasses.replace(inv, invite_id="", secret=b"")


async def _join_then_kill9(sp, inv, key, name=None):
    """Join, and kill -9 the server the moment it acknowledges (the welcome), before anything (the CLI,
    another connection, this one closing) could read the row back or give a lazy commit time to land."""
    with trio.fail_after(10):
        c = await ControlConnection.open(inv, key, name=name)
    sp.kill9()
    await c.aclose()
    return c.welcome


async def _rejoin(inv, key):
    with trio.fail_after(10):
        c = await ControlConnection.open(inv, key)
    await c.aclose()
    w = c.welcome
    return w.node_id, w.name, w.ipv4, w.ipv6


async def test_kill9_right_after_the_acknowledgement_keeps_every_join(server_proc):
    """Every acknowledged join survives a kill -9 that follows the welcome at once: the node rejoins on its
    key alone with the same id, name and addresses, and a consumed one-time invite stays consumed."""
    sp = server_proc
    text = cli(sp.db, "invite", "create", "--reusable", "--expires", "1h", "--tag", "home").strip()
    inv = parse_invite(text)
    assert inv.addrs == (f"127.0.0.1:{sp.ctl}",)
    one_time = parse_invite(cli(sp.db, "invite", "create").strip())
    keys = [new_key() for _ in range(3)]
    before = []
    for i, k in enumerate(keys[:2]):
        before.append(await _join_then_kill9(sp, inv, k, name=f"box{i}"))
        sp.start()
    before.append(await _join_then_kill9(sp, one_time, keys[2]))
    sp.start()
    for k, w in zip(keys, before):
        assert await _rejoin(_key_only(inv), k) == (w.node_id, w.name, w.ipv4, w.ipv6)
    with pytest.raises(JoinRefusedError) as info:  # the consumed one-time invite stays consumed
        with trio.fail_after(10):
            await ControlConnection.open(one_time, new_key())
    assert info.value.code == "invite_used"
    listing = cli(sp.db, "nodes")
    assert len(listing.splitlines()) == 4 and "expired" not in listing and "box0" in listing and before[1].ipv4 in listing
    assert "used" in cli(sp.db, "invite", "list")
    r = subprocess.run([PY, "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])", sp.db],
                       capture_output=True, text=True, timeout=20)
    assert r.stdout.strip() == "ok"


async def test_cli_admin_while_running(server_proc):
    sp = server_proc
    inv = parse_invite(cli(sp.db, "invite", "create", "--reusable").strip())
    a = await ControlConnection.open(inv, new_key(), name="alpha")
    b = await ControlConnection.open(inv, new_key(), name="beta")
    # alpha sees beta appear (directory push from the real process)
    seen: dict = {}
    with trio.fail_after(3):
        while len(seen) < 1:
            for e in await a.receive_events():
                update_directory(seen, e)

    out = cli(sp.db, "status")
    assert "connected nodes 2" in out and "registered nodes: 2" in out

    cli(sp.db, "nodes", "rename", "beta", "gamma")
    with trio.fail_after(2):
        while not any(p.name == "gamma" for p in seen.values()):
            for e in await a.receive_events():
                update_directory(seen, e)

    t0 = time.monotonic()
    cli(sp.db, "nodes", "remove", "gamma")
    removed_at = None
    with trio.fail_after(3):
        while removed_at is None:
            for e in await a.receive_events():
                if isinstance(e, ev.PeerRemoved):
                    removed_at = time.monotonic()
    # the CLI process start-up is included; the server's own push is bounded by its 0.1 s DB poll
    assert removed_at - t0 < 3.0
    with trio.fail_after(2):
        events = []
        try:
            while True:
                events += await b.receive_events()
        except ev.ConnectionLost:
            pass
    assert any(isinstance(e, ev.Removed) for e in events)

    inv_id = cli(sp.db, "invite", "list").splitlines()[1].split()[0]
    cli(sp.db, "invite", "revoke", inv_id)
    with pytest.raises(JoinRefusedError, match="revoked"):
        await ControlConnection.open(inv, new_key())
    await a.aclose()

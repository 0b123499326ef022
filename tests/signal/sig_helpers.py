"""Fixtures for signal server tests: an in-process server on loopback with ephemeral ports."""

from __future__ import annotations

import os
import time

import pytest
import trio

from meshwg.signaling.invite import join_hostport
from signal_server.admin import create_invite
from signal_server.server import ServerConfig, SignalServer
from signal_server.store import Store


class Harness:
    def __init__(self, server: SignalServer, db: str) -> None:
        self.server = server
        self.db = db
        self.admin = Store(db)  # a second connection, like the admin CLI in another process
        b = server.bound
        self.control = b.control[0]
        self.udp = b.udp[0] if b.udp else None
        self.relay_tcp = b.relay_tcp[0] if b.relay_tcp else None
        self.metrics = b.metrics[0] if b.metrics else None
        self.plain = b.plain[0] if b.plain else None

    def invite(self, **kw):
        return create_invite(self.admin, wall=time.time(), addrs=[join_hostport(*self.control)], **kw)


async def start_server(nursery, tmp_path, **overrides) -> Harness:
    db = str(tmp_path / "signal.db")
    cfg = ServerConfig(
        db=db, control=[("127.0.0.1", 0)], udp=[("127.0.0.1", 0)], relay_tcp=[("127.0.0.1", 0)],
        metrics=[("127.0.0.1", 0)], heartbeat=1.0, idle_timeout=4.0, coalesce=0.02, db_poll=0.05, init=True,
        plain_udp=None,  # tests that want the plain-WireGuard port ask for ("127.0.0.1", 0)
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    server = SignalServer(cfg)
    await start_task(nursery, server.run)
    return Harness(server, db)


START_DEADLINE = 10.0  # a task that has not started by then (a join that keeps failing) fails the test


async def start_task(nursery, fn, timeout: float = START_DEADLINE):
    """nursery.start(fn) with a deadline: ControlClient.run, for one, retries a failing join forever."""
    with trio.fail_after(timeout):
        return await nursery.start(fn)


def new_key() -> bytes:
    return os.urandom(32)


async def wait_until(pred, timeout: float = 3.0, step: float = 0.01):
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(step)


@pytest.fixture
async def harness(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    yield h
    h.admin.close()


def require_real_components(*names: str) -> None:
    """tests/conftest.py's check (imported by path: this directory has no conftest of its own)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("_meshwg_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.require_real_components(*names)

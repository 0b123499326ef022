"""A node that comes back (new process, new port) while the server still holds its previous session:
the newest session wins in every phase of the old one, and every other node sees the new candidates."""

from __future__ import annotations

import time

import trio
from sig_helpers import harness, new_key, wait_until  # noqa: F401 (fixture)

from meshwg.control import ControlConnection
from meshwg.control import client as ev
from meshwg.signaling import protocol as P
from meshwg.wg.crypto import clamp, dh_pub
from signal_server.server import Session


class Observer:
    """Another node: a control connection whose directory view is kept current by a reader task."""

    def __init__(self, conn: ControlConnection) -> None:
        self.conn = conn
        self.peers: dict[bytes, ev.PeerInfo] = {}

    async def run(self) -> None:
        while True:
            for e in await self.conn.receive_events():
                if isinstance(e, ev.DirectoryReset):
                    self.peers = dict(e.peers)
                elif isinstance(e, ev.PeerChanged):  # directory pushes only, not punch notices
                    self.peers[e.peer.key] = e.peer

    def ports(self, key: bytes) -> set[int]:
        p = self.peers.get(key)
        return {c[1] for c in p.candidates} if p else set()

    def online(self, key: bytes) -> bool:
        p = self.peers.get(key)
        return bool(p and p.online)


async def observer(harness, nursery) -> Observer:
    obs = Observer(await ControlConnection.open(harness.invite(), new_key()))
    nursery.start_soon(obs.run)
    return obs


def cands(port: int) -> list:
    return [("192.0.2.7", port, "local")]


async def test_returning_node_while_old_session_lives_shows_new_port(harness, nursery):
    obs = await observer(harness, nursery)
    key = new_key()
    old = await ControlConnection.open(harness.invite(), key, candidates=cands(1111))
    pub = dh_pub(old.private_key)
    await wait_until(lambda: obs.ports(pub) == {1111})
    # The process restarts on another port before the server noticed the old connection is gone.
    t0 = time.monotonic()
    new = await ControlConnection.open(harness.invite(), key, candidates=cands(2222))
    await wait_until(lambda: obs.ports(pub) == {2222} and obs.online(pub), timeout=1.0)
    seen = time.monotonic() - t0
    await old.aclose()  # the old connection's teardown must not touch the new session's state
    await trio.sleep(0.3)
    assert obs.ports(pub) == {2222} and obs.online(pub), (obs.peers.get(pub), seen)
    node = harness.server.directory.nodes[pub]
    assert node.online and [c[1] for c in node.candidates] == [2222]
    await new.aclose()


async def test_returning_node_after_old_session_closed_shows_new_port(harness, nursery):
    obs = await observer(harness, nursery)
    key = new_key()
    old = await ControlConnection.open(harness.invite(), key, candidates=cands(1111))
    pub = dh_pub(old.private_key)
    await wait_until(lambda: obs.ports(pub) == {1111})
    await old.aclose()
    await wait_until(lambda: not obs.online(pub))
    assert obs.ports(pub) == set()
    new = await ControlConnection.open(harness.invite(), key, candidates=cands(2222))
    await wait_until(lambda: obs.ports(pub) == {2222} and obs.online(pub), timeout=1.0)
    await new.aclose()


class _Chan:
    """Stands in for the encrypted channel of a session the test drives by hand."""

    error = None

    def encode(self, msg: dict) -> bytes:
        return P.pack(msg)

    def feed_untrusted(self, data: bytes) -> list:
        return []


class _Stream:
    """A client connection whose first send blocks until `release` (a slow or silently dropped peer)."""

    def __init__(self, block_first: bool) -> None:
        self.release = trio.Event()
        self.blocked = trio.Event()
        self.block_first = block_first
        self.sent: list[bytes] = []

    async def send_all(self, data: bytes) -> None:
        if self.block_first and not self.sent:
            self.blocked.set()
            await self.release.wait()
        self.sent.append(data)

    async def receive_some(self, n: int) -> bytes:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


async def test_old_session_still_in_its_welcome_is_replaced_and_cannot_clobber(harness, nursery):
    """The old session of a key is still sending its welcome (slow peer) when the same key connects
    again. It must end, not later subscribe (which wiped the new session's pending changes) or publish
    its stale candidates over the new ones."""
    server = harness.server
    obs = await observer(harness, nursery)
    key = new_key()
    inv = harness.invite()
    pub = dh_pub(clamp(key))
    row, _ = await server._db(server.store.join, pub, inv.invite_id, inv.secret, "x", time.time(),
                              server.prefix4, server.prefix6)

    def session(block_first: bool, port: int) -> Session:
        s = Session(pub, row.node_id, _Stream(block_first), _Chan())
        s.row, s.initial_candidates = row, cands(port)
        return s

    old_done = trio.Event()

    async def run_old(s):
        try:
            await server._run_session(s)
        finally:
            old_done.set()

    s_old = session(True, 1111)
    nursery.start_soon(run_old, s_old)
    await s_old.stream.blocked.wait()
    s_new = session(False, 2222)
    nursery.start_soon(server._run_session, s_new)
    await wait_until(lambda: obs.ports(pub) == {2222} and obs.online(pub), timeout=1.0)
    s_old.stream.release.set()  # the old peer's buffer drains (or its socket errors) only now
    await trio.sleep(0.2)
    assert server.sessions[pub] is s_new
    node = server.directory.nodes[pub]
    assert node.online and [c[1] for c in node.candidates] == [2222], node.candidates
    assert obs.ports(pub) == {2222} and obs.online(pub)
    with trio.fail_after(2):
        await old_done.wait()  # replaced: it ended instead of going on with its setup
    # The new session still gets directory changes: another node's change reaches it.
    n_sent = len(s_new.stream.sent)
    other = await ControlConnection.open(harness.invite(), new_key(), candidates=cands(3333))
    await wait_until(lambda: len(s_new.stream.sent) > n_sent, timeout=1.0)
    updates = [P.unpack_untrusted(b, 1 << 20) for b in s_new.stream.sent[n_sent:]]
    assert any(m["type"] == P.T_DIR_UPDATE and m["upsert"] for m in updates), updates
    await other.aclose()

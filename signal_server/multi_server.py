"""Several `meshwg-signal serve` processes on one PostgreSQL database (issue 14 item 2): the trio tasks that make a
change made through one server reach the nodes connected to the others within a second. live_state.py decides.

- The change feed is read when a NOTIFY says a transaction appended to it (store_pg.FeedListener: a dedicated
  connection in a worker thread), and every FEED_SAFETY_POLL s besides (a lost notification, a reconnect).
- The live state of the nodes connected here (online, candidates, observed) is written at most every
  LIVE_INTERVAL s, batched in one transaction, and other servers read the rows the feed names.
- Each server records itself (id, control addresses) every BEAT s: `invite create` lists every running server,
  `nodes` shows where a node is connected; a server silent for STALE s (killed) is forgotten by the next beat of
  any other, and its nodes go offline unless they reconnected elsewhere. The running servers' addresses go into
  every welcome (nodes keep them: a node whose invite named a server that died finds the others).
- The database going away (restarted, unreachable) ends no session: every task here retries; when it is back, the
  feed is read from the last seq seen and this server writes every connected node's live row again (a crash
  empties the UNLOGGED tables; the others may have marked our nodes offline meanwhile). A server that could not
  beat for STALE s itself forgets no other at its first beat after that: they could not beat either.
"""

from __future__ import annotations

import base64
import collections
import logging
import math
import os
import time

import msgpack
import trio

from signal_server import live_state
from signal_server import store_api as api
from signal_server.control_core import DIR_CHANGED, Send

log = logging.getLogger("signal")

FEED_SAFETY_POLL = 5.0  # the feed read without a notification (NOTIFY brings it within milliseconds)
LIVE_INTERVAL = 0.1  # live state written at most this often (one transaction for every node changed meanwhile)
BEAT, STALE = live_state.BEAT, live_state.STALE
FORWARD_TYPES = frozenset({"punch"})  # control messages for a node on another server that are sent there
FORWARD_QUEUE = 256  # forwarded messages waiting for the database; more are dropped and counted
# ...of which one requester (the node whose punch request made them) may hold this many: a node with many peers on
# other servers (each pair may punch a few times a second) must not fill the queue that every node's punches share.
FORWARD_SHARE = 16
MAX_WELCOME_SERVERS = 16  # control addresses listed in a welcome
DB_RETRY = 0.5  # s between retries of the live state while the database fails


def enabled(store, cfg) -> bool:
    return store.multi_server and cfg.control_enabled


class MultiServer:
    def __init__(self, server) -> None:
        from signal_server.store_pg import FeedListener

        self.srv = server
        self.store = server.store
        self.id = os.urandom(6).hex()  # a new one at every start: a restarted server is a new one
        self.started = time.time()
        self.listener = FeedListener(self.store.url, self.id)
        self.feed_wake = trio.Event()
        self.live_wake = trio.Event()
        self.where: dict[bytes, str] = {}  # node key -> the other server it is connected to (its live row)
        self.others: list[str] = []  # the other running servers' control addresses (for welcomes)
        self.last_beat = time.monotonic()  # of the last beat that reached the database
        self._fwd_send, self._fwd_recv = trio.open_memory_channel(FORWARD_QUEUE)
        self._fwd_held: collections.Counter = collections.Counter()  # requester -> its messages in the queue
        self._since: dict[bytes, tuple] = {}  # node key -> (its session here, when this server first saw it)
        server.directory.tracking = True

    def kick(self) -> None:
        """The directory changed: live state may be there to write."""
        if self.srv.directory.live_dirty:
            self.live_wake.set()

    def load(self) -> None:
        """Every live row, at start (with the node rows): nodes already connected to other servers."""
        self.apply_rows(self.store.live_rows())

    def apply_rows(self, rows) -> None:
        effects, d = [], self.srv.directory
        for row in rows:
            if row[2] and row[1] != self.id:
                self.where[row[0]] = row[1]
            else:
                self.where.pop(row[0], None)
            act = live_state.remote_action(row, self.srv.sessions, self.id, self._session_since)
            if act == live_state.RECLAIM:
                d.live_dirty.add(row[0])
            elif act == live_state.YIELD:
                self._yield(row[0], row[1])
            elif act == live_state.APPLY and d.apply_remote(row[0], row[2], row[3], row[4]):
                effects = [DIR_CHANGED]
        self.srv.apply(effects)
        self.kick()

    def _session_since(self, key: bytes) -> float | None:
        """When the node's session here began, as near as this server knows (wall clock; None: no session)."""
        s = self.srv.sessions.get(key)
        if s is None:
            self._since.pop(key, None)
            return None
        seen = self._since.get(key)
        if seen is None or seen[0] is not s:
            seen = self._since[key] = (s, time.time())
        return seen[1]

    def _yield(self, key: bytes, server: str) -> None:
        """The node connected to `server` after its session here began: that session is closed, as a second
        connection to one server replaces the first (its row is read again once the session has gone)."""
        s = self.srv.sessions.get(key)
        if s is None or s.closing:
            return
        self.srv.counters["live_yielded"] += 1
        log.info("node %s connected to server %s since: closing its session here", s.row.name, server)
        s.closing = "replaced (the node connected to another server)"
        s.scope.cancel()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self._beat_once()  # listed before the server says it serves (an invite created then names it)
        async with trio.open_nursery() as n:
            n.start_soon(self._listen)
            n.start_soon(self._follow)
            n.start_soon(self._write_live)
            n.start_soon(self._beat)
            n.start_soon(self._forwarder)
            task_status.started()

    async def _listen(self) -> None:
        errors = self.listener.errors
        while True:
            changed, payloads = await trio.to_thread.run_sync(self.listener.wait, 1.0, abandon_on_cancel=True)
            if changed:
                self.feed_wake.set()
                if self.listener.errors != errors:  # listening again after the database came back
                    errors = self.listener.errors
                    self.rewrite_live()
            for p in payloads:
                self._deliver(p)

    # --- control messages for nodes on another server (a punch: both sides must hear it at once)

    def forward(self, to: bytes, msg: dict) -> None:
        """A message for a node not connected here: to its server, when it is on one and the type may go."""
        sid = self.where.get(to)
        if sid is None or msg.get("type") not in FORWARD_TYPES:
            return
        who = _requester(msg, to)
        if self._fwd_held[who] >= FORWARD_SHARE:
            self.srv.counters["forward_dropped"] += 1
            self.srv.counters["forward_dropped_share"] += 1
            return
        payload = base64.b64encode(msgpack.packb([to, msg], use_bin_type=True)).decode()
        try:
            if len(payload) > store_pg_max_payload():
                raise trio.WouldBlock
            self._fwd_send.send_nowait((sid, payload, who))
        except trio.WouldBlock:
            self.srv.counters["forward_dropped"] += 1
            return
        self._fwd_held[who] += 1

    def _taken(self, who: bytes) -> None:
        self._fwd_held[who] -= 1
        if self._fwd_held[who] <= 0:
            del self._fwd_held[who]

    async def _forwarder(self) -> None:
        async for sid, payload, who in self._fwd_recv:
            self._taken(who)
            batch = {sid: [payload]}
            while True:  # what queued meanwhile goes in the same round
                try:
                    s, p, w = self._fwd_recv.receive_nowait()
                except trio.WouldBlock:
                    break
                self._taken(w)
                batch.setdefault(s, []).append(p)
            for s, ps in batch.items():
                try:
                    await self.srv._db(self.store.notify_server, s, ps)
                    self.srv.counters["forwarded"] += len(ps)
                except Exception:
                    self.srv.counters["forward_dropped"] += len(ps)

    def _deliver(self, payload: str) -> None:
        """A message another server forwarded to a node connected here; junk is dropped and counted."""
        try:
            to, msg = msgpack.unpackb(base64.b64decode(payload, validate=True), raw=False)
            ok = isinstance(to, bytes) and isinstance(msg, dict) and msg.get("type") in FORWARD_TYPES
        except (ValueError, TypeError, msgpack.UnpackException):
            ok = False
        if not ok:
            self.srv.counters["forward_bad"] += 1
            return
        self.srv.counters["forward_received"] += 1
        self.srv.apply([Send(to, msg)])

    def rewrite_live(self) -> None:
        """After an outage: every connected node's live row written again."""
        self.srv.directory.live_dirty |= set(self.srv.sessions)
        self.live_wake.set()

    async def _follow(self) -> None:
        poll = FEED_SAFETY_POLL
        while True:
            with trio.move_on_after(poll):
                await self.feed_wake.wait()
            self.feed_wake = trio.Event()
            try:
                await self.srv._follow_changes()  # from the last seq seen: what the outage held back too
                poll = FEED_SAFETY_POLL
            except Exception as exc:  # a busy or restarting database: read again soon (no NOTIFY may come)
                self.srv.db_failed("reading the change feed", exc)
                poll = DB_RETRY

    async def _write_live(self) -> None:
        d = self.srv.directory
        while True:
            await self.live_wake.wait()
            self.live_wake = trio.Event()
            dirty, d.live_dirty = d.live_dirty, set()
            entries = live_state.take_entries(d, self.srv.sessions, dirty)
            for key, online, _, _ in entries:
                if online:
                    self._session_since(key)  # noted before its row is written: a later row is newer
                else:
                    self._since.pop(key, None)
            pause = LIVE_INTERVAL
            if entries:
                try:
                    await self.srv._db(self.store.set_live, self.id, entries, time.time())
                    self.srv.counters["live_rows_written"] += len(entries)
                    # Sessions that yielded to another server: its row, which our offline did not overwrite.
                    moved = [e[0] for e in entries if not e[1] and e[0] in self.where]
                    if moved:
                        self.apply_rows(await self.srv._db(self.store.live_rows, moved))
                except Exception as exc:  # never lost: written with the next batch, when the database is back
                    self.srv.db_failed("writing live state", exc)
                    d.live_dirty |= dirty
                    self.live_wake.set()
                    pause = DB_RETRY
            await trio.sleep(pause)

    async def _beat(self) -> None:
        failed = False
        while True:
            await trio.sleep(DB_RETRY if failed else BEAT)
            try:
                await self._beat_once()
            except Exception as exc:
                self.srv.db_failed("recording this server", exc)
                failed = True
                continue
            if failed:  # the database is back: our live rows may be gone or marked offline by another server
                failed = False
                log.info("the database answers again: writing %d nodes' live state", len(self.srv.sessions))
                self.rewrite_live()
                self.feed_wake.set()

    async def _beat_once(self) -> None:
        now = time.monotonic()
        # Cut off from the database ourselves for STALE s: the others' records are as old as ours, not dead.
        stale = STALE if now - self.last_beat < STALE else math.inf
        me, control = self.id, self.control()

        def beat():
            gone = self.store.server_beat(me, control, self.started, time.time(), stale)
            return gone, self.store.servers(time.time(), STALE)
        gone, servers = await self.srv._db(beat)
        self.last_beat = now
        self.others = welcome_addrs(servers, me)
        for sid in gone:
            log.info("server %s stopped its heartbeat %d s ago: its nodes are offline unless they reconnected "
                     "elsewhere", sid, STALE)

    def control(self) -> list:
        from signal_server.control_listener import advertised

        return advertised(self.srv.bound.control, self.srv.cfg.advertise)

    def close(self) -> None:
        """At shutdown (synchronous, as the server's last writes are): forgotten at once, not after STALE."""
        self.listener.close()
        try:
            self.store.server_gone(self.id, time.time())
        except Exception:  # the others forget us after STALE
            log.warning("could not remove this server's record from the database", exc_info=True)


def _requester(msg: dict, to: bytes) -> bytes:
    """The node a forwarded punch is about (the peer entry it carries: the requester), else its recipient."""
    try:
        key = msgpack.unpackb(msg["peer"], raw=False).get("key")
    except (KeyError, TypeError, ValueError, AttributeError, msgpack.UnpackException):
        return to
    return key if isinstance(key, bytes) else to


def welcome_addrs(servers, me: str) -> list[str]:
    """The other servers' control addresses a node can use (a wildcard bind without --advertise names none)."""
    from meshwg.signaling.invite import split_hostport
    from signal_server.stun_responder import WILDCARDS

    out = []
    for sid, control, _ in servers:
        for a in control if sid != me else ():
            try:
                if split_hostport(a)[0] not in WILDCARDS:
                    out.append(a)
            except (ValueError, TypeError):
                pass
    return list(dict.fromkeys(out))


def store_pg_max_payload() -> int:
    from signal_server.store_pg import MAX_PAYLOAD

    return MAX_PAYLOAD


def live_kinds(changes) -> list[bytes]:
    """The keys whose live rows the feed says changed (in order, once each)."""
    return list(dict.fromkeys(c.key for c in changes if c.kind == api.LIVE and c.key))

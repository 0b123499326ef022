"""A node's control connection that records every message the server sent it, for tests of what a node may
learn (issue 12: a plain peer's key reaches its target nodes only)."""

from __future__ import annotations

import msgpack
import trio

from meshwg.control import ControlConnection
from meshwg.control.client import ConnectionLost
from meshwg.signaling import protocol as P
from sig_helpers import new_key


class RecordingNode:
    """A registered node (ControlConnection) whose received messages are all kept in `messages`; `run` reads
    them and heartbeats (the test server's idle timeout is 4 s). `entries` is its directory as the server
    told it: key -> the latest unpacked entry."""

    def __init__(self, conn: ControlConnection) -> None:
        self.conn = conn
        self.messages: list[dict] = list(conn._pending)  # what came with the welcome (the first dir_full)
        self.entries: dict[bytes, dict] = {}
        for m in self.messages:
            self._fold(m)
        feed = conn.chan.feed_untrusted

        def recording_feed(data):
            msgs = feed(data)
            self.messages.extend(msgs)
            for m in msgs:
                self._fold(m)
            return msgs

        conn.chan.feed_untrusted = recording_feed

    @property
    def key(self) -> bytes:
        from meshwg.wg.crypto import dh_pub

        return dh_pub(self.conn.private_key)

    def _fold(self, m: dict) -> None:
        if m.get("type") == P.T_DIR_FULL:
            if m.get("first"):
                self.entries = {}
            ups, rems = m.get("peers") or [], []
        elif m.get("type") == P.T_DIR_UPDATE:
            ups, rems = m.get("upsert") or [], m.get("remove") or []
        else:
            return
        for raw in ups:
            e = P.unpack_entry_untrusted(raw)
            self.entries[e["key"]] = e
        for k in rems:
            self.entries.pop(k, None)

    def ever_heard_of(self, key: bytes) -> bool:
        """Whether `key` is anywhere in what the server sent (entries are packed inside messages: bytes search)."""
        return any(key in msgpack.packb(m, use_bin_type=True) for m in self.messages)

    async def run(self) -> None:
        async def beat():
            while True:
                await self.conn.heartbeat()
                await trio.sleep(0.5)

        try:
            async with trio.open_nursery() as n:
                n.start_soon(beat)
                while True:
                    await self.conn.receive_events()
        except* (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the test closed it (or the server ended it): what it received stays in `messages`


async def recording_node(nursery, invite, name: str, sk: bytes | None = None) -> RecordingNode:
    node = RecordingNode(await ControlConnection.open(invite, sk or new_key(), name=name))
    nursery.start_soon(node.run)
    return node

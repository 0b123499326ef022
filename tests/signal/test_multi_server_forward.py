"""Punches forwarded to other servers (review 14 item 6): the queue every node's cross-server punches share gives
each requester a bounded part of it: a node with many peers on another server cannot fill it."""

from __future__ import annotations

import base64
from collections import Counter
from types import SimpleNamespace

import msgpack
import pytest

pytest.importorskip("psycopg")

from signal_server import multi_server  # noqa: E402


def _multi():
    srv = SimpleNamespace(store=SimpleNamespace(url="postgresql://u@127.0.0.1:1/x"),
                          directory=SimpleNamespace(tracking=False), counters=Counter())
    m = multi_server.MultiServer(srv)
    return m, srv


def _punch(requester: bytes) -> dict:
    return {"type": "punch", "peer": msgpack.packb({"key": requester, "name": "n"}, use_bin_type=True),
            "role": "responder"}


def _requester_of(payload: str) -> bytes:
    _, msg = msgpack.unpackb(base64.b64decode(payload), raw=False)
    return msgpack.unpackb(msg["peer"], raw=False)["key"]


def test_one_requester_with_many_remote_peers_leaves_room_for_the_others():
    m, srv = _multi()
    greedy, other = b"g" * 32, b"o" * 32
    peers = [bytes([i % 256, i // 256]) * 16 for i in range(1000)]
    for p in peers:
        m.where[p] = "srv-b"
    for p in peers:                                  # 1000 peers on server B, one punch each
        m.forward(p, _punch(greedy))
    m.forward(peers[0], _punch(other))               # another node's punch still goes
    held = []
    while True:
        try:
            held.append(m._fwd_recv.receive_nowait())
        except multi_server.trio.WouldBlock:
            break
    by_requester = Counter(_requester_of(item[1]) for item in held)
    assert by_requester[greedy] <= 16 and by_requester[other] == 1
    assert srv.counters["forward_dropped"] >= 1000 - 16

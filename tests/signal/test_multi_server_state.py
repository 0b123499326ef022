"""The shared live state of several servers on one PostgreSQL (issue 14 item 2), below the servers: who owns a
node's live row, what a server writes and applies (live_state.py, pure), and the store's rules (store_pg.py)."""

from __future__ import annotations

import os

from signal_server import live_state
from signal_server import store_api as api
from signal_server.control_core import ControlCore
from signal_server.directory import Node
from signal_server.store_pg import PgStore

from pg_cluster import pg_cluster, pg_url  # noqa: F401 (fixtures)

X, Y = b"x" * 32, b"y" * 32
CAND = [("10.1.2.3", 41641, "local")]


def directory_with(*keys):
    d = live_state.SharedDirectory()
    d.tracking = True
    for i, k in enumerate(keys, 1):
        d.put(Node(i, k, f"n{i}", f"100.64.0.{i}", f"fd00::{i}"))
    return d


def test_local_changes_are_remembered_and_remote_ones_are_not():
    d = directory_with(X, Y)
    core = ControlCore(d, {X})
    core.session_ready(X, CAND)
    assert d.live_dirty == {X}
    d.live_dirty.clear()
    assert d.apply_remote(Y, True, CAND, [])  # another server's node: in the directory, not written back
    assert d.nodes[Y].online and d.live_dirty == set()
    core.session_ended(X)
    assert d.live_dirty == {X}


def test_a_node_arriving_from_another_server_with_the_same_candidates_is_claimed():
    """Its old server was killed: the row still says online there, with the candidates it reports here too."""
    d = directory_with(X)
    core = ControlCore(d, {X})
    d.apply_remote(X, True, CAND, [])
    assert d.live_dirty == set()
    core.session_ready(X, CAND)  # nothing changes in the entry...
    assert d.live_dirty == {X}  # ...but the row must name this server now


def test_entries_written_are_online_for_sessions_here_and_offline_for_ended_ones():
    d = directory_with(X, Y)
    d.update(X, online=True, candidates=CAND)
    d.apply_remote(Y, True, CAND, [])  # online on another server; its relay traffic came here (observed)
    d.set_observed(Y, ("198.51.100.7", 4000))
    entries = live_state.take_entries(d, {X}, {X, Y, b"gone" * 8})
    # Y is not claimed: "offline" is written only while the row is ours (the store's rule below)
    assert sorted(entries) == [(X, True, [list(CAND[0])], []), (Y, False, [], [])]


def test_a_row_of_a_node_connected_here_naming_another_server_is_reclaimed():
    assert live_state.remote_action((X, "srv-b", True, [], []), {X}, "srv-a") == live_state.RECLAIM
    assert live_state.remote_action((X, "srv-a", True, [], []), {X}, "srv-a") == live_state.SKIP
    assert live_state.remote_action((X, "srv-b", True, [], []), set(), "srv-a") == live_state.APPLY


def test_offline_is_written_only_while_the_row_is_still_the_servers_own(pg_url):
    st = PgStore(pg_url, init=True)
    head = st.change_head()
    st.set_live("a", [(X, True, [list(CAND[0])], [])], 100.0)
    st.set_live("b", [(X, True, [["10.9.9.9", 1, "local"]], [])], 101.0)  # the node moved to B
    st.set_live("a", [(X, False, [], [])], 102.0)  # A's old session ends after that
    assert st.live_rows([X]) == [(X, "b", True, [("10.9.9.9", 1, "local")], [])]
    changes, _ = st.changes_since(head)
    assert [c.kind for c in changes] == [api.LIVE, api.LIVE]  # the no-op wrote no change
    st.set_live("b", [(X, False, [], [])], 103.0)
    assert st.live_rows([X]) == [(X, "b", False, [], [])]
    st.close()


def test_a_silent_server_is_forgotten_and_its_nodes_go_offline(pg_url):
    st = PgStore(pg_url, init=True)
    assert st.server_beat("a", ["10.0.0.1:7300"], 90.0, 100.0, 10.0) == []
    assert st.server_beat("b", ["10.0.0.2:7300"], 95.0, 100.0, 10.0) == []
    st.set_live("a", [(X, True, [list(CAND[0])], [])], 100.0)
    st.set_live("b", [(Y, True, [], [])], 100.0)
    assert [s[1] for s in st.servers(105.0, 10.0)] == [["10.0.0.1:7300"], ["10.0.0.2:7300"]]
    head = st.change_head()
    assert st.server_beat("b", ["10.0.0.2:7300"], 95.0, 111.0, 10.0) == ["a"]  # a's last beat: 11 s ago
    assert [s[0] for s in st.servers(111.0, 10.0)] == ["b"]
    assert {r[0]: r[2] for r in st.live_rows()} == {X: False, Y: True}
    assert [(c.kind, c.key) for c in st.changes_since(head)[0]] == [(api.LIVE, X)]
    st.server_gone("b", 112.0)
    assert st.servers(112.0, 10.0) == [] and {r[0]: r[2] for r in st.live_rows()} == {X: False, Y: False}
    st.close()


def test_the_cache_keeps_the_learned_servers_for_the_same_mesh_only():
    import base64

    from meshwg.control.reconnect import merge_addrs
    from meshwg.io.agent.agent_state import cached_servers

    key = bytes(range(32))
    cache = {"control": {"addrs": ["10.0.0.1:7300", "10.0.0.2:7300"], "server_key": base64.b64encode(key).decode()}}
    assert cached_servers(cache, key) == ("10.0.0.1:7300", "10.0.0.2:7300")
    assert cached_servers(cache, bytes(32)) == ()  # another mesh's cache
    assert cached_servers({"control": {"addrs": ["junk"], "server_key": cache["control"]["server_key"]}}, key) == ()
    assert cached_servers(None, key) == ()
    # The invite's address first, then what the welcome (or the cache) adds.
    assert merge_addrs(("10.0.0.1:7300",), ("10.0.0.2:7300", "10.0.0.1:7300")) == ("10.0.0.1:7300", "10.0.0.2:7300")


def test_a_welcome_names_other_servers_reachable_only():
    from signal_server.multi_server import welcome_addrs

    servers = [("me", ["10.0.0.1:7300"], 1.0), ("b", ["0.0.0.0:7300", "10.0.0.2:7300"], 1.0), ("c", ["[::]:7300"], 1.0)]
    assert welcome_addrs(servers, "me") == ["10.0.0.2:7300"]


def test_servers_of_one_database_on_one_host_get_their_own_admin_sockets_and_the_cli_finds_one(tmp_path, monkeypatch):
    import socket

    from signal_server import admin_socket as AS

    monkeypatch.setattr(AS, "RUN_DIR", str(tmp_path))
    url, other = "postgresql://u:secret@db/mesh", "postgresql://u@db/other"
    a, b = AS.socket_path(url, None, 7300), AS.socket_path(url, None, 7310)
    assert a != b and AS.socket_path(other, None, 7300) not in (a, b)
    assert AS.socket_path(url.replace("secret", "other"), None, 7300) == a  # the password is no part of the name
    assert not os.path.exists(AS.socket_path(url, None))  # none running: the CLI opens the database itself
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(a)  # a killed server's socket: nobody listens
    live = AS.AdminListener(b)
    try:
        assert AS.socket_path(url, None) == b
        assert not os.path.exists(AS.socket_path(other, None))  # another database's server is not ours
    finally:
        live.close()
        stale.close()

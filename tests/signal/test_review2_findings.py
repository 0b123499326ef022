"""Review of issue 14 items 1-3 (review2): proofs of concept for problems in files the reviewer does not own, left
xfail(strict=True) with the reason until their owners fix them (each passes once fixed: strict turns that into a
failure, so the mark must then go)."""

from __future__ import annotations

import base64
import json
import os

import pytest

from meshwg.signaling import relay_wire as W
from signal_server import live_state, store_dump
from signal_server.relay import RelayCore
from signal_server.store_api import StoreError

WALL = 1_800_000_000.0


def test_spoofed_pings_from_one_ip_get_a_bounded_number_of_pongs():
    core = RelayCore(bytes(range(32)), os.urandom)
    ping = W.encode_ping(b"12345678")
    pongs = sum(len(core.handle_untrusted(ping, (0, ("198.51.100.7", port)), 0.0, WALL)) for port in range(1, 1001))
    assert pongs <= 50   # a node probes a relay a few times a second; STUN allows 50 at once per IP


@pytest.mark.parametrize("url", ["postgresql://u:s3cretpw@[::1/db", "postgresql://u:s3cret%zzpw@127.0.0.1:1/db",
                                 "postgresql://u@127.0.0.1:1/db?password=s3cretpw&sslmode=zz"])
def test_a_bad_database_url_error_never_shows_the_password(url):
    pytest.importorskip("psycopg")
    from signal_server.store_pg import PgStore

    with pytest.raises(StoreError) as err:
        PgStore(url, connect_timeout=1)
    assert "s3cret" not in str(err.value)


def _dump(tmp_path, **tables) -> str:
    key = {"b64": base64.b64encode(os.urandom(32)).decode()}
    body = {"meta": [["server_private_key", key]], "sequences": [], "invites": [], "nodes": [], "removed_keys": [],
            "routes": []}
    body.update({k: v(key) if callable(v) else v for k, v in tables.items()})
    path = tmp_path / "dump.json"
    path.write_text(json.dumps({"format": store_dump.FORMAT, "schema": store_dump.SCHEMA, "tables": body}))
    return str(path)


@pytest.mark.parametrize("tables", [
    {"meta": lambda k: [["server_private_key", k], ["server_private_key", k]]},   # IntegrityError
    {"sequences": [[["nodes"], 1]]},                                               # TypeError
    {"meta": [["server_private_key", {"b64": "AAAA"}]]},                           # a 3-byte identity
    {"meta": [["server_private_key", {"b64": "!!"}]]},                             # an empty identity
], ids=["duplicate-meta", "unhashable-sequence", "short-key", "bad-base64-key"])
def test_restoring_a_bad_dump_is_a_one_line_error_and_leaves_no_database(tmp_path, tables):
    db = str(tmp_path / "signal.db")
    with pytest.raises(StoreError):
        store_dump.restore(_dump(tmp_path, **tables), db)
    assert not os.path.exists(db)


def test_two_servers_holding_one_nodes_session_do_not_reclaim_from_each_other_forever():
    key = b"k" * 32
    row_by_b = (key, "B", True, [("192.0.2.1", 1, "stun")], [])
    row_by_a = (key, "A", True, [("192.0.2.2", 2, "stun")], [])
    a_reclaims = live_state.remote_action(row_by_b, {key}, "A") == live_state.RECLAIM
    b_reclaims = live_state.remote_action(row_by_a, {key}, "B") == live_state.RECLAIM
    assert not (a_reclaims and b_reclaims)


def test_the_server_whose_session_is_older_yields_and_an_older_row_is_reclaimed():
    key = b"k" * 32
    row_by_b = live_state.LiveRow.make((key, "B", True, [], []), 1000.0)   # B's session wrote at 1000
    assert live_state.remote_action(row_by_b, {key}, "A", lambda k: 990.0) == live_state.YIELD    # ours is older
    assert live_state.remote_action(row_by_b, {key}, "A", lambda k: 1010.0) == live_state.RECLAIM  # ours is newer
    row_by_a = live_state.LiveRow.make((key, "A", True, [], []), 1011.0)   # A reclaimed: B's session is older
    assert live_state.remote_action(row_by_a, {key}, "B", lambda k: 1000.0) == live_state.YIELD
    offline = live_state.LiveRow.make((key, "B", False, [], []), 1020.0)  # B's session ended: the node is ours
    assert live_state.remote_action(offline, {key}, "A", lambda k: 990.0) == live_state.RECLAIM
    assert row_by_b == (key, "B", True, [], [])                            # compares as the 5-tuple


def test_a_peer_route_or_candidate_naming_a_regional_relay_is_refused():
    import ipaddress

    from meshwg.control.events import RelayInfo, Welcome
    from meshwg.mesh.peer_entry import entry_policy

    eu = RelayInfo("eu", b"e" * 32, (("198.51.100.20", 3478),), (("198.51.100.20", 443),))
    welcome = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                      (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 15.0, b"s" * 32, relays=(eu,))
    policy = entry_policy(welcome)
    assert policy.route_refused(ipaddress.ip_network("198.51.100.0/24")) == "drop_peer_route_server"
    assert policy.candidate_refused(("198.51.100.20", 3478), "stun") == "drop_peer_candidate_server"

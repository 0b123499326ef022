"""The control core on explicit inputs: messages in, effects out; registry changes from the feed."""

from __future__ import annotations

from meshwg.signaling import protocol as P
from signal_server.control_core import DIR_CHANGED, Allow, ControlCore, Drop, Send
from signal_server.directory import Directory
from signal_server.store_api import NodeRow

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def row(key: bytes, node_id: int, name: str = "n", expires=None) -> NodeRow:
    return NodeRow(node_id, key, name, f"100.64.0.{node_id}", f"fd00::{node_id}", 0.0, None, expires, "inv", "")


def core_with(*keys, connected=()) -> ControlCore:
    core = ControlCore(Directory(mesh_nets=("100.64.0.0/10", "fd00::/48")), set(connected))
    for i, k in enumerate(keys, 1):
        core.session_started(k, row(k, i))
    return core


def test_heartbeat_is_acknowledged_to_its_sender():
    core = core_with(A, connected={A})
    assert core.on_message(A, {"type": P.T_HEARTBEAT, "seq": 7}, 0.0) == [Send(A, {"type": P.T_HEARTBEAT_ACK, "seq": 7})]


def test_unknown_type_is_counted_and_dropped():
    core = core_with(A)
    assert core.on_message(A, {"type": "format_disk"}, 0.0) == []
    assert core.counters["control_unknown_type"] == 1 and core.counters["control_messages"] == 1


def test_candidates_are_filtered_and_change_the_directory_once():
    core = core_with(A, B)
    msg = {"type": P.T_CANDIDATES, "candidates": [["192.168.1.5", 51820, "local"], ["127.0.0.1", 1, "local"],
                                                 ["100.64.0.9", 2, "local"], ["198.51.100.1", 3, "observed"]]}
    assert core.on_message(A, msg, 0.0) == [DIR_CHANGED]
    assert core.directory.nodes[A].candidates == [("192.168.1.5", 51820, "local")]
    assert core.counters["control_candidates_refused"] == 3  # loopback, mesh address, a kind only we set
    assert core.on_message(A, msg, 0.0) == []  # nothing new: no push
    assert core.on_message(A, {"type": P.T_CANDIDATES, "candidates": "junk"}, 0.0) == []
    assert core.counters["control_bad_candidates"] == 1


def test_sealed_goes_to_a_connected_peer_only():
    core = core_with(A, B, connected={A, B})
    blob = b"x" * 100
    assert core.on_message(A, {"type": P.T_SEAL_SEND, "to": B, "blob": blob}, 0.0) == [
        Send(B, {"type": P.T_SEALED, "from": A, "blob": blob})]
    # a key outside the mesh: the same answer as a hidden member (no oracle for membership)
    assert core.on_message(A, {"type": P.T_SEAL_SEND, "to": C, "blob": blob}, 0.0) == [
        Send(A, {"type": "seal_fail", "to": C, "reason": "unknown_peer"})]
    core = core_with(A, B, connected={A})  # a member that is not connected
    assert core.on_message(A, {"type": P.T_SEAL_SEND, "to": B, "blob": blob}, 0.0) == [
        Send(A, {"type": "seal_fail", "to": B, "reason": "peer_offline"})]
    assert core.on_message(A, {"type": P.T_SEAL_SEND, "to": B, "blob": b"x" * (16 * 1024 + 1)}, 0.0) == []
    assert core.counters["control_bad_sealed"] == 1


def test_punch_reaches_both_sides_when_the_target_is_online():
    core = core_with(A, B, connected={A, B})
    assert core.on_message(A, {"type": P.T_PUNCH_REQUEST, "peer": B}, 0.0) == [
        Send(A, {"type": "punch_fail", "peer": B, "reason": "peer_offline"})]
    core.session_ready(B, [])
    out = core.on_message(A, {"type": P.T_PUNCH_REQUEST, "peer": B}, 1.0)
    assert [(s.to, s.msg["role"]) for s in out] == [(A, "initiator"), (B, "responder")]
    assert core.on_message(A, {"type": P.T_PUNCH_REQUEST, "peer": b"short"}, 1.0) == []


def test_session_start_ready_end():
    core = core_with()
    assert core.session_started(A, row(A, 1)) == [Allow(A)]
    assert core.session_started(A, row(A, 1)) == []  # already in the directory
    assert core.session_ready(A, [("192.168.1.5", 1, "local")]) == [DIR_CHANGED]
    assert core.directory.nodes[A].online
    assert core.session_ended(A) == [DIR_CHANGED]
    assert not core.directory.nodes[A].online and A in core.directory.nodes  # offline, still registered
    assert core.session_ended(A) == []


def test_feed_rows_change_only_what_they_name():
    core = core_with(A, B)
    assert core.apply_row(A, row(A, 1, "n"), 100.0) == []  # unchanged: no push to anyone
    assert core.apply_row(A, row(A, 1, "renamed"), 100.0) == [DIR_CHANGED]
    assert core.directory.nodes[A].name == "renamed"
    assert core.apply_row(C, row(C, 3), 100.0) == [Allow(C), DIR_CHANGED]
    assert core.apply_row(B, None, 100.0) == [Drop(B, "removed"), DIR_CHANGED]
    assert core.apply_row(B, None, 100.0) == []  # already gone
    assert core.apply_row(C, row(C, 3, expires=50.0), 100.0) == [Drop(C, "expired"), DIR_CHANGED]
    assert set(core.directory.nodes) == {A}
    assert core.counters["nodes_removed"] == 1 and core.counters["nodes_expired"] == 1


def test_a_key_removed_and_joined_again_between_reads_is_a_new_node():
    core = core_with(A)
    out = core.apply_row(A, row(A, 9, "again"), 100.0)
    assert out == [Drop(A, "removed"), DIR_CHANGED, Allow(A), DIR_CHANGED]
    assert core.directory.nodes[A].node_id == 9 and core.directory.nodes[A].ipv4 == "100.64.0.9"


def test_resync_brings_the_directory_in_line():
    core = core_with(A, B)
    out = core.resync([row(B, 2, "bee"), row(C, 3), row(b"d" * 32, 4, expires=1.0)], 100.0)
    assert Drop(A, "removed") in out and Allow(C) in out and Allow(b"d" * 32) not in out
    assert set(core.directory.nodes) == {B, C} and core.directory.nodes[B].name == "bee"


def test_expiry_by_wall_clock():
    core = core_with()
    core.session_started(A, row(A, 1, expires=100.0))
    core.session_started(B, row(B, 2))
    assert core.expire(99.0) == []
    assert core.expire(100.0) == [Drop(A, "expired"), DIR_CHANGED]
    assert set(core.directory.nodes) == {B}


def test_relay_observations_become_candidates():
    core = core_with(A)
    assert core.observed([(A, ("198.51.100.7", 4000)), (C, ("198.51.100.8", 4000))]) == [DIR_CHANGED]
    assert core.directory.nodes[A].observed == [("198.51.100.7", 4000, "observed")]
    assert core.observed([(A, ("198.51.100.7", 4000))]) == []

"""A node learns its own name and tags live (issue 13 item 1): the control core sends its session T_SELF when
the feed's row changes them, and the client turns the message into a SelfChanged event or drops and counts it."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from meshwg.control.client import ControlConnection
from meshwg.control.entry_check import self_update_untrusted, tags_untrusted
from meshwg.control.events import SelfChanged
from meshwg.signaling import protocol as P
from signal_server.control_core import DIR_CHANGED, ControlCore, Send
from signal_server.directory import Directory
from signal_server.store_api import NodeRow

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def row(key: bytes, node_id: int, name: str = "n", tags=(), expires=None, kind: str = "node", routes=()) -> NodeRow:
    return NodeRow(node_id, key, name, f"100.64.0.{node_id}", f"fd00::{node_id}", 0.0, None, expires, "inv", "",
                   kind=kind, tags=tuple(tags), routes=tuple(routes))


def core_with(*rows, connected=()) -> ControlCore:
    core = ControlCore(Directory(mesh_nets=("100.64.0.0/10", "fd00::/48")), set(connected))
    for r in rows:
        core.session_started(r.key, r)
    return core


def sends(effects) -> list:
    return [e for e in effects if isinstance(e, Send)]


# ---- the control core ---------------------------------------------------------------------------
def test_a_tag_change_is_sent_to_that_node_only():
    core = core_with(row(A, 1, "a", ["ops"]), row(B, 2, "b"), connected={A, B})
    out = core.apply_row(A, row(A, 1, "a", ["ops", "web"]), 100.0)
    assert out == [DIR_CHANGED, Send(A, {"type": "self", "name": "a", "tags": ["ops", "web"]})]
    assert core.counters["self_updates"] == 1
    # untag down to none: an empty list, not an absent field (the node must clear what it shows)
    assert sends(core.apply_row(A, row(A, 1, "a"), 100.0)) == [Send(A, {"type": "self", "name": "a", "tags": []})]


def test_a_rename_is_sent_with_the_new_name():
    core = core_with(row(A, 1, "a", ["ops"]), connected={A})
    assert sends(core.apply_row(A, row(A, 1, "laptop", ["ops"]), 100.0)) == [
        Send(A, {"type": "self", "name": "laptop", "tags": ["ops"]})]


def test_no_send_when_the_node_view_is_unchanged():
    core = core_with(row(A, 1, "a", ["ops"]), row(B, 2, "b"), connected={A, B})
    assert core.apply_row(A, row(A, 1, "a", ["ops"]), 100.0) == []                          # the same row again
    assert core.apply_row(A, row(A, 1, "a", ["ops"], expires=500.0), 100.0) == [DIR_CHANGED]  # not in its view
    assert sends(core.apply_row(A, row(A, 1, "a", ["ops"], routes=["192.168.1.0/24"]), 100.0)) == []
    assert sends(core.apply_row(B, row(B, 2, "b", ["web"]), 100.0)) == [
        Send(B, {"type": "self", "name": "b", "tags": ["web"]})]  # B's own change goes to B, never to A
    assert core.counters["self_updates"] == 1


def test_no_send_to_a_node_without_a_session_nor_to_a_plain_peer():
    core = core_with(row(A, 1, "a"), connected={C})
    assert core.apply_row(A, row(A, 1, "a", ["ops"]), 100.0) == [DIR_CHANGED]   # offline: its next welcome says it
    core.apply_row(C, row(C, 3, "phone", kind="plain"), 100.0)
    assert sends(core.apply_row(C, row(C, 3, "phone", ["family"], kind="plain"), 100.0)) == []


def test_a_row_the_feed_brought_before_the_session_started_is_sent_after_its_welcome():
    """The join read the row (its welcome says no tags), then the feed applied a tag before the session started."""
    core = core_with()
    core.apply_row(A, row(A, 1, "a", ["web"]), 100.0)
    core.connected.add(A)
    assert core.session_started(A, row(A, 1, "a")) == [Send(A, {"type": "self", "name": "a", "tags": ["web"]})]
    assert core.session_started(A, row(A, 1, "a", ["web"])) == []   # the welcome said it already


# ---- the client ---------------------------------------------------------------------------------
def conn() -> ControlConnection:
    c = ControlConnection.__new__(ControlConnection)
    c.drops, c._full = 0, None
    return c


def test_the_client_turns_a_self_message_into_an_event():
    c = conn()
    assert c._apply({"type": P.T_SELF, "name": "laptop", "tags": ["ops", "Bad Tag", 5, "web", "ops"]}) == [
        SelfChanged("laptop", ("ops", "web"))]   # what does not look like a tag is left out, as in the welcome
    assert c._apply({"type": P.T_SELF, "name": "laptop", "tags": []}) == [SelfChanged("laptop", ())]
    # `$` of a regex also matches before a final newline: a tag with one is no tag (it would break status lines)
    assert c._apply({"type": P.T_SELF, "name": "laptop", "tags": ["ops\n", "web"]}) == [SelfChanged("laptop", ("web",))]
    assert tags_untrusted(["ops\n"]) == ()   # the same function reads peers' entries and the welcome
    assert c.drops == 0


@pytest.mark.parametrize("msg", [
    {"name": "laptop"}, {"tags": ["ops"]}, {"name": "laptop", "tags": "ops"}, {"name": "laptop", "tags": None},
    {"name": 5, "tags": []}, {"name": b"laptop", "tags": []}, {"name": "", "tags": []},
    {"name": "\x1b[31mroot", "tags": []}, {"name": "Laptop", "tags": []}, {"name": "a" * 64, "tags": []},
    {"name": "-a", "tags": []}, {"name": "a b", "tags": []}, {"name": "laptop\n", "tags": []},
])
def test_a_malformed_self_message_is_dropped_and_counted(msg):
    c = conn()
    assert c._apply({"type": P.T_SELF, **msg}) == [] and c.drops == 1


ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=70), st.binary(max_size=8),
                st.lists(st.one_of(st.text(max_size=70), st.integers(), st.none()), max_size=20),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@given(st.dictionaries(st.sampled_from(["name", "tags", "other"]), ANY))
def test_any_self_message_gives_an_event_or_a_drop_never_an_exception(fields):
    c = conn()
    out = c._apply({"type": P.T_SELF, **fields})
    assert out == [] and c.drops == 1 or len(out) == 1 and isinstance(out[0], SelfChanged) and c.drops == 0
    if out:
        assert out == [self_update_untrusted(fields)] and len(out[0].tags) <= 16

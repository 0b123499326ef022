"""Plain WireGuard peers in the directory (issue 12): a plain peer's entry (kind "plain", no candidates, never
online) goes to its target nodes only. A node that is not a target never learns its key: not in a snapshot, an
update or a removal (asserted on the pure Directory and on every message a real node's ControlConnection
receives from a running server). A plain key never joins over the control channel."""

from __future__ import annotations

import time

import pytest
import trio
from plain_helpers import recording_node
from sig_helpers import harness, new_key, wait_until  # noqa: F401 (fixture)

from meshwg.control import ControlConnection, JoinRefusedError
from meshwg.signaling import protocol as P
from meshwg.wg.crypto import clamp, dh_pub
from signal_server.control_core import DIR_CHANGED, PLAIN_CHANGED, Allow, ControlCore, Drop
from signal_server.directory import Directory, Node
from signal_server.store_api import NodeRow

A, B, C, PHONE, PHONE2 = (bytes([i]) * 32 for i in (1, 2, 3, 9, 10))


def nodes_and_phone(*subs: bytes) -> Directory:
    d = Directory()
    for i, k in enumerate((A, B, C), start=1):
        d.put(Node(i, k, f"n{i}", f"100.64.0.{i}", f"fd00::{i}"))
    for s in subs:
        d.subscribe(s)
    d.put(Node(9, PHONE, "phone", "100.64.0.9", "fd00::9", kind="plain", targets=frozenset({1, 2})))
    return d


def unpacked(packed: list[bytes]) -> dict[bytes, dict]:
    return {e["key"]: e for e in map(P.unpack_entry_untrusted, packed)}


def test_a_plain_entry_goes_to_its_targets_only():
    d = nodes_and_phone(A, B, C)
    ups_a, _ = d.take_pending(A)
    ups_c, rems_c = d.take_pending(C)
    assert PHONE in unpacked(ups_a) and not ups_c and not rems_c
    assert PHONE in unpacked(d.take_pending(B)[0])
    e = unpacked(ups_a)[PHONE]
    assert (e["kind"], e["cand"], e["online"], e["id"], e["ipv4"]) == ("plain", [], False, 9, "100.64.0.9")
    assert "kind" not in unpacked(d.subscribe(C))[A]  # a node's entry is as it was
    # snapshots: the same rule
    assert PHONE in unpacked(d.subscribe(A)) and PHONE not in unpacked(d.subscribe(C))


def test_changes_and_removal_of_a_plain_entry_reach_its_targets_only():
    d = nodes_and_phone(A, C)
    d.take_pending(A), d.take_pending(C)
    assert d.update(PHONE, name="phone2")
    assert PHONE in unpacked(d.take_pending(A)[0]) and d.take_pending(C) == ([], [])
    d.remove(PHONE)
    assert d.take_pending(A) == ([], [PHONE]) and d.take_pending(C) == ([], [])
    assert not d.has_pending(C)


def test_a_target_that_is_taken_away_hears_a_removal_and_a_new_one_the_entry():
    d = nodes_and_phone(A, B, C)
    for s in (A, B, C):
        d.take_pending(s)
    assert d.update(PHONE, targets=frozenset({2, 3}))
    assert d.take_pending(A) == ([], [PHONE])
    assert PHONE in unpacked(d.take_pending(B)[0])  # still a target: the entry again (harmless)
    assert PHONE in unpacked(d.take_pending(C)[0])
    assert d.plain_targets() == {B, C}


def test_plain_targets_are_the_nodes_some_plain_peer_may_reach():
    d = nodes_and_phone()
    assert d.plain_targets() == {A, B} and set(d.plain) == {PHONE}
    d.put(Node(10, PHONE2, "tablet", "100.64.0.10", "fd00::10", kind="plain", targets=frozenset({3, 99})))
    assert d.plain_targets() == {A, B, C}  # a target id that is no node (removed) is no target
    d.remove(PHONE)
    assert d.plain_targets() == {C} and set(d.plain) == {PHONE2}


def row(node_id, key, kind="node", targets=()):
    return NodeRow(node_id, key, f"x{node_id}", f"100.64.0.{node_id}", f"fd00::{node_id}", 0.0, None, None, None, "",
                   kind=kind, targets=targets)


def test_the_core_never_allows_a_plain_key_a_relay_session_and_says_when_plain_peers_change():
    core = ControlCore(Directory(), connected={})
    assert core.apply_row(A, row(1, A), 0.0) == [Allow(A), DIR_CHANGED]  # no plain peers: nothing more
    effects = core.apply_row(PHONE, row(9, PHONE, "plain", (1,)), 0.0)
    assert effects == [DIR_CHANGED, PLAIN_CHANGED]
    assert core.apply_row(B, row(2, B), 0.0) == [Allow(B), DIR_CHANGED, PLAIN_CHANGED]  # a node while plain peers exist
    assert core.apply_row(PHONE, row(9, PHONE, "plain", (1, 2)), 0.0) == [DIR_CHANGED, PLAIN_CHANGED]
    assert core.directory.plain_targets() == {A, B}
    assert core.apply_row(PHONE, None, 0.0) == [Drop(PHONE, "removed"), DIR_CHANGED, PLAIN_CHANGED]
    assert core.counters["plain_removed"] == 1 and not core.directory.plain


def test_a_punch_toward_a_plain_peer_is_an_unknown_peer():
    core = ControlCore(Directory(), connected={A: object()})
    core.apply_row(A, row(1, A), 0.0)
    core.apply_row(PHONE, row(9, PHONE, "plain", (1,)), 0.0)
    core.directory.update(PHONE, online=True)  # even if it looked online
    [fail] = core.on_message(A, {"type": P.T_PUNCH_REQUEST, "peer": PHONE}, 0.0)
    assert fail.msg["reason"] == "unknown_peer"


# --- end to end: a running server, real control connections, the admin's changes through the store


async def test_only_target_nodes_ever_hear_of_a_plain_peer(harness, nursery):
    inv = harness.invite(reusable=True)
    home = await recording_node(nursery, inv, "home")
    office = await recording_node(nursery, inv, "office")
    other = await recording_node(nursery, inv, "other")
    await wait_until(lambda: len(other.entries) == 2 and len(home.entries) == 2)
    st = harness.admin
    ids = {r.name: r.node_id for r in st.list_nodes()}
    pk = dh_pub(clamp(new_key()))
    p4, p6 = st.prefixes(lambda n: b"\0" * n)
    t0 = time.monotonic()
    phone = st.add_plain("phone", pk, None, [ids["home"], ids["office"]], None, time.time(), p4, p6)
    await wait_until(lambda: pk in home.entries and pk in office.entries, timeout=1.0)
    assert time.monotonic() - t0 < 1.0
    e = home.entries[pk]
    assert (e["kind"], e["ipv4"], e["ipv6"], e["cand"], e["online"]) == ("plain", phone.ipv4, phone.ipv6, [], False)

    async def changed_for_everyone(tag: str, *watchers):
        """A change every node sees: once a watcher has it, it had every earlier one too (one ordered stream)."""
        st.rename(ids["office"], tag)
        await wait_until(lambda: all(w.entries[office.key]["name"] == tag for w in watchers))

    await changed_for_everyone("office-1", home, other)
    assert not other.ever_heard_of(pk)

    # a new session of a target gets it in its snapshot; one of the other node does not
    home2 = await recording_node(nursery, inv, "home", sk=home.conn.private_key)
    other2 = await recording_node(nursery, inv, "other", sk=other.conn.private_key)
    assert pk in home2.entries and pk not in other2.entries

    # rotation: the targets lose the old key and get the new one; removal: the targets lose it
    pk2 = dh_pub(clamp(new_key()))
    st.set_plain_key(phone.node_id, pk2, None)
    await wait_until(lambda: pk2 in home2.entries and pk not in home2.entries and pk2 in office.entries, timeout=1.0)
    st.remove(phone.node_id, time.time())
    await wait_until(lambda: pk2 not in home2.entries and pk2 not in office.entries, timeout=1.0)
    await changed_for_everyone("office-2", home2, other2)
    assert not other2.ever_heard_of(pk) and not other2.ever_heard_of(pk2)


async def test_a_plain_key_joining_over_control_is_refused(harness):
    inv = harness.invite(reusable=True)
    home = await ControlConnection.open(inv, new_key(), name="home")
    sk = clamp(new_key())
    st = harness.admin
    p4, p6 = st.prefixes(lambda n: b"\0" * n)
    st.add_plain("phone", dh_pub(sk), sk, [home.welcome.node_id], None, time.time(), p4, p6)
    with pytest.raises(JoinRefusedError) as info:
        await ControlConnection.open(inv, sk)
    assert info.value.code == "plain_peer" and "plain WireGuard peer" in str(info.value)
    assert dh_pub(sk) not in harness.server.sessions and dh_pub(sk) not in harness.server.relay.allowed
    assert harness.server.counters["join_refused_plain_peer"] == 1
    await home.aclose()

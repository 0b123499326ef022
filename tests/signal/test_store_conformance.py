"""Every Store backend behaves alike (store_api.Store): identity, invites, joins, admin changes and the
change feed. A backend joins by adding a Backend class and its name to BACKENDS (a PostgreSQL one starts
its throwaway cluster in its fixture); every test here then runs against it too."""

from __future__ import annotations

import ipaddress
import os

import pytest

from signal_server import store_api as api
from signal_server.invites import JoinRefused

from pg_cluster import pg_cluster, pg_url  # noqa: F401 (fixtures)

SECRET = b"s" * 32
P4 = ipaddress.ip_network("100.64.0.0/10")
P6 = ipaddress.ip_network("fd00:1::/48")


class SqliteBackend:
    def __init__(self, tmp_path, request) -> None:
        self.path = str(tmp_path / "signal.db")

    def open(self, init: bool = False, **kw) -> api.Store:
        from signal_server.store import SqliteStore

        return SqliteStore(self.path, init=init, **kw)

    def close(self) -> None:
        pass


class PostgresBackend:
    """A fresh database on the session's throwaway cluster (tests/signal/pg_cluster.py)."""

    def __init__(self, tmp_path, request) -> None:
        self.url = request.getfixturevalue("pg_url")

    def open(self, init: bool = False, **kw) -> api.Store:
        from signal_server.store_pg import PgStore

        return PgStore(self.url, init=init, **kw)

    def close(self) -> None:
        pass


BACKENDS = {"sqlite": SqliteBackend, "postgresql": PostgresBackend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    b = BACKENDS[request.param](tmp_path, request)
    yield b
    b.close()


@pytest.fixture
def store(backend):
    st = backend.open(init=True)
    yield st
    st.close()


def key() -> bytes:
    return os.urandom(32)


def join(st, k, name=None, wall=1000.0, invite="inv"):
    return st.join(k, invite, SECRET, name, wall, P4, P6)


def kinds(changes) -> list[tuple]:
    return [(c.kind, c.key, c.node_id) for c in changes]


@pytest.fixture
def invited(store):
    store.create_invite("inv", SECRET, True, None, "", 500.0)
    return store


def test_is_a_store(store, backend):
    assert isinstance(store, api.Store)
    # PostgreSQL's 6th step adds the tables several servers share (issue 14); SQLite has one server.
    assert store.schema_version() == (6 if isinstance(backend, PostgresBackend) else 5)


def test_identity_is_created_once_and_kept(backend):
    st = backend.open(init=True)
    sk, created = st.server_private_key(), st.created_identity
    st.meta_set("x", "1")
    st.close()
    again = backend.open()
    assert created and not again.created_identity
    assert again.server_private_key() == sk and again.meta_get("x") == "1"
    assert again.meta_get_or_create("y", lambda: "made") == "made" and again.meta_get_or_create("y", lambda: "no") == "made"
    again.close()


def test_a_database_from_a_newer_meshwg_signal_is_refused_in_one_line(backend):
    st = backend.open(init=True)
    st.meta_set("schema_version", "99")
    st.close()
    with pytest.raises(api.StoreError, match=r"schema 99 is newer than this meshwg-signal \([56]\); upgrade") as err:
        backend.open()
    assert "\n" not in str(err.value)


def test_prefixes_are_chosen_once(store):
    p4, p6 = store.prefixes(os.urandom)
    assert str(p4) == "100.64.0.0/10" and p6.prefixlen == 48
    assert store.prefixes(os.urandom) == (p4, p6)
    assert store.prefixes(os.urandom, "10.10.0.0/16")[0] == ipaddress.ip_network("10.10.0.0/16")


def test_invites(store):
    store.create_invite("a", SECRET, False, 2000.0, "home", 1000.0)
    [inv] = store.list_invites()
    assert (inv.invite_id, inv.reusable, inv.expires, inv.tag, inv.revoked, inv.uses) == ("a", False, 2000.0, "home", False, 0)
    assert store.revoke_invite("a") and not store.revoke_invite("nope")
    assert store.list_invites()[0].revoked


def test_join_lifecycle(invited):
    st = invited
    k = key()
    row, created = join(st, k, name="alpha")
    assert created and row.name == "alpha" and row.key == k and ipaddress.ip_address(row.ipv4) in P4
    assert join(st, k) == (row, False)  # reconnect
    assert st.get_node(k) == row and st.list_nodes() == [row]
    assert st.find_node("alpha") == row and st.find_node(str(row.node_id)) == row
    assert st.rename(row.node_id, "beta") == "beta" and st.get_node(k).name == "beta"
    st.touch(k, 1500.0)
    assert st.get_node(k).last_seen == 1500.0
    st.expire(row.node_id, 1600.0)
    assert not st.get_node(k).live(1700.0)
    again, created = join(st, k, wall=1700.0)  # an expired node comes back with its id and addresses
    assert not created and (again.node_id, again.ipv4) == (row.node_id, row.ipv4) and again.live(1700.0)
    assert st.remove(row.node_id, 1800.0) and st.get_node(k) is None and not st.remove(row.node_id, 1800.0)
    with pytest.raises(JoinRefused) as info:
        join(st, k, wall=1900.0)  # the reusable invite is older than the removal
    assert info.value.code == "key_removed"


def test_every_mutation_is_in_the_feed(invited):
    st = invited
    start = st.change_head()
    k = key()
    row, _ = join(st, k, name="alpha")
    join(st, k)  # a reconnect changes nothing
    st.rename(row.node_id, "beta")
    st.touch(k, 1500.0)
    st.expire(row.node_id, 1600.0)
    join(st, k, wall=1700.0)
    st.remove(row.node_id, 1800.0)
    st.create_invite("b", SECRET, False, None, "", 1900.0)
    st.revoke_invite("b")
    st.meta_set("m", "v")
    changes, seq = st.changes_since(start)
    i = row.node_id
    assert kinds(changes) == [
        ("join", k, i), ("rename", k, i), ("touch", k, None), ("expire", k, i), ("readmit", k, i),
        ("remove", k, i), ("invite", None, None), ("invite", None, None), ("meta", None, None)]
    assert seq == changes[-1].seq == st.change_head()
    assert [c.seq for c in changes] == sorted({c.seq for c in changes})
    assert st.changes_since(seq) == ([], seq)
    assert kinds(st.changes_since(changes[-3].seq)[0]) == kinds(changes[-2:])


def test_a_refused_mutation_leaves_no_change(invited):
    """The change is written in the mutation's transaction: a mutation that fails leaves none."""
    st = invited
    a, _ = join(st, key(), name="alpha")
    b, _ = join(st, key(), name="bravo")
    head = st.change_head()
    with pytest.raises(ValueError):
        st.rename(b.node_id, "alpha")
    with pytest.raises(JoinRefused):
        st.join(key(), "inv", b"x" * 32, None, 1000.0, P4, P6)
    st.expire(999, 1.0)  # no such node
    st.touch(key(), 1.0)
    assert not st.remove(999, 1.0)
    assert st.changes_since(head) == ([], head)


def test_other_connections_changes_are_noticed(backend, invited):
    st = invited
    st.may_have_changes()
    assert not st.may_have_changes()
    join(st, key())  # our own write: we applied it already
    assert not st.may_have_changes()
    other = backend.open()
    head = st.change_head()
    row, _ = join(other, key(), name="elsewhere")
    assert st.may_have_changes()
    assert kinds(st.changes_since(head)[0]) == [("join", row.key, row.node_id)]
    other.close()


def test_the_feed_is_bounded_and_a_lagging_reader_resyncs_once(backend):
    st = backend.open(init=True, changes_keep=8)
    st.create_invite("inv", SECRET, True, None, "", 500.0)
    lagging = keeping_up = st.change_head()
    for _ in range(40):
        row, _ = join(st, key())
        changes, keeping_up = st.changes_since(keeping_up)  # a reader that keeps up never resyncs
        assert kinds(changes) == [("join", row.key, row.node_id)]
    changes, seq = st.changes_since(lagging)
    assert [c.kind for c in changes] == ["resync"] and seq == st.change_head()
    # After its one full read, the lagging reader follows the feed again from where the resync put it.
    last, _ = join(st, key(), name="late")
    assert kinds(st.changes_since(seq)[0]) == [("join", last.key, last.node_id)]
    # Bounded: the last 8 changes are kept, but not many more (8 plus one pruning interval of 2).
    head = st.change_head()
    assert len(st.changes_since(head - 8)[0]) == 8
    assert [c.kind for c in st.changes_since(head - 11)[0]] == ["resync"]
    st.close()


def test_backup_and_integrity(store, tmp_path):
    assert store.integrity_ok()
    dest = str(tmp_path / "copy.db")
    store.backup_to(dest)
    assert os.path.getsize(dest) > 0


# --- plain WireGuard peers (issue 12): rows of kind "plain"


def test_plain_peer_lifecycle(invited):
    st = invited
    home, _ = join(st, key(), name="home")
    office, _ = join(st, key(), name="office")
    pk, sk = key(), key()
    head = st.change_head()
    phone = st.add_plain("Phone", pk, sk, [home.node_id, office.node_id, home.node_id], office.node_id, 1100.0, P4, P6)
    assert (phone.kind, phone.name, phone.key, phone.private_key) == ("plain", "phone", pk, sk)
    assert phone.targets == (home.node_id, office.node_id) and phone.exit_node == office.node_id
    assert ipaddress.ip_address(phone.ipv4) in P4 and ipaddress.ip_address(phone.ipv6) in P6
    assert phone.ipv4 not in (home.ipv4, office.ipv4) and phone.ipv6 not in (home.ipv6, office.ipv6)
    assert (home.kind, home.private_key, home.targets, home.exit_node) == ("node", None, (), None)
    assert st.list_plain() == [phone] and st.get_node(pk) == phone and phone in st.list_nodes()
    own = st.add_plain("tablet", key(), None, [home.node_id], None, 1200.0, P4, P6)
    assert own.private_key is None and own.exit_node is None and st.list_plain() == [phone, own]
    # rotate: same id and addresses, a new key; the feed says the old key left and the new one came
    pk2, sk2 = key(), key()
    rotated = st.set_plain_key(phone.node_id, pk2, sk2)
    assert (rotated.node_id, rotated.ipv4, rotated.ipv6, rotated.key, rotated.private_key) == (
        phone.node_id, phone.ipv4, phone.ipv6, pk2, sk2)
    assert st.get_node(pk) is None and st.get_node(pk2) == rotated
    assert st.remove(own.node_id, 1300.0) and st.list_plain() == [rotated]
    changes, _ = st.changes_since(head)
    assert kinds(changes) == [("join", pk, phone.node_id), ("join", own.key, own.node_id),
                              ("remove", pk, phone.node_id), ("join", pk2, phone.node_id),
                              ("remove", own.key, own.node_id)]


def test_a_plain_key_never_joins(invited):
    st = invited
    home, _ = join(st, key(), name="home")
    pk = key()
    st.add_plain("phone", pk, None, [home.node_id], None, 1100.0, P4, P6)
    head = st.change_head()
    for invite in ("inv", None):
        with pytest.raises(JoinRefused) as info:
            st.join(pk, invite, SECRET if invite else None, None, 1200.0, P4, P6)
        assert info.value.code == "plain_peer"
    assert st.changes_since(head) == ([], head) and st.get_node(pk).kind == "plain"


@pytest.mark.parametrize("case", ["bad_name", "taken_name", "node_key", "plain_key", "no_target", "plain_target",
                                  "unknown_exit", "no_prefix"])
def test_add_plain_refusals_name_the_value_and_change_nothing(invited, case):
    st = invited
    home, _ = join(st, key(), name="home")
    other = st.add_plain("other", key(), None, [home.node_id], None, 1100.0, P4, P6)
    head, before = st.change_head(), st.list_nodes()
    name, k, targets, exit_node, prefixes = "phone", key(), [home.node_id], None, (P4, P6)
    if case == "bad_name":
        name = "!!!"
    elif case == "taken_name":
        name = "HOME"
    elif case == "node_key":
        k = home.key
    elif case == "plain_key":
        k = other.key
    elif case == "no_target":
        targets = []
    elif case == "plain_target":
        targets = [other.node_id]
    elif case == "unknown_exit":
        exit_node = 999
    elif case == "no_prefix":
        prefixes = (None, None)  # read from the database, where the server keeps them; none there yet
    if case == "no_prefix" and st.meta_get("prefix4") is not None:
        pytest.skip("prefixes already chosen")
    with pytest.raises(ValueError) as info:
        st.add_plain(name, k, None, targets, exit_node, 1200.0, *prefixes)
    msg = str(info.value)
    assert "\n" not in msg
    expected = {"bad_name": "'!!!'", "taken_name": "'home'", "node_key": "already in the mesh",
                "plain_key": "already in the mesh", "no_target": "at least one node", "plain_target": str(other.node_id),
                "unknown_exit": "999", "no_prefix": "has not run"}[case]
    assert expected in msg
    assert st.changes_since(head) == ([], head) and st.list_nodes() == before


def test_rotating_to_a_taken_key_or_a_node_is_refused(invited):
    st = invited
    home, _ = join(st, key(), name="home")
    phone = st.add_plain("phone", key(), None, [home.node_id], None, 1100.0, P4, P6)
    head = st.change_head()
    with pytest.raises(ValueError, match="already in the mesh"):
        st.set_plain_key(phone.node_id, home.key, None)
    with pytest.raises(ValueError, match=f"no plain peer {home.node_id}"):
        st.set_plain_key(home.node_id, key(), None)
    assert st.changes_since(head) == ([], head)


# --- subnet routes and exit nodes (issue 12): the routes table, invites' auto-approval, ROUTES changes

def allow_all(prefix):
    return None


def routes_of(st, node_id) -> dict:
    return {r.prefix: (r.advertised, r.decision) for r in st.list_routes() if r.node_id == node_id}


def test_routes_lifecycle_and_feed(invited):
    st = invited
    home, _ = join(st, key(), name="home")
    head = st.change_head()
    row, plan = st.advertise_routes(home.key, ("192.168.1.0/24", "fd12::/64"), True, allow_all)
    assert plan.pending == ("192.168.1.0/24", "fd12::/64", "exit")
    assert (row.routes, row.is_exit) == ((), False)  # pending: peers see nothing yet
    assert routes_of(st, home.node_id) == {"192.168.1.0/24": (True, None), "fd12::/64": (True, None),
                                           "exit": (True, None)}
    assert st.advertise_routes(home.key, ("192.168.1.0/24", "fd12::/64"), True, allow_all)[1].rows  # the same again
    st.approve_route(home.node_id, "192.168.1.0/24")
    st.approve_route(home.node_id, "exit")
    st.approve_route(home.node_id, "exit")  # approved already: no change recorded
    got = st.get_node(home.key)
    assert (got.routes, got.is_exit) == (("192.168.1.0/24",), True)
    assert [n for n in st.list_nodes() if n.node_id == home.node_id] == [got]
    # the node stops advertising: peers lose the routes, the approvals wait for them, pending ones go
    row, _ = st.advertise_routes(home.key, (), False, allow_all)
    assert (row.routes, row.is_exit) == ((), False)
    assert routes_of(st, home.node_id) == {"192.168.1.0/24": (False, True), "exit": (False, True)}
    row, _ = st.advertise_routes(home.key, ("192.168.1.0/24",), True, allow_all)
    assert (row.routes, row.is_exit) == (("192.168.1.0/24",), True)
    st.reject_route(home.node_id, "exit")
    assert st.get_node(home.key).is_exit is False and routes_of(st, home.node_id)["exit"] == (True, False)
    changes, _ = st.changes_since(head)
    k, i = home.key, home.node_id
    assert kinds(changes) == [("routes", k, i)] * 6  # advertise, approve x2, withdraw, re-advertise, reject
    assert all(c.kind in api.NODE_KINDS for c in changes)  # followers re-read the node's row


def test_approval_refuses_overlap_with_another_nodes_approved_route(invited):
    st = invited
    home, _ = join(st, key(), name="home")
    office, _ = join(st, key(), name="office")
    st.advertise_routes(home.key, ("192.168.0.0/16",), False, allow_all)
    st.approve_route(home.node_id, "192.168.0.0/16")
    st.advertise_routes(office.key, ("192.168.1.0/24", "10.0.0.0/8"), True, allow_all)
    head = st.change_head()
    with pytest.raises(ValueError) as info:
        st.approve_route(office.node_id, "192.168.1.0/24")
    assert str(info.value) == "192.168.1.0/24 overlaps home's approved route 192.168.0.0/16"
    st.advertise_routes(home.key, (), False, allow_all)  # withdrawn, but still approved: still in the way
    head = st.change_head()
    with pytest.raises(ValueError, match="home's approved route"):
        st.approve_route(office.node_id, "192.168.1.0/24")
    assert st.changes_since(head) == ([], head)
    st.approve_route(office.node_id, "exit")  # exit nodes never overlap
    st.approve_route(home.node_id, "exit")
    st.reject_route(home.node_id, "192.168.0.0/16")
    st.approve_route(office.node_id, "192.168.1.0/24")
    assert st.get_node(office.key).routes == ("192.168.1.0/24",)


def test_route_decisions_refused_for_unknown_nodes_and_routes(invited):
    st = invited
    home, _ = join(st, key(), name="home")
    phone = st.add_plain("phone", key(), None, [home.node_id], None, 1100.0, P4, P6)
    head = st.change_head()
    for node_id in (999, phone.node_id):
        with pytest.raises(ValueError, match=f"no node {node_id}"):
            st.approve_route(node_id, "10.0.0.0/8")
    with pytest.raises(ValueError, match="has no route 10.0.0.0/8"):
        st.reject_route(home.node_id, "10.0.0.0/8")
    assert st.advertise_routes(phone.key, ("10.0.0.0/8",), False, allow_all) == (None, None)
    assert st.advertise_routes(key(), ("10.0.0.0/8",), False, allow_all) == (None, None)
    assert st.changes_since(head) == ([], head) and st.list_routes() == []


def test_an_invites_auto_approve_routes(invited):
    st = invited
    st.create_invite("auto", SECRET, True, None, "", 600.0, ("192.168.0.0/16", "exit"))
    assert [i.auto_routes for i in st.list_invites()] == [(), ("192.168.0.0/16", "exit")]
    auto, _ = st.join(key(), "auto", SECRET, "auto", 1000.0, P4, P6)
    plain, _ = join(st, key(), name="plain")
    forbid = lambda p: "no" if p == "192.168.9.0/24" else None  # noqa: E731
    row, plan = st.advertise_routes(auto.key, ("192.168.1.0/24", "192.168.9.0/24", "10.0.0.0/8"), True, forbid)
    assert (row.routes, row.is_exit) == (("192.168.1.0/24",), True)
    assert plan.auto_approved == ("192.168.1.0/24", "exit") and plan.refused == (("192.168.9.0/24", "no"),)
    assert plan.pending == ("10.0.0.0/8",)
    row, _ = st.advertise_routes(plain.key, ("172.16.0.0/12",), True, allow_all)
    assert (row.routes, row.is_exit) == ((), False)  # the other invite approves nothing
    # a rejection stands against the invite; a revoked invite approves nothing more
    st.reject_route(auto.node_id, "exit")
    assert st.advertise_routes(auto.key, ("192.168.1.0/24",), True, allow_all)[0].is_exit is False
    st.revoke_invite("auto")
    row, plan = st.advertise_routes(auto.key, ("192.168.1.0/24", "192.168.2.0/24"), True, allow_all)
    assert row.routes == ("192.168.1.0/24",) and plan.pending == ("192.168.2.0/24",)


def test_removing_a_node_removes_its_routes(invited):
    st = invited
    home, _ = join(st, key(), name="home")
    office, _ = join(st, key(), name="office")
    st.advertise_routes(home.key, ("192.168.1.0/24",), False, allow_all)
    st.approve_route(home.node_id, "192.168.1.0/24")
    st.remove(home.node_id, 1100.0)
    assert st.list_routes() == []
    st.approve_route(office.node_id, "192.168.1.0/24")  # no longer in the way


def test_a_name_the_policy_uses_is_not_given_to_a_new_node_that_asks_for_it(invited):
    # Review finding: rules name nodes; a node removed while the policy names it must not hand its rights to
    # whoever joins next asking for its name (only an administrator's rename gives the name).
    row, _ = invited.join(key(), "inv", SECRET, "nas", 1000.0, P4, P6, reserved=frozenset({"nas"}))
    assert row.name == "nas-2"
    again, _ = invited.join(key(), "inv", SECRET, "laptop", 1000.0, P4, P6, reserved=frozenset({"nas"}))
    assert again.name == "laptop"
    assert invited.rename(again.node_id, "nas") == "nas"   # the administrator's choice stands

"""A pending directory update taken in bounded pieces, peer classes as shared runs (take_pending_packed, issue 13:
a policy change reaches 1,000 nodes within 1 s). What each recipient gets must be exactly what the entry-wise path
(take_pending, the reference) gives it: the same entry bytes, the same removals, nothing more; a recipient of
another class (or with an accept field of another length) never gets a run built for someone else."""

from __future__ import annotations

import msgpack

from meshwg.signaling import protocol as W
from signal_server import policy as P
from signal_server.directory import PLAIN, Directory, Node

TEAMS = 4


def key(i: int) -> bytes:
    return i.to_bytes(2, "big") * 16


def tags(i: int) -> tuple:
    return ("ops" if i % 25 == 0 else "web" if i % 2 else "db", f"t{i % TEAMS}")


def build(n: int = 120, text: str | None = None) -> Directory:
    """n nodes of a few classes (addresses of several text lengths: accept fields of several lengths), one plain
    peer whose targets are some of them; every node subscribed."""
    d = Directory()
    if text is not None:
        d.set_policy(P.parse(text, "p.toml"))
    for i in range(1, n + 1):
        d.put(Node(i, key(i), f"n{i}", f"100.64.{i // 7}.{i}", f"fd00::{i:x}", tags=tags(i),
                   candidates=[(f"198.51.100.{i % 250 + 1}", 40000 + i, "stun")], online=True))
    d.put(Node(n + 1, key(n + 1), "phone", "100.64.200.1", "fd00::ffff", kind=PLAIN, targets=frozenset({1, 2, 3})))
    for i in range(1, n + 1):
        d.subscribe(key(i))
    return d


ALLOW_ALL = "[[rule]]\nfrom = ['*']\nto = ['*']\nports = ['icmp']\n"


def rules(allow_all: bool = True) -> str:
    out = [ALLOW_ALL] if allow_all else []
    out.append("[[rule]]\nfrom = ['tag:ops']\nto = ['*']\nports = ['tcp:22']\n")
    out.append("[[rule]]\nfrom = ['tag:web']\nto = ['tag:db']\nports = ['tcp:5432']\n")
    out += [f"[[rule]]\nfrom = ['tag:t{k}']\nto = ['tag:t{k}']\nports = ['tcp:8000-8100']\n" for k in range(TEAMS)]
    out.append("[[rule]]\nfrom = ['tag:t2']\nto = ['tag:web']\nports = ['tcp:443', 'udp:443']\n")
    out.append("[[rule]]\nfrom = ['phone']\nto = ['n1', 'n2']\nports = ['tcp:22']\n")
    return "\n".join(out)


def drain(d: Directory, sub: bytes, limit: int) -> tuple[list[bytes], list[bytes], list[int]]:
    """Everything pending for `sub` through take_pending_packed: (entries, removals, keys per message); each
    message is decoded as a node would."""
    ups, rems, sizes = [], [], []
    while (got := d.take_pending_packed(sub, limit)) is not None:
        assert len(sizes) < 1000, "the pending set does not shrink"
        m = W.unpack_untrusted(W.dir_update_body(*got), 1 << 24)
        assert m["type"] == W.T_DIR_UPDATE and len(m["upsert"]) == got[1]
        ups += m["upsert"]
        rems += m["remove"]
        sizes.append(len(m["upsert"]) + len(m["remove"]))
    return ups, rems, sizes


def assert_same_as_reference(text_before, text_after, limit: int, n: int = 120) -> Directory:
    ref, d = build(n, text_before), build(n, text_before)
    for x in (ref, d):
        for i in range(1, n + 1):
            x.take_pending(key(i))
        x.set_policy(P.parse(text_after, "p.toml") if text_after else None)
    for i in range(1, n + 1):
        want_ups, want_rems = ref.take_pending(key(i))
        ups, rems, sizes = drain(d, key(i), limit)
        assert sorted(ups) == sorted(want_ups), f"n{i}: entries differ from the entry-wise path"
        assert len(ups) == len(set(ups)) and sorted(rems) == sorted(want_rems), f"n{i}"
        assert max(sizes, default=0) <= limit
        assert not d.has_pending(key(i))
    return d


def test_a_full_rewrite_in_runs_is_byte_identical_to_the_entry_wise_path():
    d = assert_same_as_reference(ALLOW_ALL, rules(), limit=256)
    assert d._runs, "the shared runs were not used: the test would not see them go wrong"
    assert len({k[0] for k in d._runs}) >= 3 and len({k[2] for k in d._runs}) >= 2  # classes, accept lengths


def test_small_pieces_split_runs_and_their_tails_are_still_exact():
    assert_same_as_reference(ALLOW_ALL, rules(), limit=7)
    assert_same_as_reference(rules(), rules(False), limit=5)  # most peers hidden: removals in runs


def test_reveal_and_no_policy_again():
    assert_same_as_reference(rules(False), rules(), limit=256)
    assert_same_as_reference(rules(), None, limit=64)


def test_recipients_of_other_classes_get_other_bytes_for_the_same_peer():
    """Two recipients of different classes whose accept fields from a peer are alike but for their own addresses
    (of the same length): each gets the peer's entry with its own offers (what it may send the peer), never a run
    built for the other."""
    d = build(120, ALLOW_ALL)
    for i in range(1, 121):
        d.take_pending(key(i))
    d.set_policy(P.parse(rules(), "p.toml"))
    a, b, peer = key(12), key(14), key(23)  # db/t0 and db/t2; the peer web/t3 (t2 may reach web on 443)
    assert len(d.nodes[a].ipv4) == len(d.nodes[b].ipv4) and d._cls(d.nodes[a]) != d._cls(d.nodes[b])
    got = {}
    for sub in (a, b):
        ups, _, _ = drain(d, sub, 256)
        got[sub] = {msgpack.unpackb(u, raw=False)["key"]: msgpack.unpackb(u, raw=False) for u in ups}
    ea, eb = got[a][peer], got[b][peer]
    assert [r[:3] for r in ea["accept"]] == [r[:3] for r in eb["accept"]]  # the same template: same length
    assert {r[3] for r in ea["accept"]} == {"100.64.1.12/32", "fd00::c/128"}
    assert {r[3] for r in eb["accept"]} == {"100.64.2.14/32", "fd00::e/128"}
    assert [6, 443, 443, "100.64.3.23/32"] in eb["offers"] and [6, 443, 443, "100.64.3.23/32"] not in ea["offers"]


def test_a_change_between_pieces_is_sent_as_it_is_then():
    """Keys taken leave the pending set; one changed after its piece went out is pending again and goes out with
    its new state; one removed goes out as a removal; a non-tail pending pattern takes the entry-wise path."""
    n = 120
    d = build(n, ALLOW_ALL)
    for i in range(1, n + 1):
        d.take_pending(key(i))
    d.set_policy(P.parse(rules(), "p.toml"))
    sub = key(2)
    first = d.take_pending_packed(sub, 40)
    sent = {msgpack.unpackb(u, raw=False)["key"] for u in W.unpack_untrusted(W.dir_update_body(*first), 1 << 24)["upsert"]}
    moved, gone = sorted(sent)[0], sorted(k for k in d._dirty[sub] if k != key(121))[0]
    d.update(moved, candidates=[("203.0.113.9", 9, "stun")])
    d.remove(gone)
    ups, rems, _ = drain(d, sub, 40)
    entries = {msgpack.unpackb(u, raw=False)["key"]: msgpack.unpackb(u, raw=False) for u in ups}
    assert entries[moved]["cand"][-1] == ["203.0.113.9", 9, "stun"] and gone in rems and gone not in entries
    # what went out is what was pending (and the moved one again); the later pieces are the entries as they are now
    ref = build(n, ALLOW_ALL)
    for i in range(1, n + 1):
        ref.take_pending(key(i))
    ref.set_policy(P.parse(rules(), "p.toml"))
    ref_ups, ref_rems = ref.take_pending(sub)
    pending = {msgpack.unpackb(u, raw=False)["key"] for u in ref_ups} | set(ref_rems)
    assert sent | set(entries) | set(rems) == pending | {moved}
    ref.update(moved, candidates=[("203.0.113.9", 9, "stun")])
    ref.remove(gone)
    fresh = {msgpack.unpackb(u, raw=False)["key"]: u for u in ref.subscribe(sub)}
    assert all(u == fresh[msgpack.unpackb(u, raw=False)["key"]] for u in ups)


def test_only_some_members_pending_sends_no_one_else():
    """Pending keys that are not a run's tail (some in the middle changed, not the rest): exactly those go out."""
    n = 200
    d = build(n, rules())
    for i in range(1, n + 1):
        d.take_pending(key(i))
    # More than BULK: class web/t3 whole; in class web/t1 every other member and the last (a pattern that is
    # not a tail of its run, whose last key is pending all the same)
    changed = [key(i) for i in range(1, n + 1) if i % 4 == 3 or i % 8 == 1 or i == 197]
    for k in changed:
        d.update(k, candidates=[("203.0.113.7", 7, "stun")])
    sub = key(4)
    ups, rems, _ = drain(d, sub, 256)
    got = {msgpack.unpackb(u, raw=False)["key"] for u in ups} | set(rems)
    assert got == {k for k in changed if d.visible(sub, d.nodes[k])}


def test_the_packed_body_is_what_pack_writes():
    for n in (0, 1, 15, 16, 255, 256, 70000):
        ups = [bytes([i % 251]) * (i % 300) for i in range(n)]
        rems = [key(i) for i in range(n % 20)]
        items = [W.bin_header(len(e)) + e for e in ups]
        msg = {"type": W.T_DIR_UPDATE, "upsert": ups, "remove": rems}
        assert W.dir_update_body(items, n, rems) == W.pack(msg) == W.pack(W.Packed(W.pack(msg)))

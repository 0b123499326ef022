"""A reusable invite expires too (issue 18): `invite create --reusable --expires 24h` admits nodes for 24 h,
then none, however many it admitted before; nodes it admitted keep rejoining on their keys."""

from __future__ import annotations

import ipaddress
import os

import pytest

from signal_server.invites import InviteRow, JoinRefused, check_invite, hash_secret
from signal_server.store import Store

SECRET = b"s" * 16
P4, P6 = ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd00:6d77::/48")


def _refused(fn) -> str:
    with pytest.raises(JoinRefused) as info:
        fn()
    return info.value.code


@pytest.mark.parametrize("uses", [0, 1, 50])
def test_check_invite_refuses_an_expired_reusable_invite(uses):
    row = InviteRow("id", hash_secret(SECRET), True, 1000.0, "", 0.0, False, uses)
    check_invite(row, SECRET, 999.9)
    assert _refused(lambda: check_invite(row, SECRET, 1000.0)) == "invite_expired"
    assert _refused(lambda: check_invite(row, SECRET, 10_000_000.0)) == "invite_expired"


def test_an_expired_reusable_invite_admits_no_new_node(tmp_path):
    store = Store(str(tmp_path / "signal.db"), init=True)
    try:
        t0 = 1_700_000_000.0
        store.create_invite("reuse1", SECRET, True, t0 + 24 * 3600, "home", t0)
        admitted = [os.urandom(32) for _ in range(3)]
        for i, key in enumerate(admitted):
            node, created = store.join(key, "reuse1", SECRET, f"n{i}", t0 + 3600 * (i + 1), P4, P6)
            assert created and node.tag == "home"
        late = os.urandom(32)
        for wall in (t0 + 24 * 3600, t0 + 24 * 3600 + 1, t0 + 30 * 86400):
            code = _refused(lambda: store.join(late, "reuse1", SECRET, "late", wall, P4, P6))
            assert code == "invite_expired"
        assert store.get_node(late) is None and len(store.list_nodes()) == 3
        # the nodes it admitted are registered: they come back on their keys alone
        for key in admitted:
            node, created = store.join(key, None, None, None, t0 + 25 * 3600, P4, P6)
            assert not created and node.key == key
    finally:
        store.close()

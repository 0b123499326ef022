"""The join rules (signal_server/registry.py) on literal rows, with no database: every refusal code and every
admit path, then the address and name rules the store calls inside its transaction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from signal_server.invites import InviteRow, hash_secret
from signal_server.registry import (Admit, Readmit, Reconnect, Refuse, addresses, decide_join, default_name,
                                    first_name, free_name)

SECRET = b"s" * 16
WALL = 1_700_000_000.0
KEY = bytes(range(32))


@dataclass
class Node:
    node_id: int
    expires: float | None
    kind: str = "node"


def invite(*, reusable=False, expires=None, created=WALL - 100.0, revoked=False, uses=0, tag="home") -> InviteRow:
    return InviteRow("inv1", hash_secret(SECRET), reusable, expires, tag, created, revoked, uses)


def code(d) -> str:
    assert isinstance(d, Refuse), d
    return d.code


# --- a plain WireGuard peer's key never joins, with or without an invite (issue 12)


@pytest.mark.parametrize("with_invite", [False, True])
def test_a_plain_peers_key_is_refused(with_invite):
    args = ("inv1", SECRET, invite()) if with_invite else (None, None, None)
    d = decide_join(Node(7, None, "plain"), None, *args, WALL)
    assert code(d) == "plain_peer" and "plain WireGuard peer" in d.message and "\n" not in d.message


# --- a node that is registered and live reconnects on its key, whatever else it presents


@pytest.mark.parametrize("expires", [None, WALL + 0.001])
def test_live_node_reconnects_without_invite(expires):
    assert decide_join(Node(7, expires), None, None, None, None, WALL) == Reconnect()


def test_live_node_reconnects_even_with_a_bad_invite():
    assert decide_join(Node(7, None), None, "inv1", b"wrong" * 4, invite(revoked=True), WALL) == Reconnect()


# --- no invite presented


def test_removed_while_offline_rejoining_on_its_key_hears_key_removed():
    # remove() deleted the node row and recorded the key; its GONE never reached it.
    assert code(decide_join(None, WALL - 3600.0, None, None, None, WALL)) == "key_removed"


def test_removed_key_wins_over_expired_row():
    assert code(decide_join(Node(7, WALL - 1.0), WALL - 10.0, None, None, None, WALL)) == "key_removed"


@pytest.mark.parametrize("expires", [WALL, WALL - 1.0])
def test_expired_node_without_invite_is_node_expired(expires):
    assert code(decide_join(Node(7, expires), None, None, None, None, WALL)) == "node_expired"


def test_unknown_key_without_invite_is_not_registered():
    assert code(decide_join(None, None, None, None, None, WALL)) == "not_registered"


@pytest.mark.parametrize("invite_id,secret", [("inv1", None), ("", SECRET), (None, SECRET)])
def test_half_an_invite_counts_as_none(invite_id, secret):
    assert code(decide_join(None, None, invite_id, secret, invite(), WALL)) == "not_registered"


# --- an invite presented


def test_unknown_invite_is_invalid():
    assert code(decide_join(None, None, "inv1", SECRET, None, WALL)) == "invite_invalid"


def test_wrong_secret_is_invalid():
    assert code(decide_join(None, None, "inv1", b"t" * 16, invite(), WALL)) == "invite_invalid"


def test_revoked_invite():
    assert code(decide_join(None, None, "inv1", SECRET, invite(revoked=True), WALL)) == "invite_revoked"


@pytest.mark.parametrize("uses", [0, 3])
def test_expired_reusable_invite(uses):
    inv = invite(reusable=True, expires=WALL, uses=uses)
    assert code(decide_join(None, None, "inv1", SECRET, inv, WALL)) == "invite_expired"
    assert decide_join(None, None, "inv1", SECRET, inv, WALL - 0.001) == Admit("home")


def test_used_one_time_invite():
    assert code(decide_join(None, None, "inv1", SECRET, invite(uses=1), WALL)) == "invite_used"


def test_reusable_invite_admits_again():
    assert decide_join(None, None, "inv1", SECRET, invite(reusable=True, uses=5), WALL) == Admit("home")


@pytest.mark.parametrize("removed_at", [WALL - 100.0, WALL - 50.0])  # same instant as the invite, or later
def test_removal_newer_than_the_invite_is_key_removed(removed_at):
    inv = invite(created=WALL - 100.0)
    assert code(decide_join(None, removed_at, "inv1", SECRET, inv, WALL)) == "key_removed"


def test_invite_newer_than_the_removal_admits():
    inv = invite(created=WALL - 100.0, tag="lab")
    assert decide_join(None, WALL - 100.001, "inv1", SECRET, inv, WALL) == Admit("lab")


def test_expired_node_with_invite_is_readmitted_with_its_id():
    assert decide_join(Node(7, WALL - 1.0), None, "inv1", SECRET, invite(), WALL) == Readmit(7)


def test_expired_node_with_a_bad_invite_is_refused():
    assert code(decide_join(Node(7, WALL - 1.0), None, "inv1", SECRET, invite(uses=1), WALL)) == "invite_used"


def test_new_key_with_invite_is_admitted_with_the_invite_tag():
    assert decide_join(None, None, "inv1", SECRET, invite(tag="office"), WALL) == Admit("office")


# --- addresses and names


P4, P6 = ipaddress.ip_network("10.9.0.0/30"), ipaddress.ip_network("fd00::/126")  # two usable each


def test_addresses_are_key_derived_and_skip_taken_ones():
    free = addresses(KEY, 0, P4, P6, lambda a: False, lambda a: False)
    assert free == addresses(KEY, 0, P4, P6, lambda a: False, lambda a: False)
    v4, v6 = free
    other = addresses(KEY, 1, P4, P6, lambda a: a == v4, lambda a: a == v6)
    assert other[0] != v4 and other[1] != v6
    assert other[0] in {ipaddress.ip_address("10.9.0.1"), ipaddress.ip_address("10.9.0.2")}


def test_full_pool_is_refused_with_pool_full():
    assert code(addresses(KEY, 2, P4, P6, lambda a: True, lambda a: False)) == "pool_full"
    assert code(addresses(KEY, 2, P4, P6, lambda a: False, lambda a: True)) == "pool_full"


def test_asked_name_is_normalized_and_made_unique():
    assert first_name("My Laptop", KEY, lambda n: False) == ("my-laptop", False)
    assert first_name("My Laptop", KEY, lambda n: n in {"my-laptop", "my-laptop-2"}) == ("my-laptop-3", False)


@pytest.mark.parametrize("asked", [None, "", "!!!"])
def test_no_usable_name_gets_a_key_placeholder_then_an_id_name(asked):
    assert first_name(asked, KEY, lambda n: False) == ("pending-" + KEY.hex(), True)
    assert default_name(12, lambda n: False) == "node-12"
    assert default_name(12, lambda n: n == "node-12") == "node-12-2"


def test_long_names_stay_within_63_characters():
    base = "a" * 63
    name = free_name(base, lambda n: n == base)
    assert name == "a" * 58 + "-2" and len(name) <= 63

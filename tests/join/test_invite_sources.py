"""`meshwg join` takes its invite from a file, standard input or the environment, and a registered node
needs none: the secret need not sit in the agent's command line, readable by every local user in `ps`."""

from __future__ import annotations

import argparse
import base64
import io
import os

import pytest

from meshwg.commands import mesh as M
from meshwg.signaling.invite import InviteFormatError, parse_invite
from meshwg.signaling.invite import Invite
from meshwg.errors import UserError
from meshwg.io.agent import agent_state
from meshwg.io.agent.agent import cached_invite

INVITE = Invite(("192.0.2.1:7300", "[2001:db8::1]:7300"), bytes(range(32)), "inv1", b"s" * 16)


def _args(tmp_path, **kw) -> argparse.Namespace:
    return argparse.Namespace(invite=kw.get("invite"), invite_file=kw.get("invite_file"),
                              state_dir=str(tmp_path / "state"))


def _load(args):
    return M._load_invite(args, parse_invite, InviteFormatError)


def test_invite_from_a_file_and_the_argument_is_forgotten(tmp_path):
    path = tmp_path / "invite.txt"
    path.write_text(INVITE.encode() + "\n")
    args = _args(tmp_path, invite_file=str(path))
    assert _load(args) == INVITE


def test_invite_from_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(INVITE.encode()))
    assert _load(_args(tmp_path, invite_file="-")) == INVITE


def test_invite_from_the_environment_is_removed_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHWG_INVITE", INVITE.encode())
    assert _load(_args(tmp_path)) == INVITE
    assert "MESHWG_INVITE" not in os.environ  # children (hooks, ip, wg) do not inherit it


def test_argument_still_works_and_is_dropped_from_args(tmp_path):
    args = _args(tmp_path, invite=INVITE.encode())
    assert _load(args) == INVITE and args.invite is None


def test_bad_sources_are_one_line_errors_naming_the_source(tmp_path):
    with pytest.raises(UserError, match=r"missing\.txt: cannot read the invite"):
        _load(_args(tmp_path, invite_file=str(tmp_path / "missing.txt")))
    bad = tmp_path / "bad.txt"
    bad.write_text("mwg1_garbage")
    with pytest.raises(UserError, match=r"bad\.txt: invite"):
        _load(_args(tmp_path, invite_file=str(bad)))
    with pytest.raises(UserError, match="once"):
        _load(_args(tmp_path, invite=INVITE.encode(), invite_file=str(bad)))


def test_registered_node_starts_from_its_state_without_an_invite(tmp_path, monkeypatch):
    monkeypatch.delenv("MESHWG_INVITE", raising=False)
    with pytest.raises(UserError, match="holds no registration"):
        _load(_args(tmp_path))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    control = {"addrs": list(INVITE.addrs), "server_key": base64.b64encode(INVITE.server_key).decode()}
    agent_state.save_cache(str(state), {"name": "n"}, [], control=control)
    got = _load(_args(tmp_path))
    assert got.addrs == INVITE.addrs and got.server_key == INVITE.server_key
    assert got.secret == b"" and got.invite_id == ""  # the cache never holds the secret
    assert b"s" * 16 not in (state / agent_state.CACHE_FILE).read_bytes()


@pytest.mark.parametrize("control", [
    None, {}, {"addrs": [], "server_key": base64.b64encode(bytes(32)).decode()},
    {"addrs": ["no-port"], "server_key": base64.b64encode(bytes(32)).decode()},
    {"addrs": ["192.0.2.1:7300"], "server_key": base64.b64encode(bytes(31)).decode()},
    {"addrs": ["192.0.2.1:7300"], "server_key": "not base64!"},
    {"addrs": "192.0.2.1:7300", "server_key": 5},
])
def test_a_damaged_cached_server_record_is_no_invite(control):
    assert cached_invite(None if control is None else {"control": control}) is None

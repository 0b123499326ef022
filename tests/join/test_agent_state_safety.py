"""The agent's state directory is trusted only when nobody else can write to it, and its key file is
never reached through a symlink (nor chmodded through one)."""

from __future__ import annotations

import os
import stat

import pytest

from meshwg.config import keys
from meshwg.io.agent import agent_state as S


def test_world_writable_state_dir_is_refused(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(S.UnsafeStateError, match="writable by group or others"):
        S.load_or_create_key(str(d))
    assert os.listdir(d) == []  # no key written into it


def test_group_writable_state_dir_is_refused(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o770)
    with pytest.raises(S.UnsafeStateError):
        S.load_or_create_key(str(d))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_state_dir_owned_by_someone_else_is_refused(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(S.UnsafeStateError, match="owned by uid 65534"):
        S.load_or_create_key(str(d))


def test_symlinked_key_file_is_refused_and_its_target_untouched(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    planted = tmp_path / "attacker.key"
    planted.write_text(keys.key_to_base64(bytes(range(32))) + "\n")
    os.chmod(planted, 0o644)
    os.symlink(planted, d / S.KEY_FILE)
    with pytest.raises(S.UnsafeStateError, match="symbolic link"):
        S.load_or_create_key(str(d))
    assert stat.S_IMODE(os.stat(planted).st_mode) == 0o644  # not chmodded through the link
    assert os.path.islink(d / S.KEY_FILE)


def test_dangling_key_symlink_is_refused_and_nothing_written(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.key"
    os.symlink(target, d / S.KEY_FILE)
    with pytest.raises(S.UnsafeStateError):
        S.load_or_create_key(str(d))
    assert not target.exists() and os.path.islink(d / S.KEY_FILE)


def test_own_0700_dir_still_works_and_loose_key_is_tightened(tmp_path):
    d = str(tmp_path / "state")
    k = S.load_or_create_key(d)
    path = os.path.join(d, S.KEY_FILE)
    os.chmod(path, 0o640)
    assert S.load_or_create_key(d) == k
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

"""Atomic file replacement, for `meshwg up/save` (state, SaveConfig) and the agent's state directory."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` so that readers, and a crash, see the old or the new version, never half of one.

    The temp file has `mode` before any byte is written and keeps the old file's owner; it is removed
    if anything fails. The directory is fsynced so the rename itself survives a crash."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            try:
                st = os.stat(path)
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            except OSError:
                pass
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""Review (another local user) of the admin socket's client: the CLI (often run as root) must not take orders'
answers (an invite, a plain peer's config with its private key) from a socket another user put at the path."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

import pytest

from signal_server import admin_ops, admin_socket

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a server of another uid)")
def test_the_cli_refuses_a_server_socket_of_another_user():
    shared = tempfile.mkdtemp(prefix="meshwg-review-", dir="/tmp")   # pytest's tmp_path is root's 0700
    os.chmod(shared, 0o1777)   # a world-writable directory, as /tmp (--db ./mesh.db run from there)
    path = os.path.join(shared, "admin.sock")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the other user's fake server: one connection, a forged invite
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            os.chmod(path, 0o777)
            s.listen(1)
            os.write(w, b"x")
            s.settimeout(10)
            c, _ = s.accept()
            c.recv(65536)
            c.sendall(json.dumps({"ok": {"invite": "mwg1-forged", "invite_id": "x"}}).encode() + b"\n")
            c.close()
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        with pytest.raises(admin_ops.OpError) as err:
            admin_socket.request(path, "invite_create", {}, timeout=5)
        assert "uid 65534" in str(err.value)
    finally:
        os.close(r)
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(path)   # let the child finish
        except OSError:
            pass
        os.waitpid(pid, 0)
        shutil.rmtree(shared, ignore_errors=True)

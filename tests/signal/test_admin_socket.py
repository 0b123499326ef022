"""The server's admin socket (issue 15): the admin commands go through the running server (never opening the
database), the socket's protocol bounds, its 0600 mode and peer check, the CLI's one-line errors with no server,
and a node's own leave over its control session."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import trio
from sig_helpers import new_key, start_server, wait_until

from meshwg.config.keys import key_to_base64
from meshwg.control import ControlConnection, ControlError, parse_invite
from meshwg.control import events as ev
from signal_server import admin_socket, cli
from signal_server.control_core import ControlCore

PY = sys.executable


async def _listener(nursery, tmp_path, handler=None, uid_of=None):
    path = str(tmp_path / "db" / "admin.sock")
    os.makedirs(os.path.dirname(path), mode=0o700)
    calls = []

    async def echo(req):
        calls.append(req)
        return {"ok": req}

    ls = admin_socket.AdminListener(path)
    kw = {"uid_of": uid_of} if uid_of else {}
    await nursery.start(lambda task_status: admin_socket.serve(ls, handler or echo, task_status=task_status, **kw))
    return ls, calls


async def _exchange(path: str, data: bytes, shut: bool = True) -> dict:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        await s.connect(path)
        stream = trio.SocketStream(s)

        async def send():
            try:
                await stream.send_all(data)
                if shut:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the server stopped reading (a request over its bound)

        buf = b""
        async with trio.open_nursery() as n:
            n.start_soon(send)
            while chunk := await stream.receive_some(65536):
                buf += chunk
            n.cancel_scope.cancel()
    return json.loads(buf)


async def test_socket_is_0600_and_leaves_the_directory_alone(nursery, tmp_path):
    ls, _ = await _listener(nursery, tmp_path)
    assert stat.S_IMODE(os.stat(ls.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(ls.path)).st_mode) == 0o700  # not opened up to 0755
    with trio.fail_after(5):
        assert await _exchange(ls.path, b'{"op": "x", "params": {}}\n') == {"ok": {"op": "x", "params": {}}}


async def test_oversized_request_is_refused_unread(nursery, tmp_path):
    ls, calls = await _listener(nursery, tmp_path)
    with trio.fail_after(10):
        reply = await _exchange(ls.path, b'{"op": "' + b"x" * (3 << 20), shut=False)  # 3 MiB, no newline
    assert reply["code"] == 2 and "larger than" in reply["error"] and calls == []


async def test_bad_json_and_non_object(nursery, tmp_path):
    ls, calls = await _listener(nursery, tmp_path)
    with trio.fail_after(5):
        for data in (b"{nope\n", b"[1, 2]\n", b""):
            reply = await _exchange(ls.path, data)
            assert reply["code"] == 2 and reply["error"].startswith("bad admin request"), reply
    assert calls == []


async def test_silent_client_gets_a_deadline(nursery, tmp_path, monkeypatch):
    monkeypatch.setattr(admin_socket, "READ_DEADLINE", 0.2)
    ls, calls = await _listener(nursery, tmp_path)
    with trio.fail_after(3):
        reply = await _exchange(ls.path, b"{", shut=False)
    assert "no admin request" in reply["error"] and calls == []


async def test_other_uid_is_refused(nursery, tmp_path):
    ls, calls = await _listener(nursery, tmp_path, uid_of=lambda sock: 54321)
    with trio.fail_after(5):
        reply = await _exchange(ls.path, b'{"op": "pubkey", "params": {}}\n')
    assert reply["code"] == 1 and "uid 54321 may not" in reply["error"] and calls == []
    assert admin_socket.uid_allowed(0) and admin_socket.uid_allowed(os.geteuid())


def test_stale_socket_replaced_live_one_refused(tmp_path):
    path = str(tmp_path / "admin.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # a crashed server's file: nobody listens
    live = admin_socket.AdminListener(path)
    try:
        with pytest.raises(admin_socket.AdminSocketError, match="in use by a running process"):
            admin_socket.AdminListener(path)
    finally:
        live.close()
    assert not os.path.exists(path)


# --- the CLI against a running server (in this process)

async def _cli(capsys, *argv):
    capsys.readouterr()
    code = await trio.to_thread.run_sync(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_admin_commands_go_through_the_server(nursery, tmp_path, capsys):
    sock = str(tmp_path / "admin.sock")
    h = await start_server(nursery, tmp_path, admin_socket=sock)
    inv = h.invite(reusable=True)
    a = await ControlConnection.open(inv, new_key(), name="alpha")
    b = await ControlConnection.open(inv, new_key(), name="beta")
    # --db names nothing: every answer below can only come from the server.
    nodb = ["--db", str(tmp_path / "absent" / "signal.db"), "--admin-socket", sock]
    code, out, err = await _cli(capsys, "nodes", *nodb)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["ID", "NAME", "IPV4", "IPV6", "ONLINE"]
    assert sorted(ln.split()[1] for ln in lines[1:]) == ["alpha", "beta"]
    assert all(ln.split()[4] == "yes" for ln in lines[1:])  # the live registry, no presence record needed
    code, out, _ = await _cli(capsys, "invite", "create", *nodb)
    assert code == 0 and parse_invite(out.strip()).server_key == inv.server_key
    code, out, _ = await _cli(capsys, "invite", "list", *nodb)
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = await _cli(capsys, "pubkey", *nodb)
    assert code == 0 and out.strip() == key_to_base64(inv.server_key)
    code, out, _ = await _cli(capsys, "routes", "list", *nodb)
    assert code == 0 and out.split() == ["NODE", "ROUTE", "STATE"]
    code, out, err = await _cli(capsys, "nodes", "remove", "nobody", *nodb)
    assert code == 1 and err.strip() == "meshwg-signal: no node 'nobody' (use an id, a name or a public key)"
    code, out, err = await _cli(capsys, "nodes", "tag", "alpha", "bad tag!", *nodb)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err

    # A rename reaches beta at once; a removal ends alpha's session and beta drops it.
    code, out, _ = await _cli(capsys, "nodes", "rename", "alpha", "gamma", *nodb)
    assert code == 0 and "renamed to gamma" in out
    seen = {}
    with trio.fail_after(2):
        while "gamma" not in {p.name for p in seen.values()}:
            for e in await b.receive_events():
                if isinstance(e, (ev.DirectoryReset,)):
                    seen = dict(e.peers)
                elif isinstance(e, ev.PeerChanged):
                    seen[e.peer.key] = e.peer
    code, out, _ = await _cli(capsys, "nodes", "remove", "gamma", *nodb)
    assert code == 0 and "removed" in out
    with trio.fail_after(2):
        removed = False
        while not removed:
            removed = any(isinstance(e, ev.PeerRemoved) for e in await b.receive_events())

    code, out, _ = await _cli(capsys, "status", *nodb)
    assert code == 0
    assert "registered nodes: 1 (0 expired)" in out and "connected nodes 1" in out
    served = int(out.split("admin socket: ")[1].split()[0])
    assert served == h.server.counters["admin_requests"] >= 10
    await a.aclose()
    await b.aclose()


def test_no_database_is_one_line_and_creates_nothing(tmp_path, capsys):
    db = tmp_path / "nothere" / "signal.db"
    for argv in (["nodes"], ["status"], ["invite", "create", "--addr", "127.0.0.1:7300"], ["pubkey"]):
        code = cli.main([*argv, "--db", str(db)])
        out, err = capsys.readouterr()
        assert code == 1 and out == "" and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"meshwg-signal: {db}: no such database")
    assert not (tmp_path / "nothere").exists()


def test_unreadable_database_is_one_line(tmp_path, capsys):
    (tmp_path / "dir.db").mkdir()  # root reads any file: a directory is what it cannot open as a database
    code = cli.main(["nodes", "--db", str(tmp_path / "dir.db")])
    _, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1 and "cannot use the database" in err and "Traceback" not in err


def test_unreadable_for_another_user(tmp_path):
    """A database only root may read, asked by nobody: one line (no traceback), exit 1."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"):
        pytest.fail("needs root and setpriv (util-linux)")
    db = tmp_path / "signal.db"
    db.write_bytes(b"")
    db.chmod(0o600)
    tmp_path.chmod(0o755)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-m", "signal_server",
                        "nodes", "--db", str(db)], capture_output=True, text=True, timeout=30,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


async def test_dead_servers_socket_falls_back_to_the_database(nursery, tmp_path, capsys):
    h = await start_server(nursery, tmp_path)
    inv = h.invite()
    sock = str(tmp_path / "admin.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock)
    dead.close()
    code, out, err = await _cli(capsys, "invite", "list", "--db", h.db, "--admin-socket", sock)
    assert code == 0 and inv.invite_id in out


# --- a node's own leave (meshwg leave)

async def test_leave_removes_the_node_and_peers_see_it(nursery, tmp_path):
    h = await start_server(nursery, tmp_path)
    inv = h.invite(reusable=True)
    a = await ControlConnection.open(inv, new_key(), name="alpha")
    b = await ControlConnection.open(inv, new_key(), name="beta")
    await a.leave(timeout=3)
    with trio.fail_after(1):
        removed = False
        while not removed:
            removed = any(isinstance(e, ev.PeerRemoved) for e in await b.receive_events())
    assert [n.name for n in h.admin.list_nodes()] == ["beta"]
    assert h.server.counters["nodes_left"] == 1
    await b.aclose()


async def test_leave_to_an_older_server_is_a_clear_error(nursery, tmp_path, monkeypatch):
    handlers = {k: v for k, v in ControlCore._HANDLERS.items() if k != "leave"}  # as before the type existed
    monkeypatch.setattr(ControlCore, "_HANDLERS", handlers)
    h = await start_server(nursery, tmp_path)
    a = await ControlConnection.open(h.invite(), new_key(), name="alpha")
    with trio.fail_after(5):
        with pytest.raises(ControlError, match="did not answer the leave"):
            await a.leave(timeout=1)
    assert [n.name for n in h.admin.list_nodes()] == ["alpha"]
    await a.aclose()


async def test_a_leave_does_not_drop_the_keys_new_registration(nursery, tmp_path):
    """The key registers again (a new node id) while its leave's removal is being written: the new node stays."""
    import dataclasses

    from meshwg.config.keys import public_key as derive_public

    h = await start_server(nursery, tmp_path)
    priv = new_key()
    a = await ControlConnection.open(h.invite(), priv, name="alpha")
    key = derive_public(priv)
    server, write = h.server, h.server._db

    async def rejoined_meanwhile(fn, *args):
        result = await write(fn, *args)
        if fn == server.store.remove:
            server.directory.nodes[key] = dataclasses.replace(server.directory.nodes[key], node_id=10_000)
        return result

    server._db = rejoined_meanwhile
    await server._leave(key)
    assert server.directory.nodes[key].node_id == 10_000
    assert server.counters["nodes_left"] == 0
    await a.aclose()

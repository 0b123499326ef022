"""The running server's admin socket (issue 15): `meshwg-signal invite/nodes/plain/routes/policy/status/pubkey` send
their operation here instead of opening the database, so the server (which holds the database and its key) does
it and answers with live figures.

An AF_UNIX stream socket, by default next to the database (`--admin-socket PATH|none`), created 0600 (umask around
the bind, unix_listener); a stale one (a crashed server's) is replaced, a live one refused. Protocol: one JSON
object and a newline in ({"op": name, "params": {...}}, at most MAX_REQUEST bytes, within READ_DEADLINE), one JSON
object out ({"ok": result} or {"error": one line, "code": exit code}), then close. Only root and the server's own
user may ask (SO_PEERCRED); anyone else is answered with a refusal.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sqlite3
import struct

import trio

from meshwg.io.ipc.unix_listener import UnixListener, serve_connections
from signal_server import admin_ops, metrics
from signal_server.store_api import StoreError

log = logging.getLogger("signal.admin")

MAX_REQUEST = 2 << 20  # a policy file (at most 1 MiB) in base64, and the rest
READ_DEADLINE = 5.0  # the request must arrive this soon...
CONN_DEADLINE = 60.0  # ...and the whole exchange end this soon (a busy database may hold an operation)
MAX_REPLY = 64 << 20  # the client's bound on what it reads
SOCKET_NAME = "admin.sock"


RUN_DIR = "/run/meshwg-signal"  # the sockets of servers whose database is no file (a postgresql:// URL)
RUN_PATH = os.path.join(RUN_DIR, "admin.sock")  # before several servers could share one: looked for too


def _db_tag(db: str) -> str:
    """A short name of the database (its URL without the password): servers of two databases on one host differ."""
    import hashlib

    from signal_server.store_api import db_label

    return hashlib.sha256(db_label(db).encode()).hexdigest()[:8]


def default_path(db: str, port: int | None = None) -> str:
    """Next to the database: the CLI finds it from the same --db the server was given. A database that is no file
    may have several servers on this host (issue 14): each its own socket in RUN_DIR, named by the database and its
    control port; the CLI (port None) takes any running one of that database (they share it), see find_running."""
    if "://" in db:
        return os.path.join(RUN_DIR, f"admin-{_db_tag(db)}-{port}.sock") if port is not None else find_running(db)
    return os.path.join(os.path.dirname(os.path.abspath(db)), SOCKET_NAME)


def find_running(db: str, run_dir: str | None = None) -> str:
    """The socket of a running server of `db` in run_dir (one: it; several: the first that answers, any will do on
    a shared database); with none, the path the CLI reports as absent (NoServer: it opens the database itself)."""
    import glob

    run_dir = run_dir or RUN_DIR
    found = sorted(glob.glob(os.path.join(glob.escape(run_dir), f"admin-{_db_tag(db)}-*.sock")))
    found.append(os.path.join(run_dir, os.path.basename(RUN_PATH)))
    for path in found:
        if _answers(path):
            return path
    return os.path.join(run_dir, f"admin-{_db_tag(db)}-PORT.sock")


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def socket_path(db: str, given: str | None, port: int | None = None) -> str | None:
    """--admin-socket: a path, "none" (no socket), or not given (default_path; `port`: the server's control port)."""
    if given == "none":
        return None
    return given or default_path(db, port)


def peer_uid(sock) -> int:
    """The connecting process's uid (SO_PEERCRED: pid, uid, gid)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


def uid_allowed(uid: int) -> bool:
    return uid == 0 or uid == os.geteuid()


class AdminSocketError(Exception):
    """The admin socket cannot be made (a live server owns it, ...): one line, the server does not start."""


class AdminListener(UnixListener):
    def __init__(self, path: str):
        # dir_mode None: the database's directory keeps its mode (0700), it is not opened up for a socket.
        try:
            super().__init__(path, backlog=16, dir_mode=None)
        except OSError as exc:
            hint = " (another server on this database? choose another with --admin-socket PATH, or none)"
            raise AdminSocketError(f"admin socket {path}: {exc.strerror or exc}"
                                   + (hint if exc.errno == errno.EADDRINUSE else "")) from None
        os.chmod(path, 0o600)  # bound under umask 077 (no window); a socket needs no execute bit


async def serve(listener: AdminListener, handler, *, uid_of=peer_uid, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """handler(request: dict) -> awaitable reply dict. uid_of(trio socket) -> uid (tests fake a peer)."""
    await serve_connections(listener, lambda stream: answer(stream, handler, uid_of), task_status=task_status)


async def read_request(stream) -> dict:
    """One JSON object up to a newline (or EOF); ValueError for too much, a partial line or no object."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError(f"request larger than {MAX_REQUEST} bytes")
    request = json.loads(bytes(buf).split(b"\n", 1)[0])
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    return request


async def answer(stream, handler, uid_of=peer_uid) -> None:
    try:
        with trio.move_on_after(CONN_DEADLINE):
            reply = await _reply(stream, handler, uid_of)
            await stream.send_all(json.dumps(reply).encode() + b"\n")
            await stream.send_eof()
            with trio.move_on_after(1.0):  # what the client still sends, read (bounded): a close with unread
                left = MAX_REQUEST          # bytes would reset the connection, reply and all
                while left > 0 and (chunk := await stream.receive_some(65536)):
                    left -= len(chunk)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _reply(stream, handler, uid_of) -> dict:
    uid = uid_of(stream.socket)
    if not uid_allowed(uid):
        log.warning("admin socket: refused a request from uid %d (only root and uid %d may ask)", uid, os.geteuid())
        return {"error": f"uid {uid} may not use the server's admin socket (root or uid {os.geteuid()} may)",
                "code": 1}
    request = None
    with trio.move_on_after(READ_DEADLINE):
        try:
            request = await read_request(stream)
        except ValueError as exc:  # json's errors are ValueErrors too
            return {"error": f"bad admin request: {str(exc).splitlines()[0]}", "code": 2}
    if request is None:
        return {"error": f"no admin request within {READ_DEADLINE:g} s", "code": 2}
    try:
        return await handler(request)
    except Exception as exc:  # a bug in one operation must not take the server down
        log.exception("admin request failed")
        return {"error": f"internal error: {exc}", "code": 1}


def server_handler(server):
    """The running SignalServer's handler: the operation on its store (under its database lock, in a thread), with
    its live registry; the change it made reaches peers at once, not at the next poll of the change feed."""

    async def handle(request: dict) -> dict:
        op, params = request.get("op"), request.get("params", {})
        if not isinstance(op, str) or not isinstance(params, dict):
            return {"error": "bad admin request: needs op (a string) and params (an object)", "code": 2}
        server.counters["admin_requests"] += 1
        live = admin_ops.Live(frozenset(server.sessions), metrics.parse_text(server.render_metrics()))
        try:
            result = await server._db(admin_ops.run, op, server.store, live, params)
        except admin_ops.OpError as exc:
            return {"error": str(exc), "code": exc.code}
        except ValueError as exc:
            return {"error": str(exc), "code": 2}
        except (StoreError, sqlite3.Error) as exc:
            return {"error": str(exc), "code": 1}
        try:
            await server._follow_changes(own=True)
        except Exception:  # the housekeeping poll tries again
            log.warning("admin: reading the change feed failed; peers hear of the change at the next poll")
        return {"ok": result}

    return handle


# --- client (the CLI)

class NoServer(Exception):
    """Nothing listens on the socket (no file, or a dead server's): the CLI opens the database itself."""


def request(path: str, op: str, params: dict, timeout: float = CONN_DEADLINE) -> dict:
    """The result of `op` from the server at `path`; NoServer, or OpError (one line, exit code) for its refusal."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoServer(path) from None
        except PermissionError:
            raise admin_ops.OpError(f"{path}: permission denied: the running server's admin socket is for root "
                                    "and the server's user") from None
        except OSError as exc:
            raise admin_ops.OpError(f"cannot reach the running server at {path}: {exc.strerror or exc}") from None
        _check_server(s, path)
        try:
            s.sendall(json.dumps({"op": op, "params": params}).encode() + b"\n")
            data = _read_all(s)
        except socket.timeout:
            raise admin_ops.OpError(f"the running server at {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise admin_ops.OpError(f"the running server at {path} broke off: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
        if "ok" in reply:
            return reply["ok"]
        raise admin_ops.OpError(str(reply["error"]), int(reply.get("code", 1)))
    except (ValueError, KeyError, TypeError):
        raise admin_ops.OpError(f"the running server at {path} gave no readable answer") from None


def server_uid_allowed(uid: int, path: str) -> bool:
    """Whether the process listening at `path` (uid: SO_PEERCRED) may be our server: root, us, or the owner of the
    socket's directory (the database's, or /run/meshwg-signal, made by the server's user). In a directory others
    may write to (a sticky /tmp), another user could have put a socket there first."""
    if uid == 0 or uid == os.geteuid():
        return True
    try:
        return os.stat(os.path.dirname(os.path.abspath(path))).st_uid == uid
    except OSError:
        return False


def _check_server(s, path: str) -> None:
    """OpError unless the listener is a process our request and its answer (invites, private keys) may go to."""
    try:
        uid = peer_uid(s)
    except OSError as exc:
        raise admin_ops.OpError(f"cannot tell who listens at {path}: {exc.strerror or exc}") from None
    if not server_uid_allowed(uid, path):
        raise admin_ops.OpError(f"{path} is a socket of uid {uid}, not the server's (root, uid {os.geteuid()} or "
                                "the owner of its directory): not used")


def _read_all(s) -> bytes:
    buf = bytearray()
    while len(buf) <= MAX_REPLY:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)

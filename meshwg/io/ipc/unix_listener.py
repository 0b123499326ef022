"""A local control socket (AF_UNIX stream) shared by the UAPI and status shells.

Created synchronously (so a launcher can daemonize after it exists), under umask 077 in a 0755
directory, as wg expects. A stale socket nobody listens on is replaced; a live one is refused. On
close only our own socket is unlinked, never a successor's that reused the name.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

import trio

log = logging.getLogger(__name__)


class UnixListener:
    def __init__(self, path: str, *, backlog: int = 16, dir_mode: int | None = 0o755):
        """dir_mode None: the directory keeps its mode (the signal server's admin socket sits beside its 0700
        database), a new one is made 0700."""
        self.path = path
        run_dir = os.path.dirname(path)
        os.makedirs(run_dir, mode=0o700 if dir_mode is None else dir_mode, exist_ok=True)
        if dir_mode is not None:
            os.chmod(run_dir, dir_mode)
        self._claim_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
        self.sock = sock
        self._inode = os.stat(path).st_ino

    def _claim_path(self) -> None:
        """Remove a stale socket (nobody listening); refuse if a live process owns the name."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            return
        except FileNotFoundError:
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"{self.path} is in use by a running process")

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


async def serve_connections(listener: UnixListener, handle_connection, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept until cancelled; each connection runs `await handle_connection(trio.SocketStream)` in its own task.

    A bug triggered by one client is logged and closes that connection only.
    """
    lsock = trio.socket.from_stdlib_socket(listener.sock)

    async def guarded(conn) -> None:
        stream = trio.SocketStream(conn)
        try:
            await handle_connection(stream)
        except Exception:
            log.exception("%s: connection failed", listener.path)
        finally:
            conn.close()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            conn, _ = await lsock.accept()
            nursery.start_soon(guarded, conn)

"""UAPI shell: the cross-platform WireGuard userspace API on /var/run/wireguard/<iface>.sock.

Only the socket lives here; the codec (framing, parsing, formatting) is meshwg.config.uapi.
Several requests per connection. What a request means is the handler's business:

    handler.uapi_get() -> str                          # the whole reply, ending "errno=0\\n\\n"
    await handler.uapi_set(lines: tuple[str]) -> int   # 0 or a negative errno (-22 for garbage)

A client sending garbage gets `errno=-22` and is disconnected; the device keeps running.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

import trio

from meshwg.config import uapi

log = logging.getLogger(__name__)

RUN_DIR = "/var/run/wireguard"
MAX_REQUEST = 16 * 1024 * 1024  # a 1,000-peer setconf is ~200 kB; anything near this is an attack


def socket_path(iface: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"{iface}.sock")


class UapiListener:
    """The listening socket, created synchronously (before a launcher daemonizes) and removed on close."""

    def __init__(self, iface: str, run_dir: str = RUN_DIR):
        self.path = socket_path(iface, run_dir)
        os.makedirs(run_dir, mode=0o755, exist_ok=True)
        os.chmod(run_dir, 0o755)
        self._claim_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            sock.bind(self.path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        sock.listen(16)
        self.sock = sock
        self._inode = os.stat(self.path).st_ino

    def _claim_path(self) -> None:
        """Remove a stale socket (nobody listening); refuse if a live daemon owns the name."""
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
        raise OSError(errno.EADDRINUSE, f"{self.path} is in use by a running daemon")

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
        try:
            # Only unlink our own socket, never a successor's that reused the name.
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


async def serve(listener: UapiListener, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept and answer UAPI connections until cancelled."""
    lsock = trio.socket.from_stdlib_socket(listener.sock)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            conn, _ = await lsock.accept()
            nursery.start_soon(_serve_connection, conn, handler)


async def _serve_connection(sock, handler) -> None:
    try:
        await _converse(trio.SocketStream(sock), handler)
    except Exception:
        # A bug triggered by one client must not take the device down.
        log.exception("uapi: connection failed")
    finally:
        sock.close()


async def _converse(conn: trio.SocketStream, handler) -> None:
    framer = uapi.RequestFramer()
    total = 0
    try:
        while True:
            try:
                request = framer.next_request()
            except uapi.UapiError as err:
                # Unknown operation, overlong line, not UTF-8: answer once, then hang up.
                log.warning("uapi: %s", err)
                await conn.send_all(uapi.format_errno(uapi.EINVAL).encode())
                return
            if request is None:
                chunk = await conn.receive_some(65536)
                if not chunk:
                    return
                total += len(chunk)
                if total > MAX_REQUEST:
                    await conn.send_all(uapi.format_errno(uapi.EINVAL).encode())
                    return
                framer.feed(chunk)
                continue
            total = 0
            if request.op == "get":
                reply = handler.uapi_get()
            else:
                reply = uapi.format_errno(await handler.uapi_set(request.lines))
            await conn.send_all(reply.encode())
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        return

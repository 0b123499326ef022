"""UAPI shell: the cross-platform WireGuard userspace API on /var/run/wireguard/<iface>.sock.

Only the socket lives here; the codec (framing, parsing, formatting) is meshwg.config.uapi.
Several requests per connection. What a request means is the handler's business:

    handler.uapi_get() -> str                          # the whole reply, ending "errno=0\\n\\n"
    await handler.uapi_set(lines: tuple[str]) -> int   # 0 or a negative errno (-22 for garbage)

A client sending garbage gets `errno=-22` and is disconnected; the device keeps running.
"""

from __future__ import annotations

import logging
import os

import trio

from meshwg.config import uapi
from meshwg.io.ipc.unix_listener import UnixListener, serve_connections

log = logging.getLogger(__name__)

RUN_DIR = "/var/run/wireguard"
MAX_REQUEST = 16 * 1024 * 1024  # a 1,000-peer setconf is ~200 kB; anything near this is an attack


def socket_path(iface: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, f"{iface}.sock")


class UapiListener(UnixListener):
    """The listening socket, created synchronously (before a launcher daemonizes) and removed on close."""

    def __init__(self, iface: str, run_dir: str = RUN_DIR):
        super().__init__(socket_path(iface, run_dir))


async def serve(listener: UapiListener, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept and answer UAPI connections until cancelled."""
    await serve_connections(listener, lambda conn: _converse(conn, handler), task_status=task_status)


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

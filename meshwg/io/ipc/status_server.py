"""The agent's local query socket: one JSON request line in, one JSON reply out, then close.

It lives next to the UAPI socket (/var/run/wireguard/<iface>.meshwg), which the NAT lab gives every
host privately, so nodes in different namespaces of one machine never clash. It is not a `.sock`
file, so `wg show all` does not mistake it for a WireGuard interface. Mode 0600: root only.
`run_dir` None means RUN_DIR as it is at call time (tests point clients at a temporary directory).
"""

from __future__ import annotations

import json
import logging
import os
import socket

import trio

from meshwg.io.ipc.uapi_server import RUN_DIR  # next to the UAPI socket
from meshwg.io.ipc.unix_listener import UnixListener, serve_connections

log = logging.getLogger("meshwg.status")

MAX_REQUEST = 4096


SUFFIX = ".meshwg"


def socket_path(iface: str, run_dir: str | None = None) -> str:
    return os.path.join(run_dir or RUN_DIR, f"{iface}{SUFFIX}")


def listed_agents(run_dir: str | None = None) -> list[str]:
    """Interfaces with a status socket in the run directory, sorted (a crashed agent's may be stale)."""
    try:
        names = os.listdir(run_dir or RUN_DIR)
    except OSError:
        return []
    return sorted(n[:-len(SUFFIX)] for n in names if n.endswith(SUFFIX) and len(n) > len(SUFFIX))


def running_agents(run_dir: str | None = None) -> list[str]:
    """The listed agents that accept a connection: a stale socket (an agent that crashed) refuses it."""
    out = []
    for iface in listed_agents(run_dir):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            try:
                s.connect(socket_path(iface, run_dir))
            except OSError:
                continue
            # The agent reads our empty request as a status query and fails to answer: harmless.
        out.append(iface)
    return out


class StatusListener(UnixListener):
    def __init__(self, iface: str, run_dir: str | None = None):
        super().__init__(socket_path(iface, run_dir), backlog=8)


async def serve(listener: StatusListener, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """handler(request: dict) -> awaitable dict."""
    await serve_connections(listener, lambda stream: _answer(stream, handler), task_status=task_status)


async def _answer(stream: trio.SocketStream, handler) -> None:
    try:
        with trio.move_on_after(30):
            buf = b""
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                buf += chunk
            try:
                request = json.loads(buf.split(b"\n", 1)[0] or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                reply = {"error": "bad request"}
            else:
                try:
                    reply = await handler(request)
                except Exception as exc:  # a bug in one query must not take the agent down
                    log.exception("status query failed")
                    reply = {"error": f"internal error: {exc}"}
            # Shielded: a handler that stops the agent (`meshwg leave`) still gets its reply out.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


def query(iface: str, request: dict, run_dir: str | None = None, timeout: float = 20.0) -> dict:
    """Client side (blocking): send one request to the agent on `iface` and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path(iface, run_dir))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)

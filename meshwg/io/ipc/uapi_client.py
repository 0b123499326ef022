"""A blocking UAPI client (what `wg` does), for `meshwg up/down/show` and tests."""

from __future__ import annotations

import os
import socket

from meshwg.io.ipc.uapi_server import RUN_DIR, socket_path


class UapiClientError(OSError):
    pass


def request(iface: str, text: str, run_dir: str = RUN_DIR, timeout: float = 10.0) -> str:
    """Send one request ("get=1\\n\\n" or "set=1\\n...\\n\\n"); return the reply up to and including errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path(iface, run_dir))
        sock.sendall(text.encode())
        buf = b""
        while not (buf.endswith(b"\n\n") and b"errno=" in buf):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode()


def _errno_of(reply: str) -> int:
    for line in reply.splitlines():
        if line.startswith("errno="):
            return int(line[6:])
    raise UapiClientError("no errno in UAPI reply")


def set_text(iface: str, text: str, run_dir: str = RUN_DIR) -> None:
    """Send a whole "set=1..." request; raise UapiClientError(-errno) unless errno=0."""
    code = _errno_of(request(iface, text, run_dir))
    if code:
        raise UapiClientError(-code, f"UAPI set on {iface} failed: {os.strerror(-code)}")


def get(iface: str, run_dir: str = RUN_DIR) -> dict:
    """The device as a dict: private_key, listen_port, fwmark, peers=[{public_key, ..., allowed_ips: []}]."""
    reply = request(iface, "get=1\n\n", run_dir)
    if _errno_of(reply):
        raise UapiClientError(-_errno_of(reply), f"UAPI get on {iface} failed")
    device: dict = {"peers": []}
    peer: dict | None = None
    for line in reply.splitlines():
        key, _, value = line.partition("=")
        if not line or key == "errno":
            continue
        if key == "public_key":
            peer = {"public_key": value, "allowed_ips": []}
            device["peers"].append(peer)
        elif peer is None:
            device[key] = value
        elif key == "allowed_ip":
            peer["allowed_ips"].append(value)
        else:
            peer[key] = value
    return device


def list_interfaces(run_dir: str = RUN_DIR) -> list[str]:
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".sock"))

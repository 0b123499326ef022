"""systemd's notify protocol (sd_notify(3)) without libsystemd, for `meshwg join` and `meshwg-signal serve|relay`.

A notification is one datagram of newline-separated KEY=VALUE lines (READY=1, STATUS=..., STOPPING=1) sent to the
AF_UNIX socket named in $NOTIFY_SOCKET; a name starting with '@' is an abstract socket. take() removes the variable
from the environment the first time, so no child (ip, nft, sysctl, resolvconf) inherits it and speaks for us.
Nothing here raises: without the variable, with a name we cannot use, or when the socket is gone, sending does
nothing (counted in `failed`), so the programs run the same outside systemd.
"""

from __future__ import annotations

import os
import socket

ENV = "NOTIFY_SOCKET"


def socket_address(name: str | None) -> str | bytes | None:
    """The sendto() address for $NOTIFY_SOCKET's value; None for none or one we do not support (relative paths,
    vsock: names)."""
    if not name:
        return None
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode("utf-8", "surrogateescape")
    if name.startswith("/"):
        return name
    return None


def one_line(text: str) -> str:
    """A STATUS value: newlines would start new KEY=VALUE lines."""
    return " ".join(str(text).split())


class Notifier:
    def __init__(self, name: str | None):
        self.address = socket_address(name)
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of `fields` (KEY=VALUE each); False when not sent. Never blocks: a full queue drops it."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT, self.address)
        except OSError:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={one_line(status)}"] if status is not None else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={one_line(text)}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_taken: Notifier | None = None


def take(environ=os.environ) -> Notifier:
    """The process's notifier: $NOTIFY_SOCKET read and removed the first time, the same notifier afterwards."""
    global _taken
    if _taken is None:
        _taken = Notifier(environ.pop(ENV, None))
    return _taken

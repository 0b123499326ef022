"""TCP connections that carry the node's fwmark, so an exit node's policy routing never sends the node's own
control and relay traffic into the tunnel (issue 12; wg-quick marks its UDP socket the same way)."""

from __future__ import annotations

import socket

import trio

SO_MARK = getattr(socket, "SO_MARK", 36)


async def open_tcp_stream(host: str, port: int, fwmark: int = 0) -> trio.SocketStream:
    """trio.open_tcp_stream, with SO_MARK set before connect() (the SYN is routed with it) when fwmark."""
    if not fwmark:
        return await trio.open_tcp_stream(host, port)
    errors = []
    for family, type_, proto, _, addr in await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
            await sock.connect(addr)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise errors[-1] if errors else OSError(f"no address for {host}")


def set_stream_mark(stream, fwmark: int) -> None:
    """Mark a connected stream's socket (the kernel re-routes its next packets); a closed one is left alone."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
    except OSError:
        pass

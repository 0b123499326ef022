"""A node's relay session over UDP for tests: RelaySession (the node's own codec) on its own loopback socket."""

from __future__ import annotations

import os
import time

import trio

from meshwg.control.relay_client import RelaySession
from meshwg.wg.crypto import clamp, dh_pub


class UdpRelayNode:
    def __init__(self, sk: bytes, server_pk: bytes, relay_addr) -> None:
        self.sk, self.pub = sk, dh_pub(clamp(sk))
        self.rs = RelaySession(sk, server_pk, os.urandom)
        self.relay_addr = relay_addr
        self.sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)

    async def bind(self) -> "UdpRelayNode":
        await self.sock.bind(("127.0.0.1", 0))
        return self

    async def start(self) -> "UdpRelayNode":
        """Bound, HELLO answered, and the confirm sent: a session the relay forwards for."""
        await self.bind()
        while (await self.hello())[0] != "ready":
            pass
        await self.sock.sendto(self.rs.confirm(), self.relay_addr)
        return self

    async def hello(self):
        await self.sock.sendto(self.rs.hello(time.monotonic(), time.time()), self.relay_addr)
        return await self.event()

    async def event(self, timeout: float = 2.0):
        """The next frame the session understands (("ready", ...), ("recv", src, packet), notices)."""
        with trio.fail_after(timeout):
            while True:
                data, _ = await self.sock.recvfrom(65535)
                e = self.rs.handle_untrusted(data, time.monotonic())
                if e is not None:
                    return e

    async def recv(self) -> tuple[bytes, bytes]:
        """(source key, packet) of the next relayed packet."""
        while True:
            e = await self.event(3.0)
            if e[0] == "recv":
                return e[1], e[2]

    async def received(self, quiet: float = 0.3) -> list:
        """The relayed packets arriving until `quiet` seconds pass without one."""
        out = []
        while True:
            with trio.move_on_after(quiet):
                data, _ = await self.sock.recvfrom(65535)
                e = self.rs.handle_untrusted(data, time.monotonic())
                if e is not None and e[0] == "recv":
                    out.append(e[2])
                continue
            return out

    async def send(self, dst: bytes, packet: bytes) -> None:
        await self.sock.sendto(self.rs.encode_send(dst, packet), self.relay_addr)

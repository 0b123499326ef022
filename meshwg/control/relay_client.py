"""Node side of the relay: a sans-IO session for the shared UDP socket, and a trio TCP fallback client.

UDP use (the node's one socket carries WireGuard, STUN, disco and relay frames):
    rs = RelaySession(private_key, server_public_key, os.urandom)
    sock.sendto(rs.hello(now, wall), relay_addr)            # and again whenever rs.needs_hello(now)
    for datagrams starting with relay_wire.MAGIC:  ev = rs.handle_untrusted(data, now)
        ("ready", observed_addr) | ("recv", src_key, packet) | ("notice", code, key) | ("pong", nonce8) | None
    frame = rs.encode_send(dst_key, wg_packet)                # None until ready
    on "ready": sock.sendto(rs.confirm(), relay_addr)         # lets the relay publish our observed address
"""

from __future__ import annotations

import math
import os
import struct
import time

import trio

from meshwg.control.tcp import open_tcp_stream
from meshwg.signaling import relay_wire as W
from meshwg.wg.crypto import clamp

NOTICE_HELLO_INTERVAL = 1.0  # notices are unauthenticated: answer them with a HELLO at most this often


class RelaySession:
    def __init__(self, private_key: bytes, server_public: bytes, random_bytes, cred: bytes | None = None) -> None:
        self.private_key = clamp(private_key)
        self.server_public = server_public
        self._random = random_bytes
        # The control plane's relay credential (issue 14.3): sent in every HELLO (a HELLO_CRED) while we hold one;
        # a regional relay admits us by it. The shell replaces it when the server sends a fresh one.
        self.cred = cred
        self.token: bytes | None = None
        self.observed = None
        self.ready_until = 0.0
        self.last_hello = -1e9
        self.rehello_asked = False  # a re-hello notice came since our last HELLO
        self.drops = 0

    def hello(self, now: float, wall: float) -> bytes:
        self.last_hello = now
        self.rehello_asked = False
        hello = W.encode_hello(self.private_key, self.server_public, wall, self._random(8), self._random(24))
        return W.encode_hello_cred(hello, self.cred) if self.cred else hello

    def needs_hello(self, now: float) -> bool:
        # Re-hello before the session expires; retry unanswered hellos every 2 s; answer notices at most 1/s.
        if self.rehello_asked and now - self.last_hello >= NOTICE_HELLO_INTERVAL:
            return True
        if self.token is None:
            return now - self.last_hello >= 2.0
        return now - self.last_hello >= W.HELLO_INTERVAL or now >= self.ready_until

    def get_timer(self) -> float:
        asked = self.last_hello + NOTICE_HELLO_INTERVAL if self.rehello_asked else math.inf
        if self.token is None:
            return min(asked, self.last_hello + 2.0)
        return min(asked, self.last_hello + W.HELLO_INTERVAL, self.ready_until)

    def is_ready(self, now: float) -> bool:
        return self.token is not None and now < self.ready_until

    def encode_send(self, dst: bytes, packet: bytes) -> bytes | None:
        if self.token is None:
            return None
        return W.encode_send(self.token, dst, packet)

    def confirm(self) -> bytes | None:
        """The frame to send right after HELLO_OK: the relay publishes our "observed" address only once a
        SEND under the new token comes back from it (proof that we receive there, not a spoofed source)."""
        return self.encode_send(W.CONFIRM_DST, b"")

    def handle_untrusted(self, data: bytes, now: float):
        t = W.frame_type_untrusted(data)
        if t == W.T_RECV:
            parsed = W.parse_recv_untrusted(data)
            if parsed:
                return ("recv", parsed[0], parsed[1])
        elif t == W.T_HELLO_OK:
            parsed = W.parse_hello_ok_untrusted(self.private_key, self.server_public, data)
            if parsed:
                self.token, ttl, self.observed = parsed
                self.ready_until = now + ttl
                self.rehello_asked = False
                return ("ready", self.observed)
        elif t == W.T_PONG:
            nonce = W.parse_ping_untrusted(data, W.T_PONG)
            if nonce is not None:
                return ("pong", nonce)
        elif t == W.T_NOTICE:
            parsed = W.parse_notice_untrusted(data)
            if parsed:
                code, key = parsed
                if code in (W.N_REHELLO, W.N_STALE_HELLO):
                    # Anyone can forge a notice: keep the token (only a new HELLO_OK replaces it) and let
                    # needs_hello() answer it, at most once a second however many arrive.
                    self.rehello_asked = True
                return ("notice", code, key)
        self.drops += 1
        return None


_RECV_PREFIX = W.MAGIC + bytes([W.T_RECV])
_RECV_HEADER = len(_RECV_PREFIX) + 32
_LENGTH = struct.Struct("!H")


class TcpRelayClient:
    """Relay over TCP for networks that block UDP. `await open_tcp_relay(...)` returns a ready client.

    Bulk use (issue 16): send_many writes many SEND frames in one send (each destination's header built once
    per token), receive_many returns every RECV of a read at once."""

    def __init__(self, stream, session: RelaySession) -> None:
        self.stream = stream
        self.session = session
        self._dec = W.TcpFrameDecoder()
        self._queue: list = []
        self._lock = trio.Lock()
        self._headers: dict[bytes, bytes] = {}  # destination key -> SEND header under _header_token
        self._header_token: bytes | None = None
        sock = getattr(stream, "socket", None)  # None: a stream with no socket (tests) has no direct writes
        self._fd = sock.fileno() if sock is not None else None
        self._tail = b""  # what a direct write left unsent (see send_nowait)
        self._closed = False

    async def send(self, dst: bytes, packet: bytes) -> None:
        await self.send_many([(dst, packet)])

    def _frames(self, items) -> bytes:
        """(dst, packet) pairs as SEND frames, each destination's header built once per token."""
        token = self.session.token
        if token is None:
            raise RuntimeError("relay session not ready")
        if token != self._header_token:
            self._headers.clear()
            self._header_token = token
        headers, pack, parts = self._headers, _LENGTH.pack, []
        for dst, packet in items:
            header = headers.get(dst)
            if header is None:
                header = headers[dst] = W.encode_send(token, dst, b"")
            parts += (pack(len(header) + len(packet)), header, packet)
        return b"".join(parts)

    @property
    def backlog(self) -> bool:
        """A direct write left bytes the kernel did not take: the next send_many (or rehello) sends them first."""
        return bool(self._tail)

    def send_nowait(self, items) -> bool:
        """SEND frames straight to the socket, from sync code (no trio task hop: issue 16's RTT), when no write
        is under way; False (nothing taken) otherwise: the caller queues them for send_many. What the kernel
        does not take at once is kept as the backlog, never overtaken: no direct write while it is there."""
        if self._tail or self._lock.locked() or self._closed or self._fd is None:
            return False
        data = self._frames(items)
        try:
            sent = os.write(self._fd, data)
        except OSError:  # full (BlockingIOError) or broken: the next send_many waits, or fails and closes
            sent = 0
        self._tail = data[sent:]
        return True

    def direct_headers(self) -> dict | None:
        """For another writer of this socket (the driver's compiled send, issue 16): the SEND headers (destination
        key -> header under the session's current token) it may frame from, when it may write now: no write under
        way, no backlog, the headers not stale. None: not now (the caller hands its packets to the queue)."""
        if self._tail or self._lock.locked() or self._closed or self._fd is None:
            return None
        token = self.session.token
        if token is None or token != self._header_token:
            return None  # a new token: the next _frames rebuilds the headers
        return self._headers

    def took_direct(self, rest: bytes) -> None:
        """That writer's write left `rest` unsent: the backlog, sent before anything else."""
        self._tail = rest

    async def send_many(self, items) -> None:
        """(dst, packet) pairs as SEND frames, in one write (after the backlog, if any)."""
        data = self._frames(items)
        async with self._lock:
            await self._send_all(data)

    async def _send_all(self, data: bytes) -> None:
        """Under the lock: the backlog, then data."""
        if self._tail:
            data, self._tail = self._tail + data, b""
        await self.stream.send_all(data)

    async def rehello(self) -> None:
        async with self._lock:
            await self._send_all(W.tcp_frame(self.session.hello(time.monotonic(), time.time())))

    async def receive_event(self):
        """Next ("recv", src, packet) / ("notice", code, key) / ("ready", None) event; raises EOFError on close."""
        while True:
            while self._queue:
                ev = self.session.handle_untrusted(self._queue.pop(0), time.monotonic())
                if ev is not None:
                    return ev
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("relay closed the connection")
            self._queue.extend(self._dec.feed(data))

    async def receive(self) -> tuple[bytes, bytes]:
        """Next relayed packet (src_key, packet); re-hellos transparently when asked to, and when the
        session's timer says so (a notice inside the quiet second, the periodic re-hello, expiry)."""
        while True:
            ev = None
            with trio.move_on_at(self._timer_deadline()):
                ev = await self.receive_event()
            if ev is not None and ev[0] == "recv":
                return ev[1], ev[2]
            if self.session.needs_hello(time.monotonic()):
                await self.rehello()

    async def receive_many(self) -> list[tuple[bytes, bytes]]:
        """The relayed packets (src_key, packet) of the next read that carried any; re-hellos as receive() does."""
        while True:
            got = None
            with trio.move_on_at(self._timer_deadline()):
                got = await self._receive_read()
            if got:
                return got
            if self.session.needs_hello(time.monotonic()):
                await self.rehello()

    async def _receive_read(self) -> list[tuple[bytes, bytes]]:
        """The RECVs of what is queued, else of one read. Other frames (HELLO_OK, notices, junk) go through the
        session, which checks, applies and counts them; then [] lets the caller look at the session's timer."""
        frames, self._queue = self._queue, []
        if not frames:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("relay closed the connection")
            frames = self._dec.feed(data)
        out = []
        for frame in frames:
            if len(frame) >= _RECV_HEADER and frame[:5] == _RECV_PREFIX:
                out.append((frame[5:_RECV_HEADER], frame[_RECV_HEADER:]))
            else:
                self.session.handle_untrusted(frame, time.monotonic())
        return out

    @property
    def fileno(self) -> int | None:
        """The socket's fd (None: a stream with no socket), for a reader outside this client (the driver's)."""
        return self._fd

    def detach_reader(self) -> tuple[list[bytes], bytes]:
        """Hand reading over to another reader (issue 16: the driver's data loop reads the socket): the frames
        read but not handled yet, and the start of the next frame. receive_* must not be called after this."""
        frames, self._queue = self._queue, []
        tail = bytes(self._dec._buf)
        self._dec = W.TcpFrameDecoder()
        return frames, tail

    def _timer_deadline(self) -> float:
        """session.get_timer() (time.monotonic()) on trio's clock."""
        return trio.current_time() + max(0.0, self.session.get_timer() - time.monotonic())

    async def aclose(self) -> None:
        self._closed = True
        await self.stream.aclose()


async def open_tcp_relay(host: str, port: int, private_key: bytes, server_public: bytes, random_bytes,
                         timeout: float = 5.0, fwmark: int = 0, cred: bytes | None = None) -> TcpRelayClient:
    """Connect, prove key possession, wait for HELLO_OK. Raises PermissionError if the relay refuses the key.
    fwmark: SO_MARK of the socket (kept out of an exit node's tunnel)."""
    with trio.fail_after(timeout):
        stream = await open_tcp_stream(host, port, fwmark)
        client = TcpRelayClient(stream, RelaySession(private_key, server_public, random_bytes, cred))
        try:
            await client.rehello()
            while True:
                ev = await client.receive_event()
                if ev[0] == "ready":
                    return client
                if ev[0] == "notice" and ev[1] == W.N_NOT_REGISTERED:
                    raise PermissionError("relay refused this key: not a registered, unexpired node")
        except BaseException:
            await stream.aclose()
            raise

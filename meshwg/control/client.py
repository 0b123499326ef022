"""Node side of the control channel: one authenticated connection, and a reconnecting client (trio)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time

import trio

from meshwg.control.entry_check import relay_cred_untrusted, relays_untrusted
from meshwg.control.events import RelayCredential
from meshwg.control.entry_check import (entry_accept_untrusted, entry_routes_untrusted, self_update_untrusted,
                                       tags_untrusted)
from meshwg.control.events import (PEER_KINDS, Connected, DirectoryReset, Disconnected, PeerChanged, PeerInfo,
                                   PeerRemoved, PunchFailed, PunchNotice, Removed, SealedMessage, Welcome)
from meshwg.mesh.dns_names import dns_domain_untrusted
from meshwg.signaling import protocol as P
from meshwg.signaling.invite import Invite, split_hostport
from meshwg.control import reconnect as R
from meshwg.control.tcp import open_tcp_stream, set_stream_mark
from meshwg.signaling.noise import HandshakeError, Initiator
from meshwg.wg.crypto import clamp, dh_pub as public_key
from meshwg.signaling.sealed import open_untrusted, seal

log = logging.getLogger("meshwg.control")
NETWORK_CHANGED = "network changed"  # a Disconnected reason: our address went away (network_changed)


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class JoinRefusedError(ControlError):
    """The server refused this node (bad/expired/revoked/used invite, removed or expired node, full
    address pool: pool_full). Fatal."""


class ServerKeyMismatch(ControlError):
    """The server did not prove the key pinned in the invite: a wrong server, a wrong database or a
    forged invite. Fatal for a first join; a registered node keeps its tunnels and retries slowly."""

    def __init__(self, message: str) -> None:
        super().__init__(R.SERVER_KEY_MISMATCH, message)


class ConnectionLost(ControlError):
    """The connection broke, went silent or was refused as busy; the reconnecting client retries
    (after `retry_after` seconds at least, when the server said so)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after


def _retry_untrusted(msg: dict) -> float | None:
    r = msg.get("retry_after")
    return float(min(max(r, 0.1), P.BUSY_MAX_RETRY)) if isinstance(r, (int, float)) and r == r else None


def _addr_list(values) -> tuple:
    out = []
    for v in values or ():
        try:
            out.append(split_hostport(v))
        except (ValueError, TypeError):
            pass
    return tuple(out)


def _peer_untrusted(raw) -> PeerInfo | None:
    """A packed directory entry from the server as PeerInfo, else None."""
    e = P.unpack_entry_untrusted(raw)
    if not e:
        return None
    try:
        kind = e.get("kind", "node")  # servers before issue 12 send no kind: every entry is a node
        if kind not in PEER_KINDS:  # a kind this node cannot handle safely (a newer server's): not a peer at all
            return None
        cands = P.candidates_untrusted(e.get("cand", [])) or []
        accept, refused = entry_accept_untrusted(e["accept"]) if "accept" in e else (None, 0)
        offers, refused_offers = entry_accept_untrusted(e["offers"]) if "offers" in e else (None, 0)
        return PeerInfo(e["key"], int(e["id"]), str(e["name"]), str(e["ipv4"]), str(e["ipv6"]), tuple(cands),
                        bool(e["online"]), kind, entry_routes_untrusted(e.get("routes")), e.get("exit") is True,
                        accept, tags_untrusted(e.get("tags")), refused + refused_offers, offers)
    except (KeyError, TypeError, ValueError, OverflowError):  # int(inf) is an OverflowError
        return None


LEAVE_TIMEOUT = 5.0  # a server that removes a node answers within its database's time; an old one never does


def _no_leave_answer(timeout: float) -> ControlError:
    return ControlError("no_answer", f"the server did not answer the leave request within {timeout:g} s (a server "
                                     "older than this meshwg ignores it: remove the node with `meshwg-signal nodes "
                                     "remove`)")


def _check_left(e: Removed) -> None:
    if e.reason != P.GONE_LEFT:
        raise ControlError(e.reason, f"the server ended this node's membership itself ({e.reason})")


class ControlConnection:
    """One authenticated, encrypted control connection. No reconnect logic (see ControlClient)."""

    def __init__(self, stream, chan: P.SecureChannel, private_key: bytes, welcome: Welcome, pending: list) -> None:
        self.stream = stream
        self.chan = chan
        self.private_key = private_key
        self.welcome = welcome
        # The one directory is the agent core's (meshwg.mesh.agent_core); here only a full directory
        # arriving in chunks is put together.
        self._full: dict | None = None
        self._pending = pending
        self.last_rx = time.monotonic()
        self.drops = 0
        self._send_lock = trio.Lock()
        self.addr = ""  # the invite's address this connection reached
        self.servers: tuple = ()  # the welcome's running servers (host:port), () from a server with none

    @classmethod
    async def open(cls, invite: Invite, private_key: bytes, *, name: str | None = None, candidates=(),
                   timeout: float = 5.0, random_bytes=os.urandom, fwmark: int = 0) -> "ControlConnection":
        """Connect to the first reachable address of the invite, handshake, register; returns after the welcome.
        fwmark: SO_MARK of the socket (an exit node's policy routing keeps marked traffic out of the tunnel)."""
        errors, mismatch, hints, codes = [], None, [], set()
        for addr in invite.addrs:
            host, port = split_hostport(addr)
            try:
                with trio.fail_after(timeout):
                    stream = await open_tcp_stream(host, port, fwmark)
            except (OSError, trio.TooSlowError) as exc:
                # TooSlowError has no message (and an exception object is always truthy).
                errors.append(f"{addr}: {str(exc) or 'connect timed out'}")
                continue
            try:
                with trio.fail_after(timeout):
                    conn = await cls._handshake(stream, invite, private_key, name, candidates, random_bytes)
                conn.addr = addr
                return conn
            except trio.TooSlowError:
                await stream.aclose()
                errors.append(f"{addr}: handshake timed out")
            except (ControlError, OSError, trio.BrokenResourceError) as exc:
                await stream.aclose()
                if isinstance(exc, JoinRefusedError):
                    raise  # the server proved the pinned key: its word on this node is final
                if isinstance(exc, ServerKeyMismatch):
                    mismatch = mismatch or exc  # another address may still be the right server
                if isinstance(exc, ConnectionLost) and exc.retry_after is not None:
                    hints.append(exc.retry_after)
                    codes.add(exc.code)
                errors.append(f"{addr}: {exc}")
        if mismatch is not None:
            raise ServerKeyMismatch(mismatch.message + " [" + "; ".join(errors) + "]")
        # Every server asked us to come back later: busy, or their one reason (their database is down).
        code = (codes.pop() if len(codes) == 1 else "busy") if hints and len(hints) == len(errors) else "unreachable"
        raise ConnectionLost(code, "no control server reachable: " + "; ".join(errors), min(hints, default=None))

    @classmethod
    async def _handshake(cls, stream, invite, private_key, name, candidates, random_bytes):
        sk = clamp(private_key)
        ini = Initiator(sk, invite.server_key, random_bytes)
        await stream.send_all(P.frame(P.HELLO_MAGIC + ini.write_message1(P.pack({"type": "hello", "v": P.PROTO_VERSION}))))
        dec = P.FrameDecoder(1024)
        frames: list[bytes] = []
        while not frames:
            data = await stream.receive_some(4096)
            if not data:
                # Proves nothing about the key: a proxy whose backend is down, an overloaded server, a
                # middlebox. Only a message 2 that fails authentication shows a wrong key.
                raise ConnectionLost("closed_early", "server closed the connection before answering the handshake")
            frames = dec.feed_untrusted(data)
            if dec.error:
                raise ConnectionLost("malformed", "malformed handshake response")
        if frames[0] == P.KEY_REFUSED:
            raise ServerKeyMismatch("server could not open the handshake: it does not hold the key pinned in the "
                                    "invite (wrong server, wrong database or a forged invite)")
        retry = P.busy_retry_untrusted(frames[0])
        if retry is not None:
            raise ConnectionLost("busy", f"server busy, retry in {retry} s", float(retry))
        try:
            ini.read_message2_untrusted(frames[0])
        except HandshakeError:
            raise ServerKeyMismatch("server failed to prove the key pinned in the invite "
                                    "(wrong server, wrong database or a forged invite)") from None
        chan = P.SecureChannel(ini.send, ini.recv, P.MAX_SERVER_FRAME)
        # Bytes after the handshake frame already belong to the transport phase.
        rest = dec._buf and bytes(dec._buf)
        # A registered node's client has dropped the invite's secret: it joins on its key alone.
        reg = {"type": P.T_REGISTER, "proto": P.PROTO_VERSION, "invite_id": invite.invite_id or None,
               "secret": invite.secret or None, "name": name, "candidates": [list(c) for c in candidates]}
        await stream.send_all(chan.encode(reg))
        pending: list = []
        if rest:
            pending.extend(chan.feed_untrusted(rest))
        while True:
            while pending:
                msg = pending.pop(0)
                if msg["type"] == P.T_ERROR:
                    if msg.get("code") in P.RETRYABLE_ERRORS:  # the server's trouble, not a refusal of this node
                        raise ConnectionLost(str(msg["code"]), str(msg.get("message")), _retry_untrusted(msg))
                    raise JoinRefusedError(str(msg.get("code")), str(msg.get("message")))
                if msg["type"] == P.T_WELCOME:
                    w = Welcome(
                        int(msg["node_id"]), str(msg["name"]), str(msg["ipv4"]), str(msg["ipv6"]),
                        str(msg.get("prefix4", "")), str(msg.get("prefix6", "")), _addr_list(msg.get("stun")),
                        _addr_list(msg.get("relay_udp")), _addr_list(msg.get("relay_tcp")),
                        float(msg.get("heartbeat", 10.0)), invite.server_key, tags_untrusted(msg.get("tags")),
                        dns_domain_untrusted(msg.get("dns_domain")),
                        relays_untrusted(msg.get("relays"), _addr_list), relay_cred_untrusted(msg.get("relay_cred")),
                    )
                    conn = cls(stream, chan, sk, w, pending)
                    conn.servers = P.servers_untrusted(msg.get("servers"))
                    return conn
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionLost("closed", "server closed the connection during registration")
            pending.extend(chan.feed_untrusted(data))
            if chan.error:
                raise ConnectionLost(chan.error, "bad frame from server during registration")

    # --- sending

    async def send(self, msg: dict) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.chan.encode(msg))

    async def heartbeat(self, seq: int = 0) -> None:
        await self.send({"type": P.T_HEARTBEAT, "seq": seq})

    async def report_candidates(self, candidates) -> None:
        """candidates: [(ip, port, kind)] - local addresses, STUN-reflexive ("stun"), port-mapped..."""
        await self.send({"type": P.T_CANDIDATES, "candidates": [list(c) for c in candidates]})

    async def request_punch(self, peer_key: bytes) -> None:
        await self.send({"type": P.T_PUNCH_REQUEST, "peer": peer_key})

    async def report_routes(self, routes, exit_node: bool) -> None:
        """Our whole advertisement of subnet routes (canonical CIDR texts) and exit node (the routes contract)."""
        await self.send({"type": P.T_ROUTES, "routes": list(routes), "exit_node": bool(exit_node)})

    async def send_sealed(self, peer_key: bytes, plaintext: bytes) -> None:
        await self.send({"type": P.T_SEAL_SEND, "to": peer_key, "blob": seal(self.private_key, peer_key, plaintext)})

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def leave(self, timeout: float = LEAVE_TIMEOUT) -> None:
        """`meshwg leave` on a connection nothing else reads: ask the server to remove us and wait for its GONE."""
        await self.send({"type": P.T_LEAVE})
        with trio.move_on_after(timeout):
            while True:
                for e in await self.receive_events():
                    if isinstance(e, Removed):
                        _check_left(e)
                        return
        raise _no_leave_answer(timeout)

    # --- receiving

    async def receive_events(self) -> list:
        """Wait for the next batch of server messages; returns events. Raises ConnectionLost / Removed via event."""
        while True:
            if self._pending:
                msgs, self._pending = self._pending, []
            else:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise ConnectionLost("broken", f"connection broke: {exc}") from None
                if not data:
                    raise ConnectionLost("closed", "server closed the connection")
                msgs = self.chan.feed_untrusted(data)
                if self.chan.error:
                    raise ConnectionLost(self.chan.error, "bad frame from server")
            self.last_rx = time.monotonic()
            events = []
            for m in msgs:
                events.extend(self._apply(m))
            if events:
                return events

    def _apply(self, m: dict) -> list:
        t = m["type"]
        if t == P.T_DIR_FULL:
            if m.get("first") or self._full is None:
                self._full = {}
            for raw in m.get("peers") or []:
                p = _peer_untrusted(raw)
                if p:
                    self._full[p.key] = p
            if m.get("last"):
                full, self._full = self._full, None
                return [DirectoryReset(full)]
            return []
        if t == P.T_DIR_UPDATE:
            out = []
            for raw in m.get("upsert") or []:
                p = _peer_untrusted(raw)
                if p:
                    out.append(PeerChanged(p))
                else:
                    self.drops += 1
            for key in m.get("remove") or []:
                if isinstance(key, bytes):  # an unknown key is the directory owner's to ignore
                    out.append(PeerRemoved(key))
            return out
        if t == P.T_PUNCH:
            p = _peer_untrusted(m.get("peer"))
            return [PunchNotice(p, str(m.get("role", "")))] if p else []
        if t == "punch_fail":
            return [PunchFailed(m.get("peer", b""), str(m.get("reason", "")))]
        if t == P.T_SEALED:
            sender, blob = m.get("from"), m.get("blob")
            if isinstance(sender, bytes) and isinstance(blob, bytes):
                plain = open_untrusted(self.private_key, sender, blob)
                if plain is not None:
                    return [SealedMessage(sender, plain)]
            self.drops += 1
            return []
        if t == P.T_SELF:
            ev = self_update_untrusted(m)
            if ev is None:
                self.drops += 1
                return []
            return [ev]
        if t == P.T_RELAY_CRED:
            cred = relay_cred_untrusted(m.get("cred"))
            if not cred:
                self.drops += 1
                return []
            return [RelayCredential(cred)]
        if t == P.T_GONE:
            return [Removed(str(m.get("reason", "removed")))]
        if t == P.T_ERROR:
            return [Removed(str(m.get("code", "error")))]
        return []  # heartbeat acks and unknown (newer) types


class ControlClient:
    """Reconnecting control client. Use: `welcome = await nursery.start(client.run)`, then read `client.events`.

    Heartbeats every welcome.heartbeat seconds; a server silent for 3 heartbeats counts as lost.
    Reconnects with jittered exponential backoff (honouring a server's BUSY hint) and resyncs (a fresh
    DirectoryReset); re-reports the last candidates. Failures are classified by `reconnect.classify`:
    run() returns on Removed and raises JoinRefusedError/ServerKeyMismatch only when they are fatal
    (a node never welcomed, or the administrator ended its membership); a `registered` node retries
    anything else, slowly when the server looks wrong, and says why in `last_error`.
    Once welcomed, the client forgets the invite's secret: a registered key needs none.
    """

    def __init__(self, invite: Invite, private_key: bytes, *, name: str | None = None, candidates=(),
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, suspect_retry: float = 60.0,
                 heartbeat: float | None = None, registered: bool = False, event_buffer: int = 4096,
                 random_bytes=os.urandom, jitter=random.random, clock=time.monotonic) -> None:
        self.invite = invite
        self.private_key = clamp(private_key)
        self.public_key = public_key(self.private_key)
        self.name = name
        self.candidates = list(candidates)
        self.backoff = R.Backoff(backoff_initial, backoff_max, suspect_retry)
        self.heartbeat_override = heartbeat
        self.registered = registered
        self._random = random_bytes
        self._jitter = jitter
        self.clock = clock  # what retry_at is read against (the agent passes its own)
        self._send_events, self.events = trio.open_memory_channel(event_buffer)
        self.conn: ControlConnection | None = None
        self.welcome: Welcome | None = None
        self.reconnects = 0
        self.failures = 0  # attempts that failed since the last welcome
        self.last_error: str | None = None
        self.last_error_kind: str | None = None
        self.retry_at: float | None = None  # clock() of the next attempt while waiting
        self.fwmark = 0  # SO_MARK of the control socket (set_fwmark)
        self._serving: tuple | None = None  # (cancel scope, result) of the connection being served
        self._leaving: trio.Event | None = None  # set when the server's GONE came after leave()
        self._lost: str | None = None  # the address whose connection ended last: tried last (reconnect.order_addrs)
        self.servers: tuple = ()  # the running servers the last welcome listed (several servers on one database)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                invite = dataclasses.replace(self.invite, addrs=R.order_addrs(self.control_addrs(), self._lost))
                conn = await ControlConnection.open(invite, self.private_key, name=self.name,
                                                    candidates=self.candidates, random_bytes=self._random,
                                                    fwmark=self.fwmark)
            except ControlError as exc:
                kind = R.classify(exc.code, authenticated_refusal=isinstance(exc, JoinRefusedError),
                                  registered=self.registered)
                if kind == R.FATAL:
                    raise
                await self._wait_retry(exc, kind)
                continue
            self.backoff.reset()
            self.failures, self.last_error, self.last_error_kind = 0, None, None
            self.registered = True
            if self.invite.secret:
                self.invite = dataclasses.replace(self.invite, invite_id="", secret=b"")
            self.conn, self.welcome = conn, conn.welcome
            if conn.servers:  # a server that lists none (one server, an older one) leaves what we learned
                self.servers = conn.servers
            await self._send_events.send(Connected(conn.welcome))
            if not started:
                started = True
                task_status.started(conn.welcome)
            reason = await self._serve(conn)
            self.conn = None
            self._lost = getattr(conn, "addr", None)
            await conn.aclose()
            if reason is None:  # removed/expired: stop for good
                return
            self.reconnects += 1
            await self._send_events.send(Disconnected(reason))
            if reason != NETWORK_CHANGED:  # our own network switch is no herd: reconnect at once
                await trio.sleep(self.backoff.initial * self._jitter())  # spread a herd of reconnects

    async def _wait_retry(self, exc: ControlError, kind: str) -> None:
        delay = self.backoff.delay(kind, self._jitter(), getattr(exc, "retry_after", None))
        self.failures += 1
        self.last_error, self.last_error_kind = str(exc), kind
        level = logging.WARNING if kind == R.SUSPECT or self.failures in (1, 10) else logging.INFO
        log.log(level, "control: %s; %sretrying in %.1f s", exc,
                "tunnels keep running; " if self.registered else "", delay)
        self.retry_at = self.clock() + delay
        try:
            await trio.sleep(delay)
        finally:
            self.retry_at = None

    async def _serve(self, conn: ControlConnection) -> str | None:
        hb = self.heartbeat_override or conn.welcome.heartbeat
        result: list = ["closed"]
        async with trio.open_nursery() as n:
            async def reader():
                try:
                    while True:
                        for ev in await conn.receive_events():
                            if isinstance(ev, Removed) and self._leaving is not None:
                                self._leaving.set()  # before the agent hears it and stops
                            await self._send_events.send(ev)
                            if isinstance(ev, Removed):
                                result[0] = None
                                n.cancel_scope.cancel()
                                return
                except ConnectionLost as exc:
                    result[0] = exc.code
                n.cancel_scope.cancel()

            async def heartbeater():
                seq = 0
                try:
                    while True:
                        await trio.sleep(hb)
                        if time.monotonic() - conn.last_rx > 3 * hb:
                            result[0] = "silent"
                            break
                        seq += 1
                        await conn.heartbeat(seq)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    result[0] = "broken"
                n.cancel_scope.cancel()

            n.start_soon(reader)
            n.start_soon(heartbeater)
            self._serving = (n.cancel_scope, result)
        self._serving = None
        return result[0]

    def control_addrs(self) -> tuple:
        """Where to connect: the invite's addresses, then the other running servers the last welcome named."""
        return R.merge_addrs(self.invite.addrs, self.servers)

    def local_ip(self) -> str | None:
        """The connection's own address (None while not connected)."""
        try:
            return self.conn.stream.socket.getsockname()[0] if self.conn is not None else None
        except (OSError, AttributeError):
            return None

    def network_changed(self) -> None:
        """The connection's own address went away (a network switch): end the connection now and reconnect at
        once, instead of hanging until the heartbeats time out (the new candidates wait for it)."""
        if self._serving is not None and self._serving[1][0] == "closed":   # not already ending (a removal)
            scope, result = self._serving
            result[0] = NETWORK_CHANGED
            scope.cancel()

    async def _send(self, fn, *args) -> bool:
        conn = self.conn
        if conn is None:
            return False
        try:
            await fn(conn, *args)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False

    async def report_candidates(self, candidates) -> bool:
        self.candidates = list(candidates)  # re-reported at every reconnect
        return await self._send(ControlConnection.report_candidates, self.candidates)

    async def request_punch(self, peer_key: bytes) -> bool:
        return await self._send(ControlConnection.request_punch, peer_key)

    async def report_routes(self, routes, exit_node: bool) -> bool:
        return await self._send(ControlConnection.report_routes, routes, exit_node)

    @property
    def left(self) -> bool:
        """leave() was asked and the server's GONE came (run() returns: the node is no longer a member)."""
        return self._leaving is not None and self._leaving.is_set()

    async def leave(self, timeout: float = LEAVE_TIMEOUT) -> None:
        """Ask the server to remove this node (`meshwg leave`) and wait for its GONE, after which run() returns;
        ControlError (one line) when not connected, refused or unanswered."""
        conn = self.conn
        if conn is None:
            raise ConnectionLost("unreachable", "not connected to the server"
                                 + (f": {self.last_error}" if self.last_error else ""))
        self._leaving = trio.Event()
        try:
            await conn.send({"type": P.T_LEAVE})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost("broken", f"connection broke: {exc}") from None
        with trio.move_on_after(timeout):
            await self._leaving.wait()
            return
        raise _no_leave_answer(timeout)

    def set_fwmark(self, fwmark: int) -> None:
        """Mark the control socket from now on: the live connection's and every later one's."""
        self.fwmark = fwmark
        if self.conn is not None:
            set_stream_mark(self.conn.stream, fwmark)

    async def send_sealed(self, peer_key: bytes, plaintext: bytes) -> bool:
        return await self._send(ControlConnection.send_sealed, peer_key, plaintext)

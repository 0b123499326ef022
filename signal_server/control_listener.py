"""Trio shell of the control channel: TCP accept with connection caps, Noise IK handshake, registration
through the store, and per session a reader and a writer over the encrypted msgpack stream. What a message
means is control_core's (its effects are carried out by SignalServer.apply); this file moves bytes."""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import trio

from meshwg.config.keys import key_to_base64
from meshwg.signaling import protocol as P
from meshwg.signaling.invite import join_hostport
from meshwg.signaling.noise import HandshakeError, Responder
from signal_server import gc_policy
from signal_server.conn_limits import Refusal
from signal_server.invites import JoinRefused
from signal_server.ratelimit import TokenBucket
from signal_server.store_api import StoreError
from signal_server.stun_responder import WILDCARDS

log = logging.getLogger("signal")

QUEUE_MAX = 256  # control messages waiting for a node that does not read them: the oldest go first
FLUSH_SLICE = 512  # sessions the flusher serves between two checkpoints
DIRECT_MAX = 8  # directory messages the flusher writes to one session per window (the rest: its writer)


class Session:
    def __init__(self, key: bytes, node_id: int, stream, chan: P.SecureChannel) -> None:
        self.key = key
        self.node_id = node_id
        self.stream = stream
        self.chan = chan
        self.wake = trio.Event()
        self.queue: deque = deque()
        self.closing: str | None = None
        # Exists before the session's first await: a newer connection of the same key must be able to
        # end this one in any phase, also while its welcome or snapshot is still being sent.
        self.scope = trio.CancelScope()
        self.msg_bucket = TokenBucket(200.0, 400.0, time.monotonic())
        self.local_host = ""
        # The writer waits for a wake with nothing of its own to send: the flusher may then write the directory
        # update itself (ControlListener._send_now); what the socket did not take is `backlog`, the writer's next.
        self.idle = False
        self.backlog = b""

    def enqueue(self, msg: dict, counters) -> None:
        if len(self.queue) >= QUEUE_MAX:
            counters["control_queue_overflow"] += 1
            self.queue.popleft()
        self.queue.append(msg)
        self.wake.set()

    def gone(self, reason: str) -> None:
        """The node left the mesh: it hears why, then the writer closes the session."""
        self.queue.append({"type": P.T_GONE, "reason": reason})
        self.closing = reason
        self.wake.set()


def send_nowait(stream, data: bytes) -> None:
    """Best-effort send of a few bytes that never waits on the peer (a refusal must cost us nothing)."""
    try:
        os.write(stream.socket.fileno(), data)  # trio keeps the socket non-blocking
    except OSError:
        pass


def advertised(addrs, host: str | None) -> list[str]:
    """host:port texts to hand out for bound addresses; a wildcard bind shows `host` instead (when set)."""
    return [join_hostport((host or h) if h in WILDCARDS else h, p) for h, p in addrs]


class ControlListener:
    """The control listener of `srv` (a SignalServer: config, store, core, sessions, counters, limits)."""

    def __init__(self, srv) -> None:
        self.srv = srv
        self.cfg = srv.cfg
        self.counters = srv.counters
        self.sessions: dict[bytes, Session] = srv.sessions
        self._dir_changed = trio.Event()
        self.gc = gc_policy.policy()

    async def listen(self, nursery, host: str, port: int) -> list:
        ls = await trio.open_tcp_listeners(port, host=host)
        nursery.start_soon(trio.serve_listeners, self.handle, ls)
        return [l.socket.getsockname()[:2] for l in ls]

    def wake_all(self) -> None:
        """The directory changed: the flusher will push it (coalesced) to every subscriber."""
        self._dir_changed.set()

    # --- accept and authenticate

    async def handle(self, stream) -> None:
        srv = self.srv
        self.counters["control_connections"] += 1
        try:
            peer_ip = stream.socket.getpeername()[0]
            local_host = stream.socket.getsockname()[0]
        except OSError:
            await stream.aclose()
            return
        now = time.monotonic()
        # Charged at accept, before any work: caps per source and in all, an accept rate per source, and
        # the failure budget of the source.
        if srv.failures.exhausted(peer_ip, now):
            refusal = Refusal("failures", 1)
        else:
            refusal = srv.control_limits.admit(peer_ip, now)
        if refusal is not None:
            self._refuse_busy(stream, refusal)
            await stream.aclose()
            return
        session = None
        try:
            try:
                session = await self._authenticate(stream, peer_ip, trio.current_time() + self.cfg.handshake_timeout)
            except trio.TooSlowError:
                self.counters["control_handshake_timeout"] += 1
                srv._failed(peer_ip, time.monotonic())
            finally:
                srv.control_limits.release(peer_ip)
            if session is not None:
                session.local_host = local_host
                await srv.note_local_address(local_host)  # no approved route may contain it
                await self.run_session(session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
            self.counters["control_io_errors"] += 1
        except Exception:  # a bug in one connection's handling must not take the server down
            srv.log_repeat.log(log, logging.ERROR, "control_internal", time.monotonic(),
                               "control connection failed", exc_info=True)
            self.counters["control_internal_errors"] += 1
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _refuse_busy(self, stream, refusal: Refusal) -> None:
        """Counts the refusal; tells the client when to retry where that costs nothing (no waiting on it)."""
        self.counters["control_refused_busy"] += 1  # every refusal; the reason in its own counter
        self.counters[f"control_refused_{refusal.reason}"] += 1
        send_nowait(stream, P.busy_frame(refusal.retry_after))

    async def _read_frames(self, stream, decoder: P.FrameDecoder) -> bytes | None:
        """The one frame the client sends first; None for junk, b"" for a close before any byte."""
        silent = True
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return b"" if silent else None
            silent = False
            frames = decoder.feed_untrusted(data)
            if decoder.error:
                return None
            if frames:
                if len(frames) > 1 or decoder.buffered:
                    return None  # the client must wait for our answer; pipelining here is junk
                return frames[0]

    async def _authenticate(self, stream, peer_ip: str, deadline: float) -> Session | None:
        """Handshake + register. The deadline bounds the client's part only, not our DB queue under load."""
        srv = self.srv
        now = time.monotonic()
        dec = P.FrameDecoder(512)
        # The HELLO comes at once from a real node; a connection that holds its slot in silence is let go
        # early (the handshake and the registration keep the whole deadline).
        with trio.move_on_at(min(deadline, trio.current_time() + self.cfg.hello_timeout)) as first:
            body = await self._read_frames(stream, dec)
        if first.cancelled_caught:
            self.counters["control_hello_timeout"] += 1
            raise trio.TooSlowError
        if body == b"":
            # A health check, a port scan, a node's own aborted attempt: it cost us one accept, already
            # charged. Counted as a failure it would let one host behind a shared address (an office
            # NAT, a load balancer) lock every node there out.
            self.counters["control_closed_silent"] += 1
            return None
        if body is None or not body.startswith(P.HELLO_MAGIC):
            self.counters["control_bad_hello"] += 1
            srv._failed(peer_ip, now)
            return None
        responder = Responder(srv.server_sk, os.urandom)
        try:
            client_key, _ = responder.read_message1_untrusted(body[len(P.HELLO_MAGIC):])
        except HandshakeError:
            self.counters["control_handshake_failed"] += 1
            srv._failed(peer_ip, now)
            send_nowait(stream, P.key_refused_frame())  # "not my key": a hint for the node's operator
            return None
        with trio.fail_at(deadline):
            await stream.send_all(P.frame(responder.write_message2(P.pack({"type": "hello", "v": P.PROTO_VERSION}))))
        chan = P.SecureChannel(responder.send, responder.recv, P.MAX_CLIENT_FRAME)
        msg = await self._first_message(stream, chan, deadline, peer_ip, now)
        if msg is None:
            return None
        return await self._register(stream, chan, client_key, msg, peer_ip, now)

    async def _first_message(self, stream, chan, deadline: float, peer_ip: str, now: float) -> dict | None:
        """The first transport message, which must be a register."""
        msg = None
        while msg is None:
            with trio.fail_at(deadline):
                data = await stream.receive_some(65536)
            if not data:
                return None
            msgs = chan.feed_untrusted(data)
            if chan.error or (msgs and msgs[0].get("type") != P.T_REGISTER):
                self.counters["control_bad_register"] += 1
                self.srv._failed(peer_ip, now)
                return None
            msg = msgs[0] if msgs else None
        return msg

    async def _register(self, stream, chan, client_key: bytes, msg: dict, peer_ip: str, now: float) -> Session | None:
        srv = self.srv
        invite_id = msg.get("invite_id")
        secret = msg.get("secret")
        name = msg.get("name")
        if not (invite_id is None or isinstance(invite_id, str)) or not (secret is None or isinstance(secret, bytes)):
            invite_id = secret = None
        if not isinstance(name, str):
            name = None
        cands = P.candidates_untrusted(msg.get("candidates", []))
        try:
            row, created = await srv._db(
                srv.store.join, client_key, invite_id, secret, name, time.time(), srv.prefix4, srv.prefix6,
                srv.core.reserved_names(),
            )
        except JoinRefused as exc:
            self.counters[f"join_refused_{exc.code}"] += 1
            srv._failed(peer_ip, now)
            log.info("join refused for %s from %s: %s", key_to_base64(client_key), peer_ip, exc.message)
            with trio.move_on_after(self.cfg.send_timeout):
                await stream.send_all(chan.encode({"type": P.T_ERROR, "code": exc.code, "message": exc.message}))
            return None
        except StoreError as exc:  # the database is down or locked: no refusal of the node, which retries
            srv.db_failed("registering a node", exc)
            self.counters["join_db_unavailable"] += 1
            with trio.move_on_after(self.cfg.send_timeout):
                await stream.send_all(chan.encode({"type": P.T_ERROR, "code": P.E_DB_UNAVAILABLE, "retry_after": 2,
                                                   "message": "the server cannot reach its database; retry"}))
            return None
        self.counters["joins_new" if created else "joins_returning"] += 1
        if created:
            log.info("node %s joined as %s (%s, %s)", key_to_base64(client_key), row.name, row.ipv4, row.ipv6)
        else:
            log.info("node %s (%s) connected from %s", row.name, row.ipv4, peer_ip)
        s = Session(client_key, row.node_id, stream, chan)
        s.initial_candidates = srv.core.reported(cands or [])
        s.row = row
        return s

    def _welcome(self, s: Session) -> dict:
        srv = self.srv
        host = self.cfg.advertise or s.local_host  # a wildcard bind is reached where this client reached us
        udp = advertised(srv.bound.udp, host)
        row = s.row
        welcome = {
            "type": P.T_WELCOME, "proto": P.PROTO_VERSION, "node_id": row.node_id, "name": row.name,
            "ipv4": row.ipv4, "ipv6": row.ipv6, "prefix4": str(srv.prefix4), "prefix6": str(srv.prefix6),
            "stun": udp, "relay_udp": udp, "relay_tcp": advertised(srv.bound.relay_tcp, host),
            "heartbeat": self.cfg.heartbeat, "server_key": srv.server_pk,
        }
        welcome.update(srv.regions.welcome_fields(s.key, srv.server_pk, udp, welcome["relay_tcp"], time.time()))
        if row.tags:  # its own tags (issue 13), for `meshwg status`; older nodes ignore the field
            welcome["tags"] = list(row.tags)
        if self.cfg.dns_domain:  # names (issue 15); older nodes ignore the field
            welcome["dns_domain"] = self.cfg.dns_domain
        servers = srv.welcome_servers(s.local_host)  # several servers on one database; older nodes ignore it
        if servers:
            welcome["servers"] = servers
        return welcome

    # --- a registered session

    async def run_session(self, s: Session) -> None:
        srv = self.srv
        old = self.sessions.get(s.key)
        if old is not None:  # the newest connection of a key wins (a reconnect after a silent drop)
            old.closing = "replaced"
            # Also while the old one is still sending its welcome/snapshot: left running, it would later
            # subscribe (wiping this session's pending directory changes) and publish its stale
            # candidates over ours.
            old.scope.cancel()
        self.sessions[s.key] = s
        srv.apply(srv.core.session_started(s.key, s.row))
        try:
            with s.scope:
                with trio.fail_after(self.cfg.send_timeout):
                    await s.stream.send_all(s.chan.encode(self._welcome(s)))
                await self._send_dir_full(s, srv.directory.subscribe_bodies(s.key))
                srv.apply(srv.core.session_ready(s.key, s.initial_candidates))
                async with trio.open_nursery() as n:
                    n.start_soon(self._guard, self._reader, s, s.scope)
                    n.start_soon(self._guard, self._writer, s, s.scope)
        finally:
            if self.sessions.get(s.key) is s:  # a replaced session must not touch its successor's state
                del self.sessions[s.key]
                log.info("node %s (%s) disconnected%s", s.row.name, s.row.ipv4, f": {s.closing}" if s.closing else "")
                srv.apply(srv.core.session_ended(s.key))
                self.gc.session_ended()
                with trio.CancelScope(shield=True):
                    try:
                        await srv._db(srv.store.touch, s.key, time.time())
                    except Exception:
                        self.counters["db_errors"] += 1

    async def _send_dir_full(self, s: Session, bodies: list[bytes]) -> None:
        """The snapshot's T_DIR_FULL messages, packed already (shared by joiners: only encrypted here)."""
        for body in bodies:
            with trio.fail_after(self.cfg.send_timeout):
                await s.stream.send_all(s.chan.encode(P.Packed(body)))

    async def _guard(self, fn, s: Session, scope: trio.CancelScope) -> None:
        """One session's I/O failure ends that session only."""
        try:
            await fn(s, scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.counters["control_io_errors"] += 1
        scope.cancel()

    async def _reader(self, s: Session, scope: trio.CancelScope) -> None:
        core = self.srv.core
        while True:
            with trio.move_on_after(self.cfg.idle_timeout) as idle:
                data = await s.stream.receive_some(65536)
            if idle.cancelled_caught:
                self.counters["control_idle_timeout"] += 1
                break
            if not data:
                break
            msgs = s.chan.feed_untrusted(data)
            now = time.monotonic()
            for m in msgs:
                if not s.msg_bucket.take(now):
                    self.counters["control_closed_flood"] += 1
                    scope.cancel()
                    return
                self.srv.apply(core.on_message(s.key, m, now))
            if s.chan.error:
                self.counters[f"control_closed_{s.chan.error}"] += 1
                break
            if s.closing:
                return
        scope.cancel()

    def _coalesce_window(self) -> float:
        """Directory flush interval per session: grows with the mesh so total frames/s stay bounded
        (N sessions x 1/window), capped so an endpoint change still reaches everyone well within 1 s."""
        return min(self.cfg.coalesce_max, max(self.cfg.coalesce, len(self.sessions) * self.cfg.coalesce_per_node))

    async def flusher(self) -> None:
        """Wakes the writers of sessions with pending directory changes, at most once per window:
        one change goes out at once, a burst (1000 joins) merges into few frames per session."""
        directory = self.srv.directory
        while True:
            await self._dir_changed.wait()
            self._dir_changed = trio.Event()
            directory.seal()  # this window's changes: one segment, packed once for every session
            self.gc.tick(len(self.sessions))
            for i, sess in enumerate(list(self.sessions.values())):
                if directory.has_pending(sess.key) and not self._send_now(sess, directory):
                    sess.wake.set()
                if i % FLUSH_SLICE == FLUSH_SLICE - 1:
                    await trio.sleep(0)  # the readers (heartbeats, joins) between slices of a large mesh
            await trio.sleep(self._coalesce_window())

    def _send_now(self, s: Session, directory) -> bool:
        """Write an idle session's pending update to its socket here, without waking its writer task: at 10,000
        sessions a wake per session per window (an event, a task switch, a cancel scope, trio's send_all) cost
        the server more than encrypting and sending. True when all of it went out; False leaves the rest to the
        writer (what the socket did not take in `backlog`, sent before anything encoded after it, and what is
        pending beyond DIRECT_MAX messages)."""
        sock = getattr(s.stream, "socket", None)  # a real SocketStream (tests hand in stand-ins: the writer's)
        if sock is None or not s.idle or s.queue or s.closing or s.backlog:
            return False
        fd = sock.fileno()
        # A few messages here; more (a policy rewrite, a far-behind session) are built by the writer between its
        # sends, not by this loop for hundreds of sessions without a checkpoint.
        for _ in range(DIRECT_MAX):
            body = directory.take_pending_body(s.key, P.DIR_CHUNK)
            if body is None:
                return True
            data = s.chan.encode(P.Packed(body))
            try:
                n = os.write(fd, data)  # trio keeps the socket non-blocking
            except BlockingIOError:
                n = 0
            except OSError:
                n = 0  # the writer's send_all meets the error again and ends the session
            if n < len(data):
                s.backlog = data[n:]
                return False
            self.counters["control_frames_sent"] += 1
            self.counters["control_updates_direct"] += 1
        return not directory.has_pending(s.key, sealed=True)  # the open segment's: the next window's

    async def _writer(self, s: Session, scope: trio.CancelScope) -> None:
        directory = self.srv.directory
        while True:
            s.idle = True
            try:
                await s.wake.wait()
            finally:
                s.idle = False
            s.wake = trio.Event()
            # A pending directory update goes out one message at a time, each built just before it is sent: a
            # policy change that rewrites every entry holds one message per session in memory, not the whole
            # update, and the first sessions are served while the last are still to be built. Each send has
            # send_timeout (one scope, its deadline moved on per send).
            with trio.move_on_after(self.cfg.send_timeout) as deadline:
                while True:
                    out = []
                    if s.backlog:  # encoded (its nonce taken) before anything below: first on the wire
                        out.append(s.backlog)
                        s.backlog = b""
                    while s.queue:  # control messages (punch, sealed, acks, gone) go out at once
                        out.append(s.chan.encode(s.queue.popleft()))
                    if not s.closing:
                        body = directory.take_pending_body(s.key, P.DIR_CHUNK)
                        if body is not None:  # the same bytes for every session without a policy
                            out.append(s.chan.encode(P.Packed(body)))
                            del body  # not held while the send waits on the client
                    if not out:
                        break
                    deadline.deadline = trio.current_time() + self.cfg.send_timeout
                    await s.stream.send_all(out[0] if len(out) == 1 else b"".join(out))
                    self.counters["control_frames_sent"] += len(out)
                    if s.closing:
                        break
            if deadline.cancelled_caught:
                self.counters["control_closed_slow_client"] += 1
                scope.cancel()
                return
            if s.closing:
                scope.cancel()
                return

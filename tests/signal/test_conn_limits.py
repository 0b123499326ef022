"""Connection exhaustion of the signal server (issue 10, items 2 and 3): per-source and global caps charged at
accept, the HELLO deadlines, BUSY refusals, the relay TCP caps and the rate-limited log lines.

The pure accounting (signal_server/conn_limits.py, signal_server/lograte.py) first, then the real server on
loopback; a second source is another loopback address (127.0.0.2...), bound by the client socket."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections import deque

import pytest
import trio
from sig_helpers import new_key, start_server, wait_until

from meshwg.control import ControlConnection
from meshwg.signaling import protocol as P
from meshwg.signaling import relay_wire as W
from meshwg.control.relay_client import open_tcp_relay
from meshwg.wg.crypto import dh_pub
from signal_server import server as server_mod
from signal_server.conn_limits import SourceLimits, relay_tcp_caps, source_key
from signal_server.lograte import RepeatFilter, RepeatLimiter, install_repeat_filter

_open_tcp_stream = trio.open_tcp_stream  # the attackers' own, whatever the legitimate clients are patched to


# --- pure: source keys and limits


def test_source_key_groups_ipv6_by_64():
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2::5") == source_key("2001:db8:1:2:ffff:ffff:ffff:1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::5") != source_key("2001:db8:1:2::5")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"  # a dual-stack socket's view of an IPv4 peer
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("not an address") == "not an address"


def test_per_source_cap_and_release():
    lim = SourceLimits(total=100, per_source=3)
    assert [lim.admit("192.0.2.1", 0.0) for _ in range(3)] == [None] * 3
    refusal = lim.admit("192.0.2.1", 0.0)
    assert refusal is not None and refusal.reason == "per_source" and refusal.retry_after >= 1
    assert lim.admit("192.0.2.2", 0.0) is None  # another source is not affected
    lim.release("192.0.2.1")
    assert lim.admit("192.0.2.1", 0.0) is None and lim.held("192.0.2.1") == 3
    assert lim.active == 4


def test_ipv6_sources_share_their_64():
    lim = SourceLimits(total=100, per_source=2)
    assert lim.admit("2001:db8:0:1::1", 0.0) is None
    assert lim.admit("2001:db8:0:1::2", 0.0) is None
    assert lim.admit("2001:db8:0:1:dead:beef::9", 0.0).reason == "per_source"  # same /64, new address
    assert lim.admit("2001:db8:0:2::1", 0.0) is None  # the next /64
    lim.release("2001:db8:0:1::2")  # any address of the /64 gives its slot back
    assert lim.admit("2001:db8:0:1:dead:beef::9", 0.0) is None


def test_global_cap():
    lim = SourceLimits(total=3, per_source=2)
    for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        assert lim.admit(ip, 0.0) is None
    assert lim.admit("192.0.2.3", 0.0).reason == "global"
    lim.release("192.0.2.2")
    assert lim.admit("192.0.2.3", 0.0) is None


def test_accept_rate_is_charged_at_accept():
    """Connections that come and go at once still spend the source's budget; refused attempts too."""
    lim = SourceLimits(total=100, per_source=100, rate=1.0, burst=3.0)
    for _ in range(3):
        assert lim.admit("192.0.2.1", 10.0) is None
        lim.release("192.0.2.1")
    refusal = lim.admit("192.0.2.1", 10.0)
    assert refusal is not None and refusal.reason == "rate" and refusal.retry_after >= 1
    assert lim.admit("192.0.2.2", 10.0) is None  # per source
    assert lim.admit("192.0.2.1", 11.0) is None  # one token a second
    for t in (11.2, 11.4, 11.6, 11.8):  # hammering keeps it refused: 0.2 s never refills a whole token
        assert lim.admit("192.0.2.1", t) is not None
    assert lim.active == 2 and lim.held("192.0.2.1") == 1


def test_release_of_unknown_source_is_harmless():
    lim = SourceLimits(total=2, per_source=2)
    lim.release("192.0.2.9")
    lim.release("192.0.2.9")
    assert lim.active == 0 and lim.sources == 0
    assert lim.admit("192.0.2.1", 0.0) is None and lim.admit("192.0.2.1", 0.0) is None
    assert lim.active == 2


def test_relay_caps_from_the_descriptor_limit():
    assert relay_tcp_caps(1024, 0.25) == (256, 64)  # a floor of 64 per source: a UDP-blocked office
    assert relay_tcp_caps(8192, 0.25) == (2048, 256)
    assert relay_tcp_caps(1024, 0.25, total=100) == (100, 64)
    assert relay_tcp_caps(1024, 0.25, per_source=500) == (256, 256)  # never above the total
    assert relay_tcp_caps(64, 0.25) == (16, 16)
    assert relay_tcp_caps(-1, 0.5) == (1 << 19, 4096)  # RLIM_INFINITY: a bounded budget all the same
    assert relay_tcp_caps(1 << 20, 0.25) == (1 << 18, 4096)  # a huge hard limit: one address still holds 4,096 at most


# --- pure: repeated log lines


def test_repeat_limiter_first_then_once_per_interval():
    rl = RepeatLimiter(30.0)
    assert rl.check("emfile", 0.0) == 0
    assert [rl.check("emfile", t) for t in (0.1, 5.0, 29.9)] == [None, None, None]
    assert rl.check("other", 1.0) == 0  # keys are independent
    assert rl.check("emfile", 30.0) == 3  # passes again, with the count held back
    assert rl.check("emfile", 31.0) is None
    assert rl.check("emfile", 61.0) == 1


def test_repeat_limiter_is_bounded():
    rl = RepeatLimiter(30.0, max_keys=10)
    for i in range(1000):
        rl.check(i, 0.0)
    assert len(rl._last) == 10


def test_repeat_filter_on_a_logger():
    clock = [0.0]
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test_conn_limits.repeat")
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(RepeatFilter(10.0, clock=lambda: clock[0]))
    try:
        for i in range(50):
            clock[0] = i * 0.1
            logger.error("accept returned %s (%s)", "EMFILE", "Too many open files")
        clock[0] = 10.0
        logger.error("accept returned %s (%s)", "EMFILE", "Too many open files")
    finally:
        logger.removeHandler(handler)
    assert records == ["accept returned EMFILE (Too many open files)",
                       "accept returned EMFILE (Too many open files) (49 similar suppressed in the last 10 s)"]


class _EmfileListener(trio.abc.Listener):
    """A listener whose accept() fails as it does when the process is out of descriptors."""

    async def accept(self):
        await trio.sleep(0)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def aclose(self):
        pass


async def test_trio_accept_errors_are_rate_limited_by_the_server(nursery, tmp_path, caplog):
    """trio.serve_listeners logs a traceback per failed accept (every 0.1 s); the server limits that logger."""
    h = await start_server(nursery, tmp_path)
    try:
        caplog.set_level(logging.ERROR, logger="trio.serve_listeners")
        with trio.move_on_after(0.55):
            await trio.serve_listeners(lambda stream: None, [_EmfileListener()])
        accept_errors = [r for r in caplog.records if r.name == "trio.serve_listeners"]
        assert len(accept_errors) == 1  # of ~6 failed accepts
    finally:
        h.admin.close()
        logger = logging.getLogger("trio.serve_listeners")
        for f in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
            logger.removeFilter(f)


def test_install_repeat_filter_is_idempotent():
    name = "test_conn_limits.install"
    f = install_repeat_filter(name, 5.0)
    assert install_repeat_filter(name, 5.0) is f
    assert len(logging.getLogger(name).filters) == 1
    logging.getLogger(name).removeFilter(f)


# --- the real server: helpers


@contextlib.contextmanager
def clients_from(src: str):
    """Legitimate clients (ControlConnection.open, open_tcp_relay) connect from the loopback address src."""
    trio.open_tcp_stream = functools.partial(_open_tcp_stream, local_address=src)
    try:
        yield
    finally:
        trio.open_tcp_stream = _open_tcp_stream


async def tcp_from(src: str, addr):
    return await _open_tcp_stream(*addr, local_address=src)


async def read_to_eof(stream, limit: int = 1 << 16) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close)."""
    out = b""
    try:
        while len(out) < limit:
            data = await stream.receive_some(4096)
            if not data:
                break
            out += data
    except (trio.BrokenResourceError, OSError):
        pass
    return out


def busy_retry(data: bytes) -> int | None:
    frames = P.FrameDecoder(1024).feed_untrusted(data)
    return P.busy_retry_untrusted(frames[0]) if len(frames) == 1 else None


# --- the real server: control listener


async def test_one_source_cannot_starve_legitimate_joins(nursery, tmp_path):
    """An attacker's host opens ~100 idle connections a second to 7300 and keeps up to 40 open (the issue:
    one unauthenticated host held every slot and 26 of 28 reconnects were refused). Nodes from other
    addresses still join, every time."""
    h = await start_server(nursery, tmp_path, max_unauthenticated=8, max_unauthenticated_per_source=2)
    held: deque = deque()

    async def attacker():
        while True:
            try:
                held.append(await tcp_from("127.0.0.1", h.control))
            except OSError:
                pass
            while len(held) > 40:
                await held.popleft().aclose()
            await trio.sleep(0.01)

    async with trio.open_nursery() as attack:
        attack.start_soon(attacker)
        await wait_until(lambda: h.server.counters["control_connections"] >= 30)
        for i, src in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.2")):
            with trio.fail_after(5), clients_from(src):
                conn = await ControlConnection.open(h.invite(), new_key(), timeout=4.0)
            assert conn.welcome.node_id == i + 1
            await conn.aclose()
        attack.cancel_scope.cancel()
    c = h.server.counters
    assert h.server.gauges()["unauthenticated_connections"] <= 2
    assert c["control_refused_per_source"] + c["control_refused_rate"] >= 10
    for s in held:
        await s.aclose()
    h.admin.close()


async def test_per_source_cap_answers_busy(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, max_unauthenticated_per_source=3)
    idle = [await tcp_from("127.0.0.1", h.control) for _ in range(3)]
    await wait_until(lambda: h.server.gauges()["unauthenticated_connections"] == 3)
    extra = await tcp_from("127.0.0.1", h.control)
    with trio.fail_after(1):
        retry = busy_retry(await read_to_eof(extra))
    assert retry is not None and 1 <= retry <= 60
    c = h.server.counters
    assert c["control_refused_per_source"] == 1 and c["control_refused_busy"] == 1
    # a node that sends its HELLO at once reads the same answer (not a reset, not a wrong key)
    s = await tcp_from("127.0.0.1", h.control)
    from meshwg.signaling.noise import Initiator

    await s.send_all(P.frame(P.HELLO_MAGIC + Initiator(new_key(), h.server.server_pk, os.urandom).write_message1(b"")))
    with trio.fail_after(1):
        assert busy_retry(await read_to_eof(s)) is not None
    # another source still gets in
    with trio.fail_after(5), clients_from("127.0.0.2"):
        conn = await ControlConnection.open(h.invite(), new_key())
    await conn.aclose()
    for s in idle:
        await s.aclose()
    h.admin.close()


async def test_global_cap_and_accept_rate_answer_busy(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, max_unauthenticated=3, max_unauthenticated_per_source=2,
                           accept_rate=0.1, accept_burst=4.0)
    idle = [await tcp_from(src, h.control) for src in ("127.0.0.1", "127.0.0.1", "127.0.0.2")]
    await wait_until(lambda: h.server.gauges()["unauthenticated_connections"] == 3)
    s = await tcp_from("127.0.0.3", h.control)  # a fresh source, but no slot left in all
    with trio.fail_after(1):
        assert busy_retry(await read_to_eof(s)) is not None
    assert h.server.counters["control_refused_global"] == 1
    for s in idle:
        await s.aclose()
    await wait_until(lambda: h.server.gauges()["unauthenticated_connections"] == 0)
    # 127.0.0.1 spent 2 of its 4 tokens; connections closed at once still cost one each at accept
    for _ in range(2):
        s = await tcp_from("127.0.0.1", h.control)
        await s.aclose()
    await wait_until(lambda: h.server.counters["control_connections"] >= 6)
    s = await tcp_from("127.0.0.1", h.control)
    with trio.fail_after(1):
        assert busy_retry(await read_to_eof(s)) == 10  # a token every 10 s
    assert h.server.counters["control_refused_rate"] == 1
    h.admin.close()


async def test_silent_connection_closed_after_the_hello_deadline(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, hello_timeout=0.5, handshake_timeout=5.0)
    s = await tcp_from("127.0.0.1", h.control)
    t0 = trio.current_time()
    with trio.fail_after(2):
        assert await read_to_eof(s) == b""
    assert 0.4 <= trio.current_time() - t0 <= 1.5
    c = h.server.counters
    assert c["control_hello_timeout"] == 1 and c["control_handshake_timeout"] == 1
    # a real node is not hurried by it: its HELLO comes at once
    conn = await ControlConnection.open(h.invite(), new_key())
    await conn.aclose()
    h.admin.close()


# --- the real server: relay TCP listener


async def relay_ping(a, b, pub_b, pub_a):
    await a.send(pub_b, b"ping")
    with trio.fail_after(2):
        assert await b.receive() == (pub_a, b"ping")


async def test_relay_tcp_caps_and_hello_deadline(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, relay_tcp_max_per_source=3, relay_hello_timeout=1.0)
    pk = h.server.server_pk
    ska, skb = new_key(), new_key()
    for sk in (ska, skb):
        await (await ControlConnection.open(h.invite(), sk)).aclose()
    idle = [await tcp_from("127.0.0.1", h.relay_tcp) for _ in range(3)]
    t0 = trio.current_time()
    await wait_until(lambda: h.server.gauges()["relay_tcp_connections"] == 3)
    extra = await tcp_from("127.0.0.1", h.relay_tcp)
    with trio.fail_after(0.5):  # at once, not at the HELLO deadline
        assert await read_to_eof(extra) == b""
    assert h.server.counters["relay_tcp_refused_per_source"] == 1
    # nodes from other sources get their relay meanwhile
    with trio.fail_after(3):
        with clients_from("127.0.0.2"):
            a = await open_tcp_relay(*h.relay_tcp, ska, pk, os.urandom)
        with clients_from("127.0.0.3"):
            b = await open_tcp_relay(*h.relay_tcp, skb, pk, os.urandom)
    # the idle ones are closed at the deadline
    for s in idle:
        with trio.fail_after(2.5):
            assert await read_to_eof(s) == b""
    assert trio.current_time() - t0 <= 2.5
    assert h.server.counters["relay_tcp_hello_timeout"] == 3
    # the nodes, which said HELLO, outlive the deadline
    await trio.sleep(1.2)
    await relay_ping(a, b, dh_pub(skb), dh_pub(ska))
    await relay_ping(b, a, dh_pub(ska), dh_pub(skb))
    await wait_until(lambda: h.server.gauges()["relay_tcp_connections"] == 2)
    await a.aclose()
    await b.aclose()
    h.admin.close()


async def test_relay_tcp_global_cap_and_no_hello_first(nursery, tmp_path):
    h = await start_server(nursery, tmp_path, relay_tcp_max=2, relay_hello_timeout=5.0)
    idle = [await tcp_from(src, h.relay_tcp) for src in ("127.0.0.1", "127.0.0.2")]
    await wait_until(lambda: h.server.gauges()["relay_tcp_connections"] == 2)
    s = await tcp_from("127.0.0.3", h.relay_tcp)
    with trio.fail_after(0.5):
        assert await read_to_eof(s) == b""
    assert h.server.counters["relay_tcp_refused_global"] == 1
    # a connection whose first frame is not a HELLO is closed at once (not at the 5 s deadline)
    junk = idle[0]
    await junk.send_all(W.tcp_frame(W.encode_send(os.urandom(8), os.urandom(32), b"x" * 100)))
    with trio.fail_after(1):
        assert await read_to_eof(junk) == b""
    # and one that sends bytes but never a whole frame, once past a few KB
    await idle[1].send_all(b"\xff\xff" + b"\x00" * 5000)
    with trio.fail_after(1):
        assert await read_to_eof(idle[1]) == b""
    assert h.server.counters["relay_tcp_no_hello"] == 2
    await wait_until(lambda: h.server.gauges()["relay_tcp_connections"] == 0)
    h.admin.close()


async def test_relay_tcp_caps_follow_the_descriptor_limit(nursery, tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod.resource, "getrlimit", lambda which: (400, 4096))
    h = await start_server(nursery, tmp_path)
    assert (h.server.relay_limits.total, h.server.relay_limits.per_source) == (100, 64)
    assert h.server.gauges()["relay_tcp_connections_max"] == 100
    h.admin.close()

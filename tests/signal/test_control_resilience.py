"""A node never gives up because the control plane misbehaves (issue 10, finding 1).

A close or reset before the server's handshake message (a proxy whose backend is down, an overloaded
server, a flood of empty connections) is transient; a BUSY answer is a retry hint; only a message 2 that
fails authentication shows a wrong key, and even that a registered node survives, retrying slowly.
"""

from __future__ import annotations

import time

import pytest
import trio
from sig_helpers import harness, new_key, start_server, wait_until, start_task  # noqa: F401 (fixture)

from meshwg.control import ControlClient, ControlConnection, JoinRefusedError, ServerKeyMismatch
from meshwg.control import client as ev
from meshwg.signaling import protocol as P
from meshwg.control import reconnect as R
from meshwg.control.client import ConnectionLost
from meshwg.signaling.invite import Invite, join_hostport


class Proxy:
    """A TCP front for the control port, like a load balancer: `forward`, or `close` each new connection
    at once (its backend is down), or answer it with a BUSY frame (`busy`) or a forged message 2."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.mode = "forward"
        self.accepted = 0
        self.addr = None
        self._live: list = []

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.addr = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as n:
            task_status.started(self.addr)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=n)

    def cut(self) -> None:
        """The backend goes away: established connections close too."""
        for scope in self._live:
            scope.cancel()

    async def _handle(self, client) -> None:
        self.accepted += 1
        if self.mode == "close":
            await client.aclose()
            return
        if self.mode in ("busy", "forged"):
            # forged: a message 2 of the right size that no holder of the pinned key wrote
            await client.send_all(P.busy_frame(3) if self.mode == "busy" else P.frame(bytes(range(64)) + b"\x01" * 16))
            await client.aclose()
            return
        backend = await trio.open_tcp_stream(*self.backend)
        with trio.CancelScope() as scope:
            self._live.append(scope)

            async def pump(src, dst):
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
                scope.cancel()

            try:
                async with trio.open_nursery() as n:
                    n.start_soon(pump, client, backend)
                    n.start_soon(pump, backend, client)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        self._live.remove(scope)
        for s in (client, backend):
            with trio.CancelScope(shield=True):
                await s.aclose()


def _via(inv: Invite, addr) -> Invite:
    return Invite((join_hostport(*addr),), inv.server_key, inv.invite_id, inv.secret)


async def _refused_via(harness, nursery, mode: str) -> ConnectionLost:
    """What ControlConnection.open raises through a Proxy in `mode`."""
    proxy = Proxy(harness.control)
    await start_task(nursery, proxy.run)
    proxy.mode = mode
    with trio.fail_after(5):
        with pytest.raises(ConnectionLost) as info:
            await ControlConnection.open(_via(harness.invite(), proxy.addr), new_key())
    return info.value


async def test_close_before_the_server_answers_is_transient_not_a_wrong_key(harness, nursery):
    err = await _refused_via(harness, nursery, "close")
    assert not isinstance(err, ServerKeyMismatch)
    assert err.code == "unreachable" and "closed the connection before answering" in str(err)


async def test_busy_frame_is_a_retry_hint(harness, nursery):
    err = await _refused_via(harness, nursery, "busy")
    assert err.code == "busy" and err.retry_after == 3.0


async def test_registered_client_rides_out_a_dead_backend_and_comes_back(harness, nursery):
    """Nodes behind a proxy whose backend goes down keep retrying (the old client raised
    ServerKeyMismatch on the first early close and the agent quit, removing its interface)."""
    proxy = Proxy(harness.control)
    await start_task(nursery, proxy.run)
    client = ControlClient(_via(harness.invite(), proxy.addr), new_key(), backoff_initial=0.05, backoff_max=0.2)
    with trio.fail_after(5):
        await start_task(nursery, client.run)
    assert client.invite.secret == b"" and client.invite.invite_id == ""  # dropped once registered
    proxy.mode = "close"
    proxy.cut()
    with trio.fail_after(10):
        await wait_until(lambda: client.failures >= 5, timeout=10)
    assert client.conn is None and client.last_error_kind == R.TRANSIENT
    assert "before answering" in client.last_error
    proxy.mode = "forward"
    await wait_until(lambda: client.conn is not None, timeout=5)
    assert client.failures == 0 and client.last_error is None
    got = []
    while True:
        try:
            got.append(client.events.receive_nowait())
        except trio.WouldBlock:
            break
    assert sum(isinstance(e, ev.Connected) for e in got) == 2  # the first welcome and the rejoin, on the key alone


async def _fatal_first_then_retried(nursery, inv: Invite, first_error: str, retried_error: str) -> None:
    """A wrong server key stops a first join (with `first_error`); a node admitted before keeps
    retrying, slowly, and reports `retried_error`."""
    with trio.fail_after(5):
        with pytest.raises(ServerKeyMismatch, match=first_error):
            await ControlClient(inv, new_key(), backoff_initial=0.05).run()
    client = ControlClient(inv, new_key(), backoff_initial=0.05, suspect_retry=0.1, registered=True)
    nursery.start_soon(client.run)
    await wait_until(lambda: client.failures >= 3, timeout=5)
    assert client.last_error_kind == R.SUSPECT and retried_error in client.last_error


async def test_a_server_without_the_pinned_key_is_retried_not_obeyed(harness, nursery, tmp_path):
    """A server started on the wrong database cannot open message 1, says so and closes: a registered
    node retries slowly (and says why) instead of quitting, whose interface and tunnels would go with it;
    a first join stops with the reason."""
    inv = harness.invite(reusable=True)
    (tmp_path / "other").mkdir()
    other = await start_server(nursery, tmp_path / "other")  # another identity on another port
    wrong = Invite((join_hostport(*other.control),), inv.server_key, inv.invite_id, inv.secret)
    await _fatal_first_then_retried(nursery, wrong, "does not hold the key pinned", "wrong database")


async def test_a_message_2_that_fails_authentication_is_fatal_only_for_a_first_join(harness, nursery):
    proxy = Proxy(harness.control)
    await start_task(nursery, proxy.run)
    proxy.mode = "forged"
    await _fatal_first_then_retried(nursery, _via(harness.invite(reusable=True), proxy.addr), "pinned", "pinned")


def test_classify_failures():
    c = R.classify
    assert c("closed_early", authenticated_refusal=False, registered=True) == R.TRANSIENT
    assert c("busy", authenticated_refusal=False, registered=False) == R.TRANSIENT
    assert c(R.SERVER_KEY_MISMATCH, authenticated_refusal=False, registered=True) == R.SUSPECT
    assert c(R.SERVER_KEY_MISMATCH, authenticated_refusal=False, registered=False) == R.FATAL
    assert c("not_registered", authenticated_refusal=True, registered=True) == R.SUSPECT  # a server that lost its data
    assert c("invite_invalid", authenticated_refusal=True, registered=False) == R.FATAL
    for code in ("key_removed", "node_expired"):
        assert c(code, authenticated_refusal=True, registered=True) == R.FATAL


def test_backoff_grows_caps_and_honours_a_busy_hint():
    b = R.Backoff(initial=0.5, maximum=4.0, suspect=60.0)
    delays = [b.delay(R.TRANSIENT, 0.5) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # jitter 0.5 -> factor 1.0
    assert b.delay(R.SUSPECT, 0.5) == 60.0
    assert b.delay(R.TRANSIENT, 0.0, hint=30.0) == pytest.approx(24.0)  # -20% jitter on the hint
    assert b.delay(R.TRANSIENT, 0.5, hint=100000.0) == 120.0  # a hint cannot park a node for hours
    b.reset()
    assert b.delay(R.TRANSIENT, 0.5) == 0.5


async def test_a_node_removed_while_offline_stops_when_it_returns(harness, nursery):
    """A registered node rejoins on its key alone (it forgot the invite's secret); removed while it
    was away, it must still hear key_removed and stop, not retry a 'not registered' forever."""
    key = new_key()
    client = ControlClient(harness.invite(), key, backoff_initial=0.05)
    with trio.fail_after(5):
        await start_task(nursery, client.run)
    row = harness.admin.get_node(client.public_key)
    harness.server.sessions[client.public_key].scope.cancel()  # the node drops off...
    harness.admin.remove(row.node_id, time.time())  # ...and is removed before its GONE could reach it
    returning = ControlClient(client.invite, key, backoff_initial=0.05, registered=True)
    assert returning.invite.secret == b""
    with trio.fail_after(5):
        with pytest.raises(JoinRefusedError) as info:
            await returning.run()
    assert info.value.code == "key_removed"


async def test_empty_connections_do_not_lock_out_nodes_behind_the_same_address(nursery, tmp_path):
    """Health checks and port scans (connect, close, no byte) from a shared address (an office NAT, a
    load balancer) are not failed joins: 40 of them, past the failure budget's burst of 20, leave a
    node at that address able to join. (Accepts are limited on their own; lifted here.)"""
    h = await start_server(nursery, tmp_path, accept_rate=1000.0, accept_burst=1000.0)
    for _ in range(40):
        s = await trio.open_tcp_stream(*h.control)
        await s.aclose()
    await wait_until(lambda: h.server.counters["control_closed_silent"] == 40, timeout=5)
    with trio.fail_after(5):
        conn = await ControlConnection.open(h.invite(), new_key())
    await conn.aclose()
    h.admin.close()

"""The UDP relay's compiled forwarder (meshwg/io/dataplane/_fastio.c, relay_*): the shell's side of it.

RelayCore announces confirmed UDP sessions and their ends (RelayCore.fast_updates); FastRelay pushes them into
the C table with the socket and address each is bound to, keeps the table's limits equal to the core's, and
folds the table's counters into the core's. A worker thread per socket (relay_worker_*) drains it (recvmmsg)
with no GIL and no trio in the way, forwards the SENDs of sessions the table holds (sendmmsg, GSO) and queues
every other datagram for RelayCore, which the shell takes when the worker's eventfd wakes it. Since that thread
forwards on its own, the table follows the core the moment the core changes: session updates are applied as
the core makes them, limit changes as they are set (RelayCore.limits_changed). This file moves bytes and state
between the two; the decisions stay in relay.py."""

from __future__ import annotations

from meshwg.io.dataplane.fastio import fastio

MAX_SESSIONS = 65_536  # sessions beyond it stay on the Python path (slower, same answers)
COUNTER_NAMES = ("forwarded_packets", "forwarded_bytes", "drop_relay_node_limit", "drop_relay_total_limit",
                 "relay_send_errors", "relay_send_would_block")
# relay_tcp_counters: frames the TCP worker forwarded from TCP connections, RECVs the compiled path wrote (or
# buffered) to TCP connections, those dropped on a full outbound buffer (as the Python writer's full queue),
# frames it left for RelayCore, writes that failed.
TCP_COUNTER_NAMES = ("relay_tcp_fast_in", "relay_tcp_fast_out", "relay_tcp_queue_full", "relay_tcp_to_python",
                     "relay_tcp_send_errors")


def available() -> bool:
    return fastio is not None and hasattr(fastio, "relay_worker_start")


class _Applied(list):
    """RelayCore.fast_updates that applies each update as the core appends it. It stays empty, so the core's
    pop_fast_updates finds nothing and keeps it."""

    def __init__(self, apply) -> None:
        super().__init__()
        self._apply = apply

    def append(self, update) -> None:
        self._apply(*update)


class Worker:
    """One socket's forwarding thread; `fd` is readable when datagrams wait for Python."""

    def __init__(self, table, sock) -> None:
        self.sock = sock
        self.capsule = fastio.relay_worker_start(table, sock.fileno())
        self.fd = fastio.relay_worker_fd(self.capsule)

    def stop(self) -> None:
        fastio.relay_worker_stop(self.capsule)


class FastRelay:
    def __init__(self, relay, socks: list, sources: dict, sticky: set) -> None:
        self.relay = relay
        self.socks = socks  # the shell's main sockets: session dests (idx, addr) index these
        self.sources = sources
        self.sticky = sticky
        self.table = fastio.relay_new(MAX_SESSIONS)
        self.workers: list[Worker] = []
        self.tcp = None  # the TCP relay's worker (start_tcp), when there is a TCP listener
        self._limits = None
        self._sync_limits()
        relay.fast_updates = _Applied(self._apply)
        relay.limits_changed = self._sync_limits
        relay.node_charge = self.charge  # one per-node budget for both paths (it lives in the table)
        relay.total_charge = self.charge_total  # and one total budget

    def _sync_limits(self) -> None:
        limits = self.relay.limits()
        if limits != self._limits:
            fastio.relay_limits(self.table, *map(float, limits))
            self._limits = limits

    def charge(self, key: bytes, size: int) -> bool:
        """RelayCore's per-node check for what it forwards itself (TCP, plain and table-less destinations)."""
        return fastio.relay_charge(self.table, key, float(size))

    def charge_total(self, size: int) -> bool:
        """RelayCore's total-limit check for what it forwards itself: the table's bucket, which the fast path
        spends too (two buckets would let traffic split across the paths carry twice the total)."""
        return fastio.relay_charge_total(self.table, float(size))

    def _apply(self, op: str, arg) -> None:
        if op == "remove":
            fastio.relay_remove(self.table, arg)
            return
        s = arg
        if not s.fast:  # ended after it was announced
            return
        handle = getattr(s.dest, "fast_handle", None)
        if handle is not None:  # a TCP relay connection the C side writes to (relay_tcp.FastTcpDest)
            if not fastio.relay_set_tcp(self.table, s.token, s.key, handle, float(s.expires)):
                fastio.relay_remove(self.table, s.key)
            return
        if not isinstance(s.dest, tuple):
            return  # a connection on the Python path only
        idx, addr = s.dest
        sock = self.socks[idx]
        entry = self.sources.get(addr) if sock in self.sticky else None
        if not fastio.relay_set(self.table, s.token, s.key, sock.fileno(), addr, float(s.expires),
                                entry[2] if entry else None):
            fastio.relay_remove(self.table, s.key)  # stays on the Python path (table full, scoped address)

    def start(self, sock) -> Worker:
        worker = Worker(self.table, sock)
        self.workers.append(worker)
        return worker

    def take(self, worker: Worker, limit: int) -> list:
        """The datagrams the worker left for RelayCore (at most `limit`), as (data, (host, port))."""
        sock = worker.sock
        return fastio.relay_worker_take(worker.capsule, limit, self.sources if sock in self.sticky else None)

    def stop(self) -> None:
        """Every worker stopped and joined: before their sockets close."""
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        if self.tcp is not None:
            fastio.relay_tcp_stop(self.tcp)

    # --- the TCP relay's connections (_fastio.c relay_tcp_*; used by relay_tcp.RelayTcp)

    def start_tcp(self, max_conns: int):
        """The TCP worker (once); its eventfd is readable when frames or connection ends wait (tcp_take)."""
        if self.tcp is None:
            self.tcp = fastio.relay_tcp_start(self.table, max_conns)
        return fastio.relay_tcp_fd(self.tcp)

    def tcp_add(self, fd: int):
        """A connection's handle (its bytes are written through the table from now on), or None: no slot."""
        return None if self.tcp is None else fastio.relay_tcp_add(self.table, fd)

    def tcp_send(self, handle: int, frame: bytes) -> bool:
        return fastio.relay_tcp_send(self.table, handle, frame)

    def tcp_read(self, handle: int, partial: bytes) -> None:
        fastio.relay_tcp_read(self.table, handle, partial)

    def tcp_state(self, handle: int) -> tuple:
        """(seconds since its last read, seconds its outbound bytes have made no progress, bytes waiting)."""
        return fastio.relay_tcp_state(self.table, handle)

    def tcp_remove(self, handle: int) -> None:
        """Before the socket closes: neither thread touches its descriptor afterwards."""
        fastio.relay_tcp_remove(self.table, handle)

    def tcp_take(self, limit: int) -> list:
        """(handle, frame) pairs for RelayCore; frame None: that connection ended."""
        return fastio.relay_tcp_take(self.tcp, limit)

    def send_batch(self, sock, items: list) -> list:
        """RelayCore's frames for destinations on `sock`, (frame, addr) pairs, sent as the fast path sends (one
        sendmmsg, GSO runs); returns those left for the caller's own send (a scoped IPv6 address)."""
        return fastio.relay_send_batch(self.table, sock.fileno(), items, self.sources if sock in self.sticky else None)

    def fold_counters(self) -> None:
        counts = fastio.relay_take_counters(self.table)
        c = self.relay.counters
        for worker in self.workers:
            drops = fastio.relay_worker_drops(worker.capsule)
            if drops:
                c["drop_relay_queue_full"] += drops
        if self.tcp is not None:
            drops = fastio.relay_tcp_drops(self.tcp)
            if drops:
                c["drop_relay_queue_full"] += drops
            for name, n in zip(TCP_COUNTER_NAMES, fastio.relay_tcp_counters(self.table)):
                if n:
                    c[name] += n
        if any(counts):
            for name, n in zip(COUNTER_NAMES, counts):
                if n:
                    c[name] += n
            if counts[2] or counts[3]:
                c["drop_rate_limited"] += counts[2] + counts[3]

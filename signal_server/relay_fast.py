"""The UDP relay's compiled forwarder (meshwg/io/dataplane/_fastio.c, relay_*): the shell's side of it.

RelayCore announces confirmed UDP sessions and their ends (RelayCore.fast_updates); FastRelay pushes them into
the C table with the socket and address each is bound to, keeps the table's limits equal to the core's, and
folds the table's counters into the core's. The C drains a socket (recvmmsg), forwards the SENDs of sessions
it holds (sendmmsg, GSO) and hands back every other datagram for RelayCore. This file moves bytes and state
between the two; the decisions stay in relay.py."""

from __future__ import annotations

from meshwg.io.dataplane.fastio import fastio

MAX_SESSIONS = 65_536  # sessions beyond it stay on the Python path (slower, same answers)
COUNTER_NAMES = ("forwarded_packets", "forwarded_bytes", "drop_relay_node_limit", "drop_relay_total_limit",
                 "relay_send_errors", "relay_send_would_block")


def available() -> bool:
    return fastio is not None and hasattr(fastio, "relay_forward")


class FastRelay:
    def __init__(self, relay, socks: list, sources: dict, sticky: set) -> None:
        self.relay = relay
        self.socks = socks  # the shell's main sockets: session dests (idx, addr) index these
        self.sources = sources
        self.sticky = sticky
        self.table = fastio.relay_new(MAX_SESSIONS)
        self._limits = None
        relay.fast_updates = []
        self._sync_limits()
        relay.node_charge = self.charge  # one per-node budget for both paths (it lives in the table)
        relay.total_charge = self.charge_total  # and one total budget

    def _sync_limits(self) -> None:
        limits = self.relay.limits()
        if limits != self._limits:
            fastio.relay_limits(self.table, *map(float, limits))
            self._limits = limits

    def charge(self, key: bytes, size: int) -> bool:
        """RelayCore's per-node check for what it forwards itself (TCP, plain and table-less destinations)."""
        self._sync_limits()
        return fastio.relay_charge(self.table, key, float(size))

    def charge_total(self, size: int) -> bool:
        """RelayCore's total-limit check for what it forwards itself: the table's bucket, which the fast path
        spends too (two buckets would let traffic split across the paths carry twice the total)."""
        self._sync_limits()
        return fastio.relay_charge_total(self.table, float(size))

    def sync(self) -> None:
        """Sessions and limits as the core has them now (call before forwarding and after the core ran)."""
        self._sync_limits()
        for op, arg in self.relay.pop_fast_updates():
            if op == "remove":
                fastio.relay_remove(self.table, arg)
                continue
            s = arg
            if not s.fast:  # ended after it was announced
                continue
            idx, addr = s.dest
            sock = self.socks[idx]
            entry = self.sources.get(addr) if sock in self.sticky else None
            if not fastio.relay_set(self.table, s.token, s.key, sock.fileno(), addr, float(s.expires),
                                    entry[2] if entry else None):
                fastio.relay_remove(self.table, s.key)  # stays on the Python path (table full, scoped address)

    def forward(self, sock, limit: int) -> list:
        """Drains `sock` (at most `limit` datagrams): forwards what the table may, returns the rest."""
        return fastio.relay_forward(self.table, sock.fileno(), limit, self.sources if sock in self.sticky else None)

    def fold_counters(self) -> None:
        counts = fastio.relay_take_counters(self.table)
        if any(counts):
            c = self.relay.counters
            for name, n in zip(COUNTER_NAMES, counts):
                if n:
                    c[name] += n
            if counts[2] or counts[3]:
                c["drop_rate_limited"] += counts[2] + counts[3]

"""`meshwg-signal serve|relay` under systemd (Type=notify): READY=1 once every listener is bound (the server starts
this task then), STATUS= with the nodes connected and the relay's rate every STATUS_INTERVAL when it changed
(meshwg.service_status composes it). STOPPING=1 is the SIGTERM handler's (server.py). Without $NOTIFY_SOCKET nothing
runs."""

from __future__ import annotations

import time

import trio

from meshwg import service_status as SS
from meshwg.sdnotify import Notifier

STATUS_INTERVAL = 10.0   # the rate is averaged over this


def _forwarded(server) -> int:
    return int(server.relay.counters.get("forwarded_bytes", 0))


def status_line(server, mbit: float) -> str:
    return SS.server_status(control=server.cfg.control_enabled, nodes_connected=len(server.sessions),
                            relay_sessions=len(server.relay.by_key), mbit=mbit)


async def run(server, notifier: Notifier, interval: float = STATUS_INTERVAL) -> None:
    if not notifier.enabled:
        return
    last = status_line(server, 0.0)
    notifier.ready(last)
    t0, b0 = time.monotonic(), _forwarded(server)
    while True:
        await trio.sleep(interval)
        t1, b1 = time.monotonic(), _forwarded(server)
        line = status_line(server, SS.mbit_per_s(b0, b1, t1 - t0))
        t0, b0 = t1, b1
        if line != last:
            notifier.status(line)
            last = line

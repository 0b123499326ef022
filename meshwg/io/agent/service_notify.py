"""`meshwg join` under systemd (Type=notify): READY=1 once the node has its welcome (the server's, or its cache's
when the server is down) and its interface carries the addresses, then STATUS= when the one-line summary changes
(meshwg.service_status), and STOPPING=1 when the agent shuts down. Without $NOTIFY_SOCKET nothing runs.

The summary is polled, not pushed: path changes happen inside the data plane's timers, and a poll every
STATUS_INTERVAL both rate-limits the messages and costs one wake-up per interval.
"""

from __future__ import annotations

import trio

from meshwg import service_status as SS
from meshwg.sdnotify import Notifier

READY_POLL = 0.25        # seconds between readiness checks while starting (and waiting for a first server)
STATUS_INTERVAL = 2.0    # at most one STATUS message this often


def is_ready(agent) -> bool:
    """The welcome is known and the interface holds its mesh addresses."""
    core, dev = agent.core, agent.dev
    return core is not None and core.welcome is not None and dev is not None and bool(dev.addresses)


def status_line(agent) -> str:
    core, client = agent.core, agent.client
    rows = agent.dev.peer_status(agent.clock()) if core.welcome is not None else ()
    direct, relayed, idle = SS.count_paths(rows)
    return SS.agent_status(welcomed=core.welcome is not None, connected=core.connected,
                           failures=client.failures if client is not None else 0,
                           direct=direct, relayed=relayed, idle=idle)


async def watch(agent, notifier: Notifier) -> None:
    """Runs in the agent's nursery until it is cancelled (the agent stopping)."""
    if not notifier.enabled:
        return
    try:
        last = None
        while not is_ready(agent):
            line = status_line(agent)
            if line != last:
                notifier.status(line)
                last = line
            await trio.sleep(READY_POLL)
        last = status_line(agent)
        notifier.ready(last)
        while True:
            await trio.sleep(STATUS_INTERVAL)
            line = status_line(agent)
            if line != last:
                notifier.status(line)
                last = line
    finally:
        notifier.stopping()   # cancelled: the agent is removing its interface and routes

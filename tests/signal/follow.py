"""A node's view of the directory, for tests that run the control client without the agent.

The client keeps no directory (the agent core owns the one): this folds the client's events the way the
core does (meshwg.mesh.agent_core.update_directory) and passes every event on, for the test to read.
"""

from __future__ import annotations

import math

import trio

from meshwg.mesh.agent_core import update_directory


class Follower:
    def __init__(self, client) -> None:
        self.client = client
        self.directory: dict = {}
        self._send, self.events = trio.open_memory_channel(math.inf)

    async def run(self) -> None:
        async for ev in self.client.events:
            update_directory(self.directory, ev)
            self._send.send_nowait(ev)


def follow(nursery, client) -> Follower:
    """Start folding `client`'s events; read the directory and the events from the result."""
    f = Follower(client)
    nursery.start_soon(f.run)
    return f

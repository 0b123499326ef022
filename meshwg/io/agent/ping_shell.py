"""`meshwg ping` in the agent: one status-socket request becomes the core's UserPing, the node's UserPingDone event
becomes the reply. It carries the answer only: what is pinged and which pong answers is meshwg.disco.user_ping's,
the node's and the core's (meshwg.mesh.agent_core) to decide.
"""

from __future__ import annotations

import base64
import itertools
import math

import trio

from meshwg.disco import user_ping as UP
from meshwg.mesh import agent_core as A
from meshwg.signaling.invite import join_hostport

GRACE = 1.0     # seconds past the ping's own deadline before the reply gives up on the node's event


class _Slot:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.sent: A.PingSent | None = None
        self.refused: str | None = None
        self.result: UP.UserPingDone | None = None
        self.done = trio.Event()


class UserPingServer:
    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}
        self._refs = itertools.count(1)

    async def serve(self, req: dict, step) -> dict:
        """The "ping" request {"peer": NAME|IP|KEY, "timeout": S}; `step` is the agent's one door to the core."""
        peer, timeout = req.get("peer"), req.get("timeout", UP.DEFAULT_TIMEOUT)
        if not isinstance(peer, str) or not peer or isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            return {"error": "bad ping request (peer: a name, mesh IP or public key; timeout: seconds)"}
        timeout = float(timeout) if abs(timeout) < 1e9 else math.inf   # the core refuses what is out of range
        ref = next(self._refs)
        slot = self._slots[ref] = _Slot(timeout)
        try:
            await step(A.UserPing(ref, peer, timeout))
            if slot.refused is not None:
                return {"error": slot.refused}
            if slot.sent is None:
                return {"error": "the ping did not go out"}
            with trio.move_on_after(timeout + GRACE):   # the node times it out itself: this guards a lost event
                await slot.done.wait()
            return _reply(slot)
        finally:
            del self._slots[ref]

    def carry_out(self, act) -> None:
        """The core's PingSent / PingRefused for a request in flight."""
        slot = self._slots.get(act.ref)
        if slot is None:
            return
        if isinstance(act, A.PingRefused):
            slot.refused = act.reason
        else:
            slot.sent = act

    def done(self, ev: UP.UserPingDone) -> None:
        """The node's event (from the driver's flush): the answer, or the timeout."""
        slot = self._slots.get(ev.ref)
        if slot is not None:
            slot.result = ev
            slot.done.set()


def _reply(slot: _Slot) -> dict:
    sent, res = slot.sent, slot.result
    path = None if res is None else res.path
    direct = isinstance(path, tuple)
    return {"peer": sent.name, "address": sent.address, "public_key": base64.b64encode(sent.key).decode(),
            "paths": sent.paths, "timeout": slot.timeout,
            "path": "direct" if direct else "relay" if path == UP.RELAY else None,
            "endpoint": join_hostport(str(path[0]), path[1]) if direct else None,
            "rtt_ms": None if path is None else round(res.rtt * 1000, 3)}

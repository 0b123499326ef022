"""Relays in several regions, on the control server's side (issue 14.3).

`serve --relay REGION=HOST:PORT[,HOST:PORT...]` names the regional relays (`meshwg-signal relay --region REGION`,
no database); this server's own relay is region `--region` (default "main"). With at least one given, every
welcome lists every relay ("relays": [{region, key, udp, tcp}], the server's own first) and carries the node's
relay credential ("relay_cred", relay_auth: signed, expiring), which a fresh T_RELAY_CRED replaces before it
expires. The relay keys come from the server key (relay_auth.relay_public), so listing a relay needs no key.
With none given, the welcome is what it was: one relay, the server's, and no credential."""

from __future__ import annotations

import time

import trio

from meshwg.signaling import protocol as P
from meshwg.signaling.invite import join_hostport
from signal_server import relay_auth

REFRESH_CHECK = 5.0  # how often sessions are looked at for a credential due for renewal


class Regions:
    def __init__(self, server_sk: bytes, region: str, relays) -> None:
        """relays: [(region, [udp (host, port)], [tcp (host, port)...])] of `serve --relay`."""
        self.region = region
        self.relays = [(r, udp, tcp, relay_auth.relay_public(server_sk, r)) for r, udp, tcp in relays]
        self._signing = relay_auth.signing_key(server_sk) if self.relays else None
        self.issued: dict[bytes, float] = {}  # node key -> wall time of the credential it holds

    @property
    def enabled(self) -> bool:
        return bool(self.relays)

    def credential(self, key: bytes, wall: float) -> bytes:
        self.issued[key] = wall
        return relay_auth.issue(self._signing, key, wall)

    def welcome_fields(self, key: bytes, server_pk: bytes, udp: list, tcp: list, wall: float) -> dict:
        """What a welcome adds (nothing without regional relays): every relay, ours first, and a credential."""
        if not self.enabled:
            return {}
        own = [{"region": self.region, "key": server_pk, "udp": udp, "tcp": tcp}] if udp or tcp else []
        others = [{"region": r, "key": pk, "udp": [join_hostport(*a) for a in u], "tcp": [join_hostport(*a) for a in t]}
                  for r, u, t, pk in self.relays]
        return {"relays": own + others, "relay_cred": self.credential(key, wall)}

    def due(self, connected, wall: float) -> list[bytes]:
        """Connected nodes whose credential is due for renewal; forgets the others."""
        for key in [k for k in self.issued if k not in connected]:
            del self.issued[key]
        return [k for k, t in self.issued.items() if wall - t >= relay_auth.CRED_REFRESH]

    async def refresh_loop(self, sessions, counters) -> None:
        """Sends connected nodes a fresh credential before theirs expires (`sessions`: the control listener's)."""
        if not self.enabled:
            return
        while True:
            await trio.sleep(REFRESH_CHECK)
            wall = time.time()
            for key in self.due(sessions, wall):
                s = sessions.get(key)
                if s is not None:
                    s.enqueue({"type": P.T_RELAY_CRED, "cred": self.credential(key, wall)}, counters)

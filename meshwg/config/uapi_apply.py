"""A parsed UAPI `set` request applied to a WireGuardCore. Pure: the socket keys (listen_port, fwmark) are the
device shell's; everything else is a change of the core, made here by the core's one writer.

A plain device (`meshwg up`) writes its core through `CoreWriter`; a mesh device's writer is its MeshNode,
which owns its mesh peers and hands the rest (peers added by hand) to `apply_peer_update`.
"""

from __future__ import annotations

from meshwg.config.keys import nonzero
from meshwg.config.uapi import PeerUpdate, SetRequest


def apply_peer_update(core, update: PeerUpdate, now: float) -> None:
    """One peer's part of a request, in wireguard-go's order (keepalive last: turning it on sends one at once,
    to the endpoint just set)."""
    if update.remove:
        core.remove_peer(update.public_key)
        return
    if update.update_only and update.public_key not in core.peers:
        return
    peer = core.add_peer(update.public_key)
    if update.preshared_key is not None:
        core.set_preshared_key(peer, update.preshared_key)
    if update.endpoint is not None:
        core.set_endpoint(peer, update.endpoint)
    if update.replace_allowed_ips:
        core.set_allowed_ips(peer, [])
    for change in update.allowed_ips:
        if change.remove:
            core.remove_allowed_ip(peer, change.network)
        else:
            core.add_allowed_ip(peer, change.network)
    if update.persistent_keepalive_interval is not None:
        core.set_persistent_keepalive(peer, update.persistent_keepalive_interval, now)


class CoreWriter:
    """The writer of a plain device's core: the whole request, as wireguard-go applies it."""

    def __init__(self, core) -> None:
        self.core = core

    def apply_set_request(self, request: SetRequest, now: float) -> None:
        core = self.core
        if request.private_key is not None:
            core.set_private_key(nonzero(request.private_key))  # the same key again changes nothing
        if request.replace_peers:
            for public_key in list(core.peers):
                core.remove_peer(public_key)
        for update in request.peers:
            apply_peer_update(core, update, now)

"""Node side of the signal server: the control channel client, its reconnect policy, the relay client (trio).
The wire formats they share with the server are in meshwg.signaling (pure).

API for `meshwg join` (all keys are raw 32-byte X25519; the WireGuard private key is the node identity):

    from meshwg.control import parse_invite, ControlClient, events
    invite = parse_invite(text)                     # InviteFormatError on a mistyped/truncated string
    client = ControlClient(invite, wg_private_key, name="laptop",
                           candidates=[("192.168.1.5", 51820, "local")])
    async with trio.open_nursery() as n:
        welcome = await n.start(client.run)         # JoinRefusedError (code: invite_invalid | invite_expired |
                                                    #   invite_revoked | invite_used | key_removed | node_expired |
                                                    #   not_registered) or ServerKeyMismatch: fatal
        welcome.node_id, welcome.ipv4, welcome.ipv6, welcome.prefix4, welcome.prefix6
        welcome.stun / welcome.relay_udp / welcome.relay_tcp   # ((host, port), ...)
        async for ev in client.events:              # trio MemoryReceiveChannel
            Connected(welcome) | Disconnected(reason) | DirectoryReset(peers: {key: PeerInfo}) |
            PeerChanged(peer) | PeerRemoved(key) | PunchNotice(peer, role) | PunchFailed(key, reason) |
            SealedMessage(sender, plaintext) | SelfChanged(name, tags) | Removed(reason)   # after Removed, run() returns
        # PeerInfo(key, node_id, name, ipv4, ipv6, candidates=((ip, port, kind), ...), online); the client
        # keeps no directory: the agent core (meshwg.mesh.agent_core) folds these events into the one it owns
        await client.report_candidates([(ip, port, "local"|"stun"|...), ...])   # kept and re-sent on reconnect
        await client.request_punch(peer_key)        # both sides get PunchNotice at once
        await client.send_sealed(peer_key, b"...")  # NaCl box end to end; the server only forwards
    The events channel is bounded: read it continuously (a node that stops reading stops reading its
    socket too, and the server closes it as a slow client).
    Heartbeats, reconnect with jittered exponential backoff and a resync (DirectoryReset) are automatic.
    ControlConnection.open(invite, sk, ...) is the single-connection, no-reconnect variant.

Relay (meshwg.control.relay_client): RelaySession (sans-IO, for the shared UDP socket: hello(now, wall),
needs_hello(now), get_timer(), handle_untrusted(data, now) -> ("ready", observed) | ("recv", src, pkt) |
("notice", code, key) | None, encode_send(dst, pkt)); open_tcp_relay(host, port, sk, server_pk, random_bytes)
-> TcpRelayClient(send(dst, pkt), receive() -> (src, pkt)). The relay key is welcome.server_key.
STUN codec: meshwg.disco.stun.
"""

import importlib

# Loaded on first use (PEP 562): `meshwg.control.reconnect`, a pure module, must not pull the trio client
# (and trio) in with its package.
_LAZY = {
    "events": ("meshwg.control.events", None),
    **{name: ("meshwg.control.client", name) for name in (
        "ConnectionLost", "ControlClient", "ControlConnection", "ControlError", "JoinRefusedError",
        "ServerKeyMismatch")},
    **{name: ("meshwg.control.events", name) for name in ("PeerInfo", "Welcome")},
    **{name: ("meshwg.signaling.invite", name) for name in ("Invite", "InviteFormatError", "parse_invite")},
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)

"""Node side of the signal server: control channel client, invites, sealed peer messages, relay client.

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
            SealedMessage(sender, plaintext) | Removed(reason)      # after Removed, run() returns
        client.directory                            # {key: PeerInfo(key, node_id, name, ipv4, ipv6,
                                                    #   candidates=((ip, port, kind), ...), online)}
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

from meshwg.control import client as events  # noqa: F401  (event classes live in client)
from meshwg.control.client import (  # noqa: F401
    ConnectionLost,
    ControlClient,
    ControlConnection,
    ControlError,
    JoinRefusedError,
    PeerInfo,
    ServerKeyMismatch,
    Welcome,
)
from meshwg.control.invite import Invite, InviteFormatError, parse_invite  # noqa: F401

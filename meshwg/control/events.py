"""What the control client tells the node: the welcome, directory entries and the events carrying them.

Plain frozen data with no I/O, so the agent's sans-IO core (meshwg.mesh.agent_core) takes these events
as its inputs without loading the trio client that produces them (meshwg.control.client).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RelayInfo:
    """A relay of the mesh (issue 14.3, relays in regions): its region, the key its HELLOs are boxed to, and its
    UDP (STUN + relay) and TCP addresses ((host, port), ...)."""
    region: str
    key: bytes
    udp: tuple
    tcp: tuple


@dataclass(frozen=True)
class RelayCredential:
    """A fresh relay credential from the server (protocol.T_RELAY_CRED): the next HELLOs carry it."""
    cred: bytes


@dataclass(frozen=True)
class Welcome:
    node_id: int
    name: str
    ipv4: str
    ipv6: str
    prefix4: str
    prefix6: str
    stun: tuple  # ((host, port), ...)
    relay_udp: tuple
    relay_tcp: tuple
    heartbeat: float
    server_key: bytes
    tags: tuple = ()  # this node's own tags (issue 13), for `meshwg status`
    dns_domain: str = ""  # the mesh domain (issue 15, meshwg.mesh.dns_names); "": names off
    relays: tuple = ()  # RelayInfo of every relay in every region (issue 14.3); (): the one relay above
    relay_cred: bytes = b""  # our relay credential (regional relays admit us by it); b"": none


@dataclass(frozen=True)
class PeerInfo:
    key: bytes
    node_id: int
    name: str
    ipv4: str
    ipv6: str
    candidates: tuple  # ((ip, port, kind), ...) kind: local | stun | observed | ...
    online: bool
    # "node": a mesh node (discovery, candidates); "plain": a stock WireGuard device the server manages, reached
    # only through the relay's plain port (issue 12). PEER_KINDS lists them; any other kind is dropped on arrival.
    kind: str = "node"
    # Subnet routes and exit nodes (issue 12): the peer's APPROVED routes (canonical CIDR text, never a default
    # route) and whether it is an approved exit node. What this node routes to it is meshwg.mesh.peer_entry's call.
    routes: tuple = ()
    exit_node: bool = False
    # Access control (issue 13, /work/notes/acl-contract.md): what the peer may send to this node, as
    # ((proto, lo, hi, cidr text), ...); None: no policy in force, accept everything (the field was absent);
    # () : nothing new (replies to flows this node opened still pass). accept_refused: rules of the entry's list
    # the client dropped as malformed, of "accept" and "offers" (counted where the entry becomes a PeerSpec).
    # tags: the peer's tags. offers: what this node may send the peer, in accept's format; shown in `meshwg status`
    # only (the peer enforces it, this node filters nothing outbound with it); None: the server sent none.
    accept: tuple | None = None
    tags: tuple[str, ...] = ()
    accept_refused: int = 0
    offers: tuple | None = None


PEER_KINDS = ("node", "plain")


# --- events delivered to the node


@dataclass(frozen=True)
class Connected:
    welcome: Welcome


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class DirectoryReset:
    """A full directory (after each (re)connect): replace everything known about peers."""

    peers: dict


@dataclass(frozen=True)
class PeerChanged:
    peer: PeerInfo


@dataclass(frozen=True)
class PeerRemoved:
    key: bytes


@dataclass(frozen=True)
class PunchNotice:
    """Punch towards `peer` now; the peer was told the same about us at the same moment."""

    peer: PeerInfo
    role: str  # "initiator" (we asked) or "responder"


@dataclass(frozen=True)
class PunchFailed:
    key: bytes
    reason: str


@dataclass(frozen=True)
class SealedMessage:
    sender: bytes
    plaintext: bytes


@dataclass(frozen=True)
class SelfChanged:
    """This node's own name or tags changed on the server while connected (issue 13): what `meshwg status` shows.
    The welcome of the next connection carries them too."""

    name: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Removed:
    """This node was removed or expired by the administrator; the client stops."""

    reason: str

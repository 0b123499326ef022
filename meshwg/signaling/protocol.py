"""Control-channel wire protocol (shared by node and server). Pure: no I/O.

Stream layout: every frame is a 4-byte big-endian length then the body, capped per direction.
  frame 1 (node -> server): HELLO_MAGIC + Noise IK message 1 (payload: msgpack {"v": PROTO_VERSION})
  frame 2 (server -> node): Noise IK message 2 (payload: msgpack {"v": PROTO_VERSION, "server": name})
  then each frame is one ChaCha20-Poly1305 transport message holding one msgpack map {"type": str, ...}.
Message types are versioned by PROTO_VERSION (negotiated in the handshake payloads); a receiver ignores
and counts types it does not know, so newer peers can add types without breaking older ones.
"""

from __future__ import annotations

import struct

import msgpack

from meshwg.signaling.noise import CipherState

PROTO_VERSION = 1
HELLO_MAGIC = b"MWC\x01"
# A server that cannot take a connection now (too many from this source, overloaded) may answer the
# HELLO with this plaintext frame instead of Noise message 2, then close: BUSY_MAGIC + retry seconds
# (u16). Noise message 2 is never this short, so the two cannot be confused. Unauthenticated: a client
# treats it like any early close (transient, retry with backoff), only as a hint for the delay.
BUSY_MAGIC = b"MWB\x01"
BUSY_MAX_RETRY = 3600
# A server that cannot open message 1 (the client pinned another key) says so with this plaintext
# frame before closing: it tells an operator "wrong server or wrong database" apart from a proxy
# whose backend is down. Unauthenticated, so a node that was admitted before only reports it and
# retries slowly; a first join stops on it.
KEY_REFUSED = b"MWK\x01"
LEN_PREFIX = 4
MAX_CLIENT_FRAME = 64 * 1024  # node -> server: nothing a node sends needs more
MAX_SERVER_FRAME = 4 * 1024 * 1024  # server -> node: directory chunks stay well under this
DIR_CHUNK = 256  # peers per directory message, keeps frames small and lets the event loop breathe

# Candidate kinds, the third field of [ip, port, kind]. A node may say only these about its own addresses
# ("stun-eim"/"stun-edm" also hint at its NAT's mapping); the server drops other kinds it is told, each alone
# (the rest of the list stays), and so does every node in a directory entry: a kind added later costs older
# servers and nodes that one candidate, never the list.
# "public": reachable from anywhere without a punch (a port forward the user set up, or a full-cone NAT or no NAT
# seen by netcheck); `meshwg-signal plain add --direct` puts it in a phone's config. A node reports it next to
# the same address's other kinds, so a server that drops it loses nothing else.
KIND_PUBLIC = "public"
# "relay": not a path but the UDP address of the node's home relay (issue 14.3, relays in regions): peers send it
# relayed traffic through that relay. Never probed.
KIND_RELAY = "relay"
REPORTED_KINDS = frozenset({"local", "stun", "stun-eim", "stun-edm", KIND_PUBLIC, KIND_RELAY})
# The server's alone: where it saw the node's relay traffic come from, the only address peers' birthday
# probes aim at (a node reporting it could make every other node spray UDP at anyone).
KIND_OBSERVED = "observed"

# node -> server
T_REGISTER = "register"  # {invite_id?, secret?, name?, candidates: [[ip, port, kind]...], proto}
T_HEARTBEAT = "hb"  # {seq}
T_CANDIDATES = "candidates"  # {candidates}
T_PUNCH_REQUEST = "punch_req"  # {peer: key32}
T_SEAL_SEND = "seal_send"  # {to: key32, blob: bytes}
# {routes: [cidr...], exit_node: bool}: the node's whole advertisement of subnet routes (replaces the last one);
# sent after every welcome and on each change. Default routes are never in "routes": exit_node says that.
T_ROUTES = "routes"
# {}: `meshwg leave`: remove this node from the mesh. The server answers with T_GONE {reason: "left"} and closes;
# a server before it ignores the type (the node reports no answer).
T_LEAVE = "leave"
GONE_LEFT = "left"
# server -> node
T_WELCOME = "welcome"  # {node_id, name, ipv4, ipv6, prefixes, stun, relay_udp, relay_tcp, proto}
# The welcome's optional "dns_domain": the mesh domain nodes answer NAME.<domain> for (absent: names off); older
# nodes ignore it.
# The welcome's optional "servers": ["host:port"...], the control addresses of every running server on the node's
# database (several servers, issue 14): the node keeps them with its invite's and its cache, and reconnects to
# another when its own dies. Older nodes ignore it.
MAX_SERVERS = 16
T_ERROR = "error"  # {code, message}; the server closes after sending it
# A T_ERROR code that is no refusal of the node: the server cannot reach its database now; "retry_after" (s) says
# when to try again (this server or another). Nodes before it take it for a refusal.
E_DB_UNAVAILABLE = "db_unavailable"
RETRYABLE_ERRORS = frozenset({E_DB_UNAVAILABLE})


def servers_untrusted(value) -> tuple:
    """The welcome's "servers" as checked host:port texts (at most MAX_SERVERS); anything else is dropped."""
    from meshwg.signaling.invite import split_hostport

    out = []
    for a in value if isinstance(value, list) else ():
        if isinstance(a, str) and len(a) <= 300:
            try:
                split_hostport(a)
            except (ValueError, TypeError):
                continue
            out.append(a)
    return tuple(dict.fromkeys(out))[:MAX_SERVERS]
T_DIR_FULL = "dir_full"  # {peers: [packed entry...], last: bool} - first chunk resets the directory
T_DIR_UPDATE = "dir"  # {upsert: [packed entry...], remove: [key32...]}
T_PUNCH = "punch"  # {peer: packed entry}: the peer will punch towards us now
T_SEALED = "sealed"  # {from: key32, blob: bytes}
T_HEARTBEAT_ACK = "hb_ack"  # {seq}
T_GONE = "gone"  # {reason}: this node was removed/expired; the server closes
# {name, tags: [tag...]}: this node's own name or tags changed while it is connected (what its welcome said is
# stale); nodes before it ignore the type and learn them at their next welcome.
T_SELF = "self"
# Relays in regions (issue 14.3): the welcome's optional "relays": [{region: str, key: key32, udp: [[host, port]],
# tcp: [[host, port]...]}...] (every relay, the server's own first; absent: the one relay of relay_udp/relay_tcp) and
# "relay_cred": the node's signed, expiring relay credential (signal_server/relay_auth.py), which
# {type: T_RELAY_CRED, cred: bytes} replaces before it expires. Older nodes ignore both.
T_RELAY_CRED = "relay_cred"


class FrameDecoder:
    """Reassembles length-prefixed frames from stream bytes; an oversized length poisons the stream."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self._buf = bytearray()
        self.error: str | None = None

    def feed_untrusted(self, data: bytes) -> list[bytes]:
        if self.error:
            return []
        self._buf += data
        out = []
        while len(self._buf) >= LEN_PREFIX:
            (n,) = struct.unpack_from("!I", self._buf, 0)
            if n > self.max_len:
                self.error = "frame_too_large"
                self._buf.clear()
                return out
            if len(self._buf) < LEN_PREFIX + n:
                break
            out.append(bytes(self._buf[LEN_PREFIX : LEN_PREFIX + n]))
            del self._buf[: LEN_PREFIX + n]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def busy_frame(retry_after: int) -> bytes:
    """The framed BUSY answer: retry after `retry_after` seconds (clamped to 1..BUSY_MAX_RETRY)."""
    return frame(BUSY_MAGIC + struct.pack("!H", max(1, min(BUSY_MAX_RETRY, int(retry_after)))))


def key_refused_frame() -> bytes:
    return frame(KEY_REFUSED)


def busy_retry_untrusted(body: bytes) -> int | None:
    """Retry seconds of a BUSY frame body, else None (anything else, Noise message 2 included)."""
    if len(body) != len(BUSY_MAGIC) + 2 or not body.startswith(BUSY_MAGIC):
        return None
    (retry,) = struct.unpack_from("!H", body, len(BUSY_MAGIC))
    return min(max(retry, 1), BUSY_MAX_RETRY)


class Packed:
    """A message packed already (dir_update_body): pack() and so SecureChannel.encode take its bytes as they are."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body


def pack(msg) -> bytes:
    if isinstance(msg, Packed):
        return msg.body
    return msgpack.packb(msg, use_bin_type=True)


def unpack_untrusted(data: bytes, max_len: int) -> dict | None:
    """A msgpack map with a str "type", else None. Limits stop allocation bombs."""
    try:
        msg = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_len,
            max_bin_len=max_len,
            max_array_len=100_000,
            max_map_len=1024,
        )
    except Exception:  # msgpack raises many types on junk; all mean "malformed"
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return None
    return msg


class SecureChannel:
    """Transport phase of one side: encrypt+frame outgoing maps, decrypt+parse incoming frames."""

    def __init__(self, send: CipherState, recv: CipherState, max_in: int) -> None:
        self._send = send
        self._recv = recv
        self.max_in = max_in
        self.decoder = FrameDecoder(max_in + 16)
        self.error: str | None = None

    def encode(self, msg: dict) -> bytes:
        return frame(self._send.encrypt(pack(msg)))

    def encode_packed(self, packed: bytes) -> bytes:
        return frame(self._send.encrypt(packed))

    def feed_untrusted(self, data: bytes) -> list[dict]:
        """Decoded messages; sets self.error (and stops) on a bad frame: the caller then closes."""
        if self.error:
            return []
        out = []
        for body in self.decoder.feed_untrusted(data):
            plain = self._recv.decrypt_untrusted(body)
            if plain is None:
                self.error = "bad_auth"
                return out
            msg = unpack_untrusted(plain, self.max_in)
            if msg is None:
                self.error = "malformed"
                return out
            out.append(msg)
        if self.decoder.error:
            self.error = self.decoder.error
        return out


# --- directory entries: packed once by the server, shared by every recipient


def pack_entry(entry: dict) -> bytes:
    return msgpack.packb(entry, use_bin_type=True)


def bin_header(n: int) -> bytes:
    """The msgpack header of an n-byte bin object (as msgpack.packb writes it): bytes spliced after it pack as if
    packb(bytes) had been called."""
    if n < 0x100:
        return bytes((0xC4, n))
    return (b"\xc5" + n.to_bytes(2, "big")) if n < 0x10000 else (b"\xc6" + n.to_bytes(4, "big"))


def array_header(n: int) -> bytes:
    """The msgpack header of an n-item array (as msgpack.packb writes it)."""
    if n < 16:
        return bytes((0x90 + n,))
    return (b"\xdc" + n.to_bytes(2, "big")) if n < 0x10000 else (b"\xdd" + n.to_bytes(4, "big"))


_DIR_UPDATE_HEAD = b"\x83" + pack("type") + pack(T_DIR_UPDATE) + pack("upsert")
_REMOVE = pack("remove")


def dir_update_body(items: list, count: int, removes) -> bytes:
    """pack({"type": T_DIR_UPDATE, "upsert": [entry...], "remove": removes}) from the entries already packed as bin
    objects (`count` of them, in `items`: pieces whose concatenation they are): the same bytes, with no list of
    entries to build and one copy."""
    return b"".join((_DIR_UPDATE_HEAD, array_header(count), *items, _REMOVE, pack(list(removes))))


def unpack_entry_untrusted(data) -> dict | None:
    if not isinstance(data, bytes):
        return None
    try:
        e = msgpack.unpackb(data, raw=False, max_str_len=4096, max_bin_len=4096, max_array_len=64, max_map_len=64)
    except Exception:
        return None
    if not isinstance(e, dict) or not isinstance(e.get("key"), bytes) or len(e["key"]) != 32:
        return None
    return e


def candidates_untrusted(value, limit: int = 16) -> list[tuple[str, int, str]] | None:
    """Validate a candidate list [[ip, port, kind], ...]; None when malformed."""
    import ipaddress

    if not isinstance(value, list) or len(value) > limit:
        return None
    out = []
    for c in value:
        if not isinstance(c, (list, tuple)) or len(c) not in (2, 3):
            return None
        ip, port = c[0], c[1]
        kind = c[2] if len(c) == 3 else "local"
        if not isinstance(ip, str) or not isinstance(port, int) or not isinstance(kind, str):
            return None
        if not 0 < port < 65536 or len(kind) > 16:
            return None
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            return None
        out.append((ip, port, kind))
    return out


MAX_ROUTES = 64  # prefixes in one advertisement (and in a directory entry's "routes")
_MAX_CIDR_TEXT = 64  # longer than any IPv6 prefix in text: junk, not parsed


def routes_untrusted(msg) -> tuple[tuple[str, ...], bool] | None:
    """(canonical prefixes, exit_node) of a T_ROUTES message, None when it is malformed (routes not a list,
    exit_node not a bool). Prefixes that are not CIDR text with the host bits clear are dropped (the caller
    counts len(routes) - len(result)); the rest come back canonical (ipaddress's text), deduplicated, sorted,
    at most MAX_ROUTES of them."""
    import ipaddress

    if not isinstance(msg, dict):
        return None
    routes, exit_node = msg.get("routes", []), msg.get("exit_node", False)
    if not isinstance(routes, (list, tuple)) or not isinstance(exit_node, bool):
        return None
    nets = set()
    for text in routes:
        if len(nets) >= MAX_ROUTES:
            break
        if not isinstance(text, str) or len(text) > _MAX_CIDR_TEXT or "/" not in text:
            continue  # a bare address is no prefix: the node means a /32 or /128, and must say so
        try:
            nets.add(ipaddress.ip_network(text, strict=True))
        except ValueError:
            continue
    ordered = sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen))
    return tuple(str(n) for n in ordered), exit_node

"""The node-software command lines the runner uses, in one place so they are easy to adapt.

Each entry is an argv template; `{placeholders}` are filled by the runner. The programs run through
the current interpreter (`python -m ...`) so the lab needs no PATH set-up inside namespaces.
`parse_status` is the one place that knows the shape of `meshwg status --json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scenarios.topology import Host

PY = sys.executable
SIGNAL_PORT = 7300        # the signal server's control port (TCP) on the internet host
STUN_PORT = 3478          # its STUN + UDP relay port
RELAY_TCP_PORT = 7301     # its TCP relay fallback (for UDP-blocked nodes)
MESH_IF = "mesh0"         # same name on every host: each host has its own netns and /run/wireguard

COMMANDS = {
    # On the public "signal" host. Runs until stopped. STUN answers on two addresses so nodes can tell a
    # symmetric NAT (mapping varies by destination) from a cone. --init: the first start creates the
    # server's identity; a restart serves the one in {db}.
    "signal_serve": [PY, "-m", "signal_server", "serve", "--init", "--db", "{db}",
                     "--listen", "{signal_ip}:{signal_port}",
                     "--udp", "{signal_ip}:{stun_port}", "--udp", "{signal_ip2}:{stun_port}",
                     "--relay-tcp", "{signal_ip}:{relay_tcp_port}"],
    # On the same host, once the server listens. Prints the invite on its last stdout line.
    "invite_create": [PY, "-m", "signal_server", "invite", "create", "--reusable", "--db", "{db}",
                      "--addr", "{signal_ip}:{signal_port}"],
    # On every node. Runs until stopped.
    "join": [PY, "-m", "meshwg", "join", "{invite}", "--name", "{name}", "--state-dir", "{state_dir}",
             "--interface", "{interface}"],
    # On every node, polled. Prints JSON (see parse_status).
    "status": [PY, "-m", "meshwg", "status", "--json", "--state-dir", "{state_dir}", "--interface", "{interface}"],
}


def command(which: str, **values) -> list[str]:
    return [part.format(**values) for part in COMMANDS[which]]


def signal_values(host: Host) -> dict:
    """The placeholders of signal_serve and invite_create, for the server on `host` (two addresses)."""
    return dict(db=host.dir / "signal.db", signal_ip=host.addr, signal_ip2=host.extra_addrs[0],
                signal_port=SIGNAL_PORT, stun_port=STUN_PORT, relay_tcp_port=RELAY_TCP_PORT)


def node_values(host: Host, invite: str = "") -> dict:
    """The placeholders of join and status, for the node on `host` (status needs no invite)."""
    return dict(invite=invite, name=host.name, state_dir=host.dir / "state", interface=MESH_IF)


@dataclass
class PeerStatus:
    name: str
    addresses: list[str]
    path: str | None            # "direct" | "relay" | None (not connected yet)
    endpoint: str | None
    latency_ms: float | None


@dataclass
class NodeStatus:
    addresses: list[str]        # this node's own mesh addresses ("100.80.0.3/32" or bare)
    peers: dict[str, PeerStatus]


def parse_status(text: str) -> NodeStatus:
    """`meshwg status --json` -> NodeStatus. Assumed shape (adapt here if it differs):
    {"name": ..., "addresses": [...], "peers": [{"name", "addresses", "path", "endpoint", "latency_ms"}, ...]}
    """
    data = json.loads(text)
    own = data.get("addresses") or (data.get("self") or {}).get("addresses") or []
    peers = {}
    for p in data.get("peers", []):
        peers[p["name"]] = PeerStatus(p["name"], list(p.get("addresses") or []), p.get("path"),
                                      p.get("endpoint"), p.get("latency_ms"))
    return NodeStatus(list(own), peers)


def bare_ipv4(addresses: list[str]) -> str | None:
    """The first IPv4 address, without a prefix length."""
    for a in addresses:
        ip = a.split("/")[0]
        if ":" not in ip:
            return ip
    return None

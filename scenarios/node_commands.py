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
PLAIN_PORT = 51820        # the signal server's plain WireGuard port (phones with the official apps)
PLAIN_IF = "wgp0"         # a plain device's interface: wg-quick names it after the config file

COMMANDS = {
    # On the public "signal" host. Runs until stopped. STUN answers on two addresses so nodes can tell a
    # symmetric NAT (mapping varies by destination) from a cone. --init: the first start creates the
    # server's identity; a restart serves the one in {db}.
    "signal_serve": [PY, "-m", "signal_server", "serve", "--init", "--db", "{db}",
                     "--listen", "{signal_ip}:{signal_port}",
                     "--udp", "{signal_ip}:{stun_port}", "--udp", "{signal_ip2}:{stun_port}",
                     "--relay-tcp", "{signal_ip}:{relay_tcp_port}",
                     # no names: plain configs would carry a DNS line, which the devices' stock wg-quick hands to a
                     # resolvconf the lab hosts do not have (names are tested in tests/join/test_dns_lab.py)
                     "--dns-domain", "none"],
    # On the same host, once the server listens. Prints the invite on its last stdout line.
    "invite_create": [PY, "-m", "signal_server", "invite", "create", "--reusable", "--db", "{db}",
                      "--addr", "{signal_ip}:{signal_port}"],
    # On every node. Runs until stopped.
    "join": [PY, "-m", "meshwg", "join", "{invite}", "--name", "{name}", "--state-dir", "{state_dir}",
             "--interface", "{interface}"],
    # On every node, polled. Prints JSON (see parse_status).
    "status": [PY, "-m", "meshwg", "status", "--json", "--state-dir", "{state_dir}", "--interface", "{interface}"],

    # Plain devices and subnet routes (only in scenarios that have them):
    # added to signal_serve: the address the server publishes for `plain add` configs.
    "signal_plain": ["--plain-udp", "{signal_ip}:{plain_port}"],
    # added to join: the node advertises its router's LAN.
    "join_routes": ["--advertise-routes", "{routes}"],
    # The administrator on the signal host (the admin CLI works on the server's DB file).
    "routes_list": [PY, "-m", "signal_server", "routes", "list", "--db", "{db}"],
    "routes_approve": [PY, "-m", "signal_server", "routes", "approve", "{node}", "{cidr}", "--db", "{db}"],
    # Prints the device's wg-quick config and writes it as a QR code PNG; one `--to NODE` is added per target.
    # ({endpoint}, the published plain address, is for stand-ins: the real command reads it from the DB.)
    "plain_add": [PY, "-m", "signal_server", "plain", "add", "{name}", "--qr-png", "{png}", "--db", "{db}"],
    # On the plain device: what its camera makes of the QR code, then what the WireGuard app does with it.
    # Without the kernel module wg-quick falls back to wireguard-go (the official apps' userspace WireGuard).
    "qr_decode": ["zbarimg", "--raw", "-q", "{png}"],
    "wg_quick_up": ["env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
                    "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1", "wg-quick", "up", "{conf}"],
    # Prints "PUBLIC_KEY<TAB>ENDPOINT" per peer (see parse_wg_endpoints).
    "wg_endpoints": ["wg", "show", "{interface}", "endpoints"],
}


def command(which: str, **values) -> list[str]:
    return [part.format(**values) for part in COMMANDS[which]]


def signal_values(host: Host) -> dict:
    """The placeholders of signal_serve and invite_create, for the server on `host` (two addresses)."""
    return dict(db=host.dir / "signal.db", signal_ip=host.addr, signal_ip2=host.extra_addrs[0],
                signal_port=SIGNAL_PORT, stun_port=STUN_PORT, relay_tcp_port=RELAY_TCP_PORT, plain_port=PLAIN_PORT,
                endpoint=f"{host.addr}:{PLAIN_PORT}")


def plain_values(host: Host) -> dict:
    """The placeholders of qr_decode, wg_quick_up and wg_endpoints on the plain device `host`."""
    return dict(conf=host.dir / f"{PLAIN_IF}.conf", interface=PLAIN_IF)


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
    plain: bool = False         # a plain WireGuard device (`plain add`), not a meshwg node


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
                                      p.get("endpoint"), p.get("latency_ms"), bool(p.get("plain")))
    return NodeStatus(list(own), peers)


def route_state(routes_list: str, node: str, cidr: str) -> str | None:
    """The state `meshwg-signal routes list` shows for `node`'s route `cidr` ("pending", "approved",
    "rejected (not advertised)", ...); None while it has no row. Rows: NODE ROUTE STATE, after a header."""
    for line in routes_list.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] == node and parts[1] == cidr:
            return parts[2].strip()
    return None


def parse_wg_endpoints(text: str) -> list[str]:
    """`wg show IFACE endpoints` -> each peer's endpoint ("(none)" for a peer without one)."""
    return [line.split("\t", 1)[1].strip() for line in text.splitlines() if "\t" in line]


def bare_ipv4(addresses: list[str]) -> str | None:
    """The first IPv4 address, without a prefix length."""
    for a in addresses:
        ip = a.split("/")[0]
        if ":" not in ip:
            return ip
    return None

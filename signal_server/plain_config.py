"""wg-quick configs (and QR codes of them) for plain WireGuard peers: phones running a stock WireGuard app
(issue 12). Pure: the text is built with meshwg.config.wgquick, so the project's own parser reads it back.

    text = render_config(name="phone", addresses=["100.64.0.9/32", "fd7a:115c:a1e0::9/128"],
                         targets=[TargetNode("home", home_public_key, ["100.64.0.1/32", "192.168.1.0/24"])],
                         server_endpoint=("203.0.113.1", 51820), private_key=sk)   # or public_key=pk
    qr_terminal(text)   # the QR code as terminal text (ANSI colours, as `qrencode -t ansiutf8` prints)
    qr_png(text)        # the QR code as PNG bytes (write_qr_png(text, path) writes them atomically)

One [Peer] per target node: its PublicKey, Endpoint = the signal server's plain-WireGuard address (or the node's own
reachable endpoint, for `plain add --direct`), AllowedIPs = the node's mesh addresses plus its approved routes
(0.0.0.0/0, ::/0 for the exit node), PersistentKeepalive = 25 (keeps the phone's NAT mapping, and its place in the
relay's tables, alive). Given only the device's public key, the config has a comment where its own key goes.
When a target is reached through the relay, [Interface] says MTU = 1383: the relay delivers the device's datagram
to the node inside a RECV frame (37 B more), and 1383 + 37 + 32 (WireGuard) + 48 (IPv6 + UDP) = 1500, so a
full-size packet from the device is not fragmented on the server -> node leg (the node's own routes to a relayed
peer carry 1375 for its 45 B SEND frames: meshwg.mesh.path_mtu). A config whose targets are all --direct keeps
the app's default.
With the server's mesh domain, [Interface] says `DNS = <node>, <domain>`: the exit node, else the first target, answers
the device's queries (meshwg.mesh.dns_names).
segno is imported on first QR use: it loads urllib.request (sockets), which this pure module must not.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshwg.config import keys, wgquick
from meshwg.mesh.path_mtu import RECV_OVERHEAD

PERSISTENT_KEEPALIVE = 25
WIREGUARD_MTU = 1420                          # what wg-quick and the apps default to (WireGuard over IPv6)
RELAYED_MTU = WIREGUARD_MTU - RECV_OVERHEAD   # 1383: room for the relay's RECV header on the way to the node
EVERYTHING = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@dataclass(frozen=True)
class TargetNode:
    """A node the plain peer may reach. allowed_ips: its mesh addresses and approved routes (networks or text).
    endpoint: None for the relay (the server's plain-WireGuard address), else the node's own (host, port)."""

    name: str
    public_key: bytes
    allowed_ips: Sequence[object] = ()
    endpoint: tuple[str, int] | None = None


def _endpoint(value: tuple[str, int] | str) -> wgquick.Endpoint:
    if isinstance(value, str):
        return wgquick.parse_endpoint(value)
    host, port = value
    return wgquick.Endpoint(str(host), int(port))


def _networks(values: Iterable[object]) -> list:
    return [ipaddress.ip_network(v, strict=True) if isinstance(v, str) else v for v in values]


def render_config(*, name: str, addresses: Sequence[object], targets: Sequence[TargetNode],
                  server_endpoint: tuple[str, int] | str, private_key: bytes | None = None,
                  public_key: bytes | None = None, exit_node: bytes | None = None,
                  dns: tuple[str, str] | None = None) -> str:
    """The wg-quick config text. Exactly one of private_key / public_key; exit_node is a target's public key.
    dns: (a target node's mesh address, the mesh domain) for `DNS = <address>, <domain>`: the device asks that node
    for every name while the tunnel is up (wg-quick and the apps take the address as the nameserver and the name as
    a search domain, so `ssh home` finds home.<domain>); the node answers the mesh's names and forwards the rest.
    Raises ValueError (one line, naming the value) for a bad address, route or endpoint, or an unknown exit node."""
    if (private_key is None) == (public_key is None):
        raise ValueError("give the device's private key or its public key, not both or neither")
    if exit_node is not None and exit_node not in {t.public_key for t in targets}:
        raise ValueError(f"exit node {keys.key_to_base64(exit_node)} is not one of the nodes this peer may reach")
    relayed = any(t.endpoint is None for t in targets)
    iface = wgquick.InterfaceConfig(private_key=private_key,
                                    addresses=[ipaddress.ip_interface(a) if isinstance(a, str) else a
                                               for a in addresses],
                                    mtu=RELAYED_MTU if relayed else None,
                                    dns=[ipaddress.ip_address(dns[0])] if dns else [],
                                    dns_search=[dns[1]] if dns else [])
    iface.comments[wgquick.INTERFACE] = [f"# meshwg plain peer {name}"]
    if private_key is None:
        # Above the first line of the section, where PrivateKey goes: the device's key never leaves it.
        iface.comments["Address"] = [f"# PrivateKey = <this device's private key, whose public key is "
                                     f"{keys.key_to_base64(public_key)}>"]
    relay = _endpoint(server_endpoint)
    peers = []
    for t in targets:
        peer = wgquick.PeerConfig(
            public_key=t.public_key,
            allowed_ips=list(EVERYTHING) if t.public_key == exit_node else _networks(t.allowed_ips),
            endpoint=relay if t.endpoint is None else _endpoint(t.endpoint),
            persistent_keepalive=PERSISTENT_KEEPALIVE)
        peer.comments[wgquick.PEER] = [f"# node {t.name}" + (" (exit node)" if t.public_key == exit_node else "")]
        peers.append(peer)
    return wgquick.format_config(wgquick.WgQuickConfig(interface=iface, peers=peers))


def _qr(text: str):
    import segno  # noqa: PLC0415 - see the module docstring

    return segno.make_qr(text, error="l")  # segno raises the level when the data leaves room


def qr_terminal(text: str) -> str:
    """The QR code of `text` as terminal text (ANSI reverse video, two columns per module, quiet zone included)."""
    out = io.StringIO()
    _qr(text).terminal(out=out)
    return out.getvalue()


def qr_png(text: str, scale: int = 4) -> bytes:
    out = io.BytesIO()
    _qr(text).save(out, kind="png", scale=scale)
    return out.getvalue()


def write_qr_png(text: str, path: str) -> None:
    from meshwg.fsutil import atomic_write  # noqa: PLC0415 - the one write, kept out of the pure part

    atomic_write(path, qr_png(text), mode=0o600)  # the picture holds a private key

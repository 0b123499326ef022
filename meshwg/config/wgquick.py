"""wg-quick configuration files: parse, format, strip, and turn into a UAPI `set` request.

The format is the INI dialect of wg(8) "CONFIGURATION FILE FORMAT" plus the wg-quick(8) extensions
(Address, DNS, Table, MTU, Pre/PostUp, Pre/PostDown, SaveConfig). Keys and section names are
case-insensitive; everything from `#` to the end of a line is a comment.

    config = parse(text, filename="wg0.conf")      # -> WgQuickConfig, or raises ConfigError
    text = format_config(config)                   # canonical text; format(parse(x)) is a fixed point
    wg_only = strip(text, filename="wg0.conf")     # same bytes as `wg-quick strip` (after validating)
    request = to_set_request(config)               # uapi.SetRequest, to apply in-process
    text = to_uapi_set(config)                     # the same as "set=1\\n...\\n\\n" for a UAPI socket

Comments survive a parse/format round trip: a comment is attached to the key (or section header)
that follows it; an inline comment (`Key = value # note`) is attached to its own key and is
written on the line above it. Comments after the last key of the file are kept in
`WgQuickConfig.trailing_comments`.

Deliberately stricter than wg(8), to catch mistakes early: a single-valued key given twice, two
[Interface] sections, and two peers with one PublicKey are errors. A [Peer] whose PublicKey is the
interface's own public key is dropped (the "shared peers.conf" trick) and listed in
`ignored_peers`. Endpoint hostnames are kept as text; resolving them is the caller's job.

Pure module: no I/O, no DNS.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, Union

from meshwg.config import keys, uapi
from meshwg.errors import ConfigError

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_UINT_RE = re.compile(r"[0-9]+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_TABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# wg-quick's own test for "is this DNS entry an IP?" (linux.bash parse_options)
_DNS_IP_RE = re.compile(r"[0-9.]+|.*:.*")

_WS = " \t\n\v\f\r"  # C isspace(): what wg(8) and wg-quick treat as blank; other characters are content

INTERFACE = "[Interface]"
PEER = "[Peer]"


@dataclass(frozen=True)
class Endpoint:
    """host:port as written; host is an IP literal (v6 without brackets) or an unresolved hostname."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class InterfaceConfig:
    private_key: bytes | None = None
    listen_port: int | None = None
    fwmark: int | None = None  # 0 = explicitly off
    addresses: list[IPInterface] = field(default_factory=list)
    dns: list[IPAddress] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    table: str | None = None  # "off", "auto", a decimal table number, or a table name
    mtu: int | None = None
    pre_up: list[str] = field(default_factory=list)
    post_up: list[str] = field(default_factory=list)
    pre_down: list[str] = field(default_factory=list)
    post_down: list[str] = field(default_factory=list)
    save_config: bool | None = None
    comments: dict[str, list[str]] = field(default_factory=dict)  # canonical key or "[Interface]" -> lines
    line: int | None = field(default=None, compare=False)  # where the section header was

    @property
    def public_key(self) -> bytes | None:
        return None if self.private_key is None else keys.public_key(self.private_key)


@dataclass
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None  # 0 = explicitly off
    comments: dict[str, list[str]] = field(default_factory=dict)  # canonical key or "[Peer]" -> lines
    line: int | None = field(default=None, compare=False)


@dataclass
class WgQuickConfig:
    interface: InterfaceConfig | None = None
    peers: list[PeerConfig] = field(default_factory=list)
    trailing_comments: list[str] = field(default_factory=list)
    ignored_peers: list[bytes] = field(default_factory=list, compare=False)


# Canonical key spelling -> (section, attribute, kind). Order here is the output order.
_INTERFACE_KEYS = {
    "PrivateKey": ("private_key", "single"),
    "ListenPort": ("listen_port", "single"),
    "FwMark": ("fwmark", "single"),
    "Address": ("addresses", "list"),
    "DNS": ("dns", "list"),
    "Table": ("table", "single"),
    "MTU": ("mtu", "single"),
    "SaveConfig": ("save_config", "single"),
    "PreUp": ("pre_up", "hook"),
    "PostUp": ("post_up", "hook"),
    "PreDown": ("pre_down", "hook"),
    "PostDown": ("post_down", "hook"),
}
_PEER_KEYS = {
    "PublicKey": ("public_key", "single"),
    "PresharedKey": ("preshared_key", "single"),
    "AllowedIPs": ("allowed_ips", "list"),
    "Endpoint": ("endpoint", "single"),
    "PersistentKeepalive": ("persistent_keepalive", "single"),
}
_WG_QUICK_ONLY = {"address", "dns", "table", "mtu", "preup", "postup", "predown", "postdown", "saveconfig"}
_CANON = {name.lower(): name for name in (*_INTERFACE_KEYS, *_PEER_KEYS)}


# ---------------------------------------------------------------- value parsers (raise ValueError)


def _parse_key(value: str) -> bytes:
    try:
        return keys.key_from_base64(value)
    except keys.KeyFormatError as err:
        raise ValueError(str(err)) from None


def _split_list(value: str) -> list[str]:
    # wg-quick (Address, DNS) turns commas into spaces and word-splits: "a, b" and "a b" both work.
    return [item for item in re.split(r"[, \t\n\v\f\r]+", value) if item]


def _check_prefix_text(text: str, max_len: int) -> None:
    if "/" in text:
        addr, _, plen = text.partition("/")
        if not _UINT_RE.fullmatch(plen) or len(plen) > 3 or int(plen) > max_len:
            raise ValueError(f"bad CIDR prefix length: {text!r}")
    if "%" in text:
        raise ValueError(f"scoped addresses are not allowed: {text!r}")


def parse_address(text: str) -> IPInterface:
    """An interface address `IP[/len]` (host bits kept: 10.0.0.1/24)."""
    try:
        bare = text.partition("/")[0]
        ip = ipaddress.ip_address(bare)
        _check_prefix_text(text, ip.max_prefixlen)
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"bad address (want IP or IP/CIDR): {text!r}") from None


def parse_allowed_ip(text: str) -> IPNetwork:
    """An AllowedIPs entry `IP[/len]`; host bits are masked off as the kernel does (10.0.0.1/24 -> 10.0.0.0/24)."""
    try:
        bare = text.partition("/")[0]
        ip = ipaddress.ip_address(bare)
        _check_prefix_text(text, ip.max_prefixlen)
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"bad CIDR: {text!r}") from None


def parse_endpoint(text: str) -> Endpoint:
    """`host:port`, `1.2.3.4:port` or `[v6]:port`; hostnames are validated, not resolved."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad endpoint (want [IPv6]:port): {text!r}")
        port_text = rest[1:]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address in endpoint: {text!r}") from None
        if ip.version != 6:
            raise ValueError(f"brackets are for IPv6 endpoints: {text!r}")
        host = str(ip)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad endpoint (want host:port): {text!r}")
        if ":" in host:
            raise ValueError(f"IPv6 endpoints need brackets ([addr]:port): {text!r}")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if _looks_like_ipv4(host) or not _HOSTNAME_RE.fullmatch(host) or len(host) > 253:
                raise ValueError(f"bad endpoint host: {host!r}") from None
    port = uapi.parse_uint(port_text, 1, 65535, "port")
    return Endpoint(host, port)


def _looks_like_ipv4(host: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", host))


def _parse_table(value: str) -> str:
    low = value.lower()
    if low in ("off", "auto"):
        return low
    if _UINT_RE.fullmatch(value):
        return str(uapi.parse_uint(value, 0, 2**32 - 1, "table"))
    if _TABLE_NAME_RE.fullmatch(value):
        return value  # a name from /etc/iproute2/rt_tables, e.g. "main"
    raise ValueError(f"bad table (want a number, off, auto or a table name): {value!r}")


def _parse_fwmark(value: str) -> int:
    if value.lower() == "off":
        return 0
    if value.startswith("0x"):  # lowercase x only, as wg(8) parses it
        if not re.fullmatch(r"[0-9a-fA-F]+", value[2:]):
            raise ValueError(f"bad fwmark: {value!r}")
        number = int(value[2:], 16)
        if number > 2**32 - 1:
            raise ValueError(f"fwmark out of range ({value}, want 32 bits)")
        return number
    return uapi.parse_uint(value, 0, 2**32 - 1, "fwmark")


def _parse_keepalive(value: str) -> int:
    return 0 if value.lower() == "off" else uapi.parse_uint(value, 0, 65535, "persistent keepalive")


def _parse_bool(value: str) -> bool:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    raise ValueError(f"want true or false, got {value!r}")


def _parse_dns(value: str, iface: InterfaceConfig) -> None:
    for item in _split_list(value):
        if _DNS_IP_RE.fullmatch(item):
            try:
                iface.dns.append(ipaddress.ip_address(item))
            except ValueError:
                raise ValueError(f"bad DNS server address: {item!r}") from None
        elif _HOSTNAME_RE.fullmatch(item) and len(item) <= 253:
            iface.dns_search.append(item)
        else:
            raise ValueError(f"bad DNS search domain: {item!r}")


# ---------------------------------------------------------------- parse


class _Section:
    def __init__(self, kind: str, line: int, comments: list[str]):
        self.kind = kind
        self.line = line
        self.seen: set[str] = set()
        self.obj: InterfaceConfig | PeerConfig
        self.key_lines: dict[str, int] = {}
        if kind == INTERFACE:
            self.obj = InterfaceConfig(line=line)
        else:
            self.obj = PeerConfig(public_key=keys.ZERO_KEY, line=line)
        if comments:
            self.obj.comments[kind] = list(comments)


def parse(
    text: str,
    filename: str = "<config>",
    *,
    require_private_key: bool = True,
    own_public_key: bytes | None = None,
) -> WgQuickConfig:
    """Parse a wg-quick config; raises ConfigError(filename, line, key) for the first mistake.

    require_private_key=False accepts files without [Interface] or PrivateKey (a shared peers.conf,
    or a config whose key is set by a PostUp hook). own_public_key drops that peer as well (for a
    peers file parsed apart from its interface).
    """
    config = WgQuickConfig()
    sections: list[_Section] = []
    current: _Section | None = None
    pending: list[str] = []  # comments waiting for the next key or section

    for lineno, raw in enumerate(text.split("\n"), start=1):
        body, hash_, comment = raw.partition("#")
        body = body.strip(_WS)
        comment = (hash_ + comment).strip(_WS)
        if not body:
            if comment:
                pending.append(comment)
            continue
        if body.startswith("["):
            kind = {"[interface]": INTERFACE, "[peer]": PEER}.get(body.lower())
            if kind is None:
                raise ConfigError("unknown section (want [Interface] or [Peer])", filename=filename, line=lineno, key=_shown(body))
            if kind == INTERFACE and any(s.kind == INTERFACE for s in sections):
                raise ConfigError("duplicate [Interface] section", filename=filename, line=lineno, key=INTERFACE)
            if comment:
                pending.append(comment)
            current = _Section(kind, lineno, pending)
            pending = []
            sections.append(current)
            continue
        key_text, eq, value = body.partition("=")
        key_text, value = key_text.strip(_WS), value.strip(_WS)
        if not eq:
            raise ConfigError("expected `Key = value`", filename=filename, line=lineno, key=_shown(key_text))
        if current is None:
            raise ConfigError("key outside a section (add [Interface] or [Peer] above it)", filename=filename, line=lineno, key=_shown(key_text))
        canon = _CANON.get(key_text.lower())
        table = _INTERFACE_KEYS if current.kind == INTERFACE else _PEER_KEYS
        if canon not in table:
            raise ConfigError(f"unknown key in {current.kind}", filename=filename, line=lineno, key=_shown(key_text))
        attr, kind = table[canon]
        if kind == "single" and canon in current.seen:
            first = current.key_lines[canon]
            raise ConfigError(f"duplicate key (first set on line {first})", filename=filename, line=lineno, key=canon)
        current.seen.add(canon)
        current.key_lines.setdefault(canon, lineno)
        if comment:
            pending.append(comment)
        if pending:
            current.obj.comments.setdefault(canon, []).extend(pending)
            pending = []
        try:
            _apply(current.obj, canon, attr, kind, value)
        except ValueError as err:
            raise ConfigError(str(err), filename=filename, line=lineno, key=canon) from None

    config.trailing_comments = pending
    _finish(config, sections, filename, require_private_key, own_public_key)
    return config


def _shown(text: str) -> str:
    """User text safe to print on one line (errors must stay one line)."""
    if not text:
        return "(empty key)"
    text = text if len(text) <= 80 else text[:77] + "..."
    return text if text.isprintable() else repr(text)[1:-1]


def _apply(obj, canon: str, attr: str, kind: str, value: str) -> None:
    if kind == "hook":
        getattr(obj, attr).append(value)
        return
    if canon == "Address":
        obj.addresses.extend(parse_address(item) for item in _split_list(value))
    elif canon == "DNS":
        _parse_dns(value, obj)
    elif canon == "AllowedIPs":
        # wg(8) wants a comma list with no empty items (whitespace around commas is fine)
        if not value:
            raise ValueError("missing value")
        obj.allowed_ips.extend(parse_allowed_ip(item.strip(_WS)) for item in value.split(","))
    elif not value:
        raise ValueError("missing value")
    elif canon in ("PrivateKey", "PublicKey", "PresharedKey"):
        setattr(obj, attr, _parse_key(value))
    elif canon == "ListenPort":
        obj.listen_port = uapi.parse_uint(value, 0, 65535, "port")
    elif canon == "FwMark":
        obj.fwmark = _parse_fwmark(value)
    elif canon == "Table":
        obj.table = _parse_table(value)
    elif canon == "MTU":
        obj.mtu = uapi.parse_uint(value, 68, 65535, "MTU")
    elif canon == "SaveConfig":
        obj.save_config = _parse_bool(value)
    elif canon == "Endpoint":
        obj.endpoint = parse_endpoint(value)
    elif canon == "PersistentKeepalive":
        obj.persistent_keepalive = _parse_keepalive(value)
    else:  # pragma: no cover - the key tables and this chain must agree
        raise AssertionError(canon)


def _finish(config, sections, filename, require_private_key, own_public_key) -> None:
    for section in sections:
        _move_orphan_comments(section.obj, section.kind)
    interfaces = [s for s in sections if s.kind == INTERFACE]
    if interfaces:
        config.interface = interfaces[0].obj
    if require_private_key:
        if config.interface is None:
            raise ConfigError("missing [Interface] section", filename=filename, line=1, key=INTERFACE)
        if config.interface.private_key is None:
            raise ConfigError("missing PrivateKey in [Interface]", filename=filename, line=interfaces[0].line, key="PrivateKey")
    own = {k for k in (own_public_key, config.interface and config.interface.public_key) if k}
    seen: dict[bytes, int] = {}
    for section in sections:
        if section.kind != PEER:
            continue
        peer = section.obj
        if "PublicKey" not in section.seen:
            raise ConfigError("missing PublicKey in [Peer]", filename=filename, line=section.line, key="PublicKey")
        if peer.public_key in seen:
            raise ConfigError(
                f"duplicate PublicKey (peer on line {seen[peer.public_key]})",
                filename=filename, line=section.key_lines["PublicKey"], key="PublicKey",
            )
        seen[peer.public_key] = section.line
        if peer.public_key in own:
            config.ignored_peers.append(peer.public_key)  # wg ignores a peer that is ourselves
        else:
            config.peers.append(peer)


def _emitted_keys(obj) -> set[str]:
    return {canon for canon, _value in _lines(obj)}


def _move_orphan_comments(obj, header: str) -> None:
    # A comment above a key that produces no output line (e.g. an empty `Address =`) would have
    # nowhere to go; keep it above the section header so formatting stays a fixed point.
    emitted = _emitted_keys(obj) | {header}
    orphans = [c for k, cs in obj.comments.items() if k not in emitted for c in cs]
    if orphans:
        obj.comments = {k: v for k, v in obj.comments.items() if k in emitted}
        obj.comments[header] = obj.comments.get(header, []) + orphans
        # header first so the dict order matches output order (equality ignores order anyway)


# ---------------------------------------------------------------- format


def _lines(obj) -> list[tuple[str, str]]:
    """(canonical key, value text) in output order."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, InterfaceConfig):
        if obj.private_key is not None:
            out.append(("PrivateKey", keys.key_to_base64(obj.private_key)))
        if obj.listen_port is not None:
            out.append(("ListenPort", str(obj.listen_port)))
        if obj.fwmark is not None:
            out.append(("FwMark", "off" if obj.fwmark == 0 else f"0x{obj.fwmark:x}"))
        if obj.addresses:
            out.append(("Address", ", ".join(str(a) for a in obj.addresses)))
        if obj.dns or obj.dns_search:
            out.append(("DNS", ", ".join([*(str(d) for d in obj.dns), *obj.dns_search])))
        if obj.table is not None:
            out.append(("Table", obj.table))
        if obj.mtu is not None:
            out.append(("MTU", str(obj.mtu)))
        if obj.save_config is not None:
            out.append(("SaveConfig", "true" if obj.save_config else "false"))
        for canon, attr in (("PreUp", "pre_up"), ("PostUp", "post_up"), ("PreDown", "pre_down"), ("PostDown", "post_down")):
            out.extend((canon, cmd) for cmd in getattr(obj, attr))
    else:
        out.append(("PublicKey", keys.key_to_base64(obj.public_key)))
        if obj.preshared_key is not None:
            out.append(("PresharedKey", keys.key_to_base64(obj.preshared_key)))
        if obj.allowed_ips:
            out.append(("AllowedIPs", ", ".join(str(n) for n in obj.allowed_ips)))
        if obj.endpoint is not None:
            out.append(("Endpoint", str(obj.endpoint)))
        if obj.persistent_keepalive is not None:
            out.append(("PersistentKeepalive", "off" if obj.persistent_keepalive == 0 else str(obj.persistent_keepalive)))
    return out


def _format_section(obj, header: str) -> list[str]:
    body = _lines(obj)
    emitted = {canon for canon, _ in body} | {header}
    out = list(obj.comments.get(header, []))
    out += [c for k, cs in obj.comments.items() if k not in emitted for c in cs]
    out.append(header)
    done: set[str] = set()
    for canon, value in body:
        if canon not in done:
            out.extend(obj.comments.get(canon, []))
            done.add(canon)
        out.append(f"{canon} = {value}" if value else f"{canon} =")
    return out


def format_config(config: WgQuickConfig) -> str:
    """Canonical wg-quick text: one section per block, keys in a fixed order, comments kept."""
    blocks: list[list[str]] = []
    if config.interface is not None:
        blocks.append(_format_section(config.interface, INTERFACE))
    blocks.extend(_format_section(peer, PEER) for peer in config.peers)
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        lines.extend(block)
    if config.trailing_comments:
        if lines:
            lines.append("")
        lines.extend(config.trailing_comments)
    return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------- strip and UAPI


def strip(text: str, filename: str = "<config>") -> str:
    """The wg(8)-only form, byte for byte what `wg-quick strip` prints for a valid file.

    The file is validated first (ConfigError on mistakes), but a missing PrivateKey is allowed,
    as for `wg addconf` of a shared peers file. The output is built from the original lines like
    wg-quick does, so comments and spelling are kept.
    """
    parse(text, filename, require_private_key=False)
    out = []
    in_interface = False
    if text.endswith("\n"):
        text = text[:-1]
    for line in text.split("\n"):
        line = line.strip(" \t")  # bash `read -r` trims IFS whitespace
        key = line.partition("#")[0].partition("=")[0].strip(" \t\n\v\f\r")  # bash [[:space:]]
        if key.startswith("["):
            in_interface = key.lower() == "[interface]"
        if in_interface and key.lower() in _WG_QUICK_ONLY:
            continue
        out.append(line + "\n")
    return "".join(out) + "\n"  # wg-quick's `echo "$WG_CONFIG"` adds one more newline


def to_set_request(
    config: WgQuickConfig,
    *,
    resolve: Callable[[str, int], tuple[str, int]] | None = None,
    replace_peers: bool = True,
) -> uapi.SetRequest:
    """The UAPI SetRequest equivalent to `wg setconf` of this config (apply it in-process, or format it).

    replace_peers=True is setconf (absent private key / port / fwmark are sent as zero, peers replaced);
    False is addconf (only what the file sets).

    Endpoint hostnames are passed to resolve(host, port) -> (ip, port); without a resolver a
    hostname endpoint raises ConfigError (this module does no DNS).
    """
    request = uapi.SetRequest(replace_peers=replace_peers)
    iface = config.interface or InterfaceConfig()
    # The private key goes as written, like wg: the device clamps on load, and zeros mean "no key".
    request.private_key = iface.private_key
    request.listen_port = iface.listen_port
    request.fwmark = iface.fwmark
    if replace_peers:
        # setconf replaces the whole device, so wg sends unset values as "none" (verified with wg 1.0.20210914)
        request.private_key = keys.ZERO_KEY if request.private_key is None else request.private_key
        request.listen_port = request.listen_port or 0
        request.fwmark = request.fwmark or 0
    for peer in config.peers:
        request.peers.append(
            uapi.PeerUpdate(
                public_key=peer.public_key,
                preshared_key=peer.preshared_key,
                endpoint=None if peer.endpoint is None else _uapi_endpoint(peer, resolve),
                persistent_keepalive_interval=peer.persistent_keepalive,
                replace_allowed_ips=True,
                allowed_ips=[uapi.AllowedIPChange(net) for net in peer.allowed_ips],
            )
        )
    return request


def to_uapi_set(
    config: WgQuickConfig,
    *,
    resolve: Callable[[str, int], tuple[str, int]] | None = None,
    replace_peers: bool = True,
) -> str:
    """The whole UAPI request text ("set=1\\n" ... "\\n") that configures a device like `wg setconf`."""
    return uapi.format_set_request(to_set_request(config, resolve=resolve, replace_peers=replace_peers))


def _uapi_endpoint(peer: PeerConfig, resolve) -> tuple[str, int]:
    ep = peer.endpoint
    if ep.ip is not None:
        return ep.host, ep.port
    if resolve is None:
        raise ConfigError(f"endpoint hostname {ep.host!r} must be resolved first", line=peer.line, key="Endpoint")
    host, port = resolve(ep.host, ep.port)
    return str(ipaddress.ip_address(host)), port

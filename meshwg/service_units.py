"""systemd units and starter config files for `meshwg join`, `meshwg-signal serve` and `meshwg-signal relay`, rendered from the install's
paths (meshwg/commands/service.py writes them). Pure: text in, text out.

The units are Type=notify (meshwg/sdnotify.py: READY=1 once the node has its welcome and its interface / once every
listener of the server is bound) and hardened no further than what the programs do:
- the agent opens /dev/net/tun, configures addresses, routes and policy rules (`ip`, netlink), nftables (`nft`),
  SO_MARK on its sockets (CAP_NET_ADMIN), answers DNS on port 53 of its mesh addresses, writes /proc/sys/net
  (forwarding, src_valid_mark: subnet routes and exit nodes, so no ProtectKernelTunables=), /etc/resolv.conf with
  --accept-dns when systemd-resolved is absent (resolvectl otherwise, over D-Bus), its state in /var/lib/meshwg and
  its UAPI and status sockets in /run/wireguard (where `wg` looks);
- the server binds TCP and UDP ports (below 1024 too when signal.toml asks: relay TCP on 443), reads the host's
  routes (`ip -j route`) and writes its database (and admin socket) in /var/lib/meshwg-signal.
"""

from __future__ import annotations

import posixpath

AGENT_UNIT = "meshwg.service"
SERVER_UNIT = "meshwg-signal.service"
RELAY_UNIT = "meshwg-signal-relay.service"   # `meshwg-signal relay`: STUN + relay only, on another host or beside
AGENT_STATE = "/var/lib/meshwg"
SERVER_STATE = "/var/lib/meshwg-signal"
UAPI_RUN_DIR = "wireguard"   # /run/wireguard (meshwg.io.ipc.uapi_server.RUN_DIR is /var/run/wireguard)

# Options both units share: nothing here stops what the programs do (module docstring).
_COMMON_HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallErrorNumber=EPERM",
    "UMask=0077",
)


def quote(arg: str) -> str:
    """One ExecStart= word: quoted when it holds blanks or quotes; '%' (specifiers) and '$' (variables) doubled."""
    text = str(arg).replace("%", "%%").replace("$", "$$")
    if not text or any(c.isspace() or c in "\"'\\;" for c in text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def exec_line(argv) -> str:
    return " ".join(quote(a) for a in argv)


def _state_lines(state_dir: str, default: str) -> list[str]:
    """StateDirectory= for the default place (created 0700 by systemd); ReadWritePaths= for another one."""
    state_dir = posixpath.normpath(state_dir)
    if state_dir == default:
        return [f"StateDirectory={posixpath.basename(default)}", "StateDirectoryMode=0700"]
    return [f"ReadWritePaths={quote(state_dir)}"]


def _unit(description: str, after: str, service: list[str]) -> str:
    lines = ["# Written by `meshwg service install` / `meshwg-signal service install`; the uninstall command removes it.",
             "[Unit]", f"Description={description}",
             f"Wants={after}", f"After={after}", "", "[Service]", *service, "", "[Install]",
             "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def agent_unit(executable: list[str], config: str, state_dir: str = AGENT_STATE) -> str:
    """meshwg.service: `meshwg --config CONFIG join` (the invite, name and routes come from the config file;
    a registered node starts from its state directory with no invite). executable: the argv that runs `meshwg`."""
    service = [
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_line([*executable, '--config', config, 'join'])}",
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=2",   # a mistake in the config file: restarting does not fix it
        # A first join waits for the server's welcome before READY=1; a registered node is ready from its cache.
        "TimeoutStartSec=120",
        "TimeoutStopSec=30",            # SIGTERM: the agent removes its interface, routes and nftables table
        *_state_lines(state_dir, AGENT_STATE),
        f"RuntimeDirectory={UAPI_RUN_DIR}",
        "RuntimeDirectoryPreserve=yes",  # shared with wg-quick and other WireGuard daemons
        "RuntimeDirectoryMode=0755",
        # --accept-dns without systemd-resolved edits /etc/resolv.conf in place (meshwg/io/oscfg/resolver.py).
        "ReadWritePaths=-/etc/resolv.conf",
        # NET_BIND_SERVICE: the node answers DNS on port 53 of its mesh addresses.
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/net/tun rw",
        # Not ProtectKernelTunables=: subnet routes and exit nodes write /proc/sys/net (forwarding, src_valid_mark).
        *_COMMON_HARDENING,
    ]
    return _unit("meshwg mesh VPN node (meshwg join)", "network-online.target", service)


def server_unit(executable: list[str], config: str, db: str = SERVER_STATE + "/signal.db",
                command: str = "serve") -> str:
    """meshwg-signal.service: `meshwg-signal --config CONFIG serve` (or `relay`). db: the database the config names
    (its directory must be writable: StateDirectory= for the default one)."""
    service = [
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_line([*executable, '--config', config, command])}",
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=2",
        "TimeoutStopSec=30",             # SIGTERM: sessions end, their last_seen is written
        "LimitNOFILE=65536",             # one descriptor per connection (the relay takes a share of the limit)
        *_state_lines(posixpath.dirname(posixpath.abspath(db)), SERVER_STATE),
        # Ports below 1024 when signal.toml names them (relay TCP on 443 passes port-based firewalls).
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        *_COMMON_HARDENING,
    ]
    return _unit(f"meshwg signal server (meshwg-signal {command})", "network-online.target", service)


def agent_config(path: str, state_dir: str = AGENT_STATE, invite_file: str | None = None) -> str:
    """A starter /etc/meshwg/meshwg.toml (mode 0600: it may come to hold the invite)."""
    invite = (f'invite-file = "{invite_file}"   # the first join only; once registered, remove this line and the file'
              if invite_file else
              '# invite-file = "/etc/meshwg/invite.txt"   # the first join only (mode 0600): `meshwg-signal invite create`')
    return "\n".join([
        f"# {path}: options of meshwg.service (`meshwg join`) and the other meshwg commands.",
        "# Keys are the long option names (`meshwg join --help`); written by `meshwg service install`.",
        'interface = "meshwg0"',
        f'state-dir = "{state_dir}"',
        "",
        "[join]",
        invite,
        '# name = "laptop"',
        '# advertise-routes = "192.168.1.0/24"',
        "",
    ])


def server_config(path: str, db: str) -> str:
    """A starter /etc/meshwg/signal.toml."""
    return "\n".join([
        f"# {path}: options of meshwg-signal.service (`meshwg-signal serve`) and the admin commands.",
        "# Keys are the long option names (`meshwg-signal serve --help`); written by `meshwg-signal service install`.",
        f'db = "{db}"',
        "",
        "[serve]",
        '# listen = ["0.0.0.0:7300"]',
        '# advertise = "vpn.example.org"     # the name put in invites',
        '# udp = ["0.0.0.0:3478"]',
        '# relay-tcp = ["0.0.0.0:7301"]',
        '# metrics = ["127.0.0.1:9300"]',
        "",
    ])

"""`meshwg up CONFIG`, `meshwg down CONFIG|IFACE`, `meshwg save CONFIG|IFACE`, `meshwg show [IFACE] [--json]`.

wg-quick(8) semantics without wireguard-tools: the interface is named after the file; the device is
a meshwg-tun daemon configured over UAPI; addresses, MTU, routes for every AllowedIPs prefix (Table
auto/off/N; /0 through a fwmark, policy routing and wg-quick's nftables rules, here in table
`meshwg-IFACE`), DNS through resolvconf (a one-line warning when it is absent), Pre/Post Up/Down
hooks with %i, SaveConfig on down. `up` records its config in /var/run/meshwg/IFACE.json so that
`down IFACE` finds it. All network changes go through meshwg.io.oscfg.netconfig.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import time

from meshwg.commands.common import IFACE_RE, human_bytes
from meshwg.errors import UserError
from meshwg.fsutil import atomic_write

log = logging.getLogger(__name__)

CONFIG_DIR = "/etc/wireguard"


def _resolve_config(arg: str) -> tuple[str, str | None]:
    """(interface, config path or None), as wg-quick resolves its CONFIG_FILE argument."""
    if _is_iface_name(arg):
        path = os.path.join(CONFIG_DIR, f"{arg}.conf")
        return arg, (path if os.path.exists(path) else None)
    base = os.path.basename(arg)
    if not base.endswith(".conf"):
        raise UserError(f"the config file must be a valid interface name, followed by .conf: {arg}")
    iface = base[:-5]
    if not IFACE_RE.fullmatch(iface):
        raise UserError(f"the config file must be a valid interface name, followed by .conf: {arg}")
    return iface, arg


def _is_iface_name(arg: str) -> bool:
    return "/" not in arg and bool(IFACE_RE.fullmatch(arg)) and not arg.endswith(".conf")


def _load(path: str):
    from meshwg.commands.config import read_config_text
    from meshwg.config import wgquick

    text = read_config_text(path)
    real = os.path.realpath(path)
    try:
        # wg-quick's check: others can reach the private key only if both file and directory let them.
        if os.stat(real).st_mode & os.stat(os.path.dirname(real)).st_mode & 0o007:
            _warn(f"`{real}' is world accessible")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    return wgquick.parse(text, filename=path)


def _warn(message: str) -> None:
    print(f"meshwg: warning: {message}", file=sys.stderr)


def _resolve_host(host: str, port: int) -> tuple[str, int]:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise UserError(f"cannot resolve endpoint {host}: {err}") from None
    return info[0][4][0], port


# ---------------------------------------------------------------------------------------- state
# `meshwg up` records which config brought an interface up, so `meshwg down IFACE` (no file) can
# still run its hooks and DNS cleanup. Keyed by name like /var/run/wireguard, so the network
# namespace is recorded too: a same-named interface in another namespace is not ours.

STATE_DIR = "/var/run/meshwg"


def _state_path(iface: str) -> str:
    return os.path.join(STATE_DIR, f"{iface}.json")


def _netns_id() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def _write_state(iface: str, config_path: str) -> None:
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    state = {"interface": iface, "config": os.path.realpath(config_path), "netns": _netns_id(), "pid": os.getpid()}
    atomic_write(_state_path(iface), (json.dumps(state) + "\n").encode(), 0o600)


def _read_state(iface: str) -> dict | None:
    try:
        with open(_state_path(iface)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("netns") != _netns_id() or not isinstance(state.get("config"), str):
        return None
    return state


def _remove_state(iface: str) -> None:
    if _read_state(iface) is not None:
        try:
            os.unlink(_state_path(iface))
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------- up


def cmd_up(args) -> int:
    from meshwg.config import wgquick
    from meshwg.io.oscfg import netconfig
    from meshwg.io.ipc import uapi_client

    iface, path = _resolve_config(args.config)
    if path is None:
        raise UserError(f"no configuration file for {iface}")
    config = _load(path)
    if netconfig.link_exists(iface):
        raise UserError(f"{iface} already exists")
    itf = config.interface
    try:
        for hook in itf.pre_up:
            netconfig.run_hook(hook, iface)
        _start_daemon(iface, getattr(args, "log_level", None), getattr(args, "log_format", None))
        uapi_client.set_text(iface, wgquick.to_uapi_set(config, resolve=_resolve_host))
        for address in itf.addresses:
            netconfig.add_address(iface, str(address))
        hosts = [p.endpoint.host for p in config.peers if p.endpoint is not None and p.endpoint.ip is not None]
        netconfig.set_mtu_up(iface, itf.mtu or netconfig.default_mtu(hosts))
        if itf.dns and not netconfig.set_dns(iface, [str(d) for d in itf.dns], itf.dns_search):
            _warn(f"resolvconf is not installed: DNS = {', '.join(str(d) for d in itf.dns)} not applied, "
                  "system DNS left unchanged")
        prefixes = netconfig.sorted_prefixes(n for p in config.peers for n in p.allowed_ips)
        fwmark = itf.fwmark or 0
        for prefix in prefixes:
            if prefix.endswith("/0") and itf.table in (None, "auto"):
                if not fwmark:
                    fwmark = netconfig.pick_fwmark_table()
                    uapi_client.set_text(iface, f"set=1\nfwmark={fwmark}\n\n")
                netconfig.add_default_route(iface, prefix, fwmark)
                netconfig.add_firewall(iface, prefix, fwmark)
            else:
                netconfig.add_route(iface, prefix, itf.table)
        _write_state(iface, path)
        for hook in itf.post_up:
            netconfig.run_hook(hook, iface)
    except BaseException as err:
        # Like wg-quick's trap (del_if): undo what was done, without Down hooks or SaveConfig.
        _teardown(iface, config, quiet=True, hooks=False)
        _remove_state(iface)
        if isinstance(err, (netconfig.NetconfigError, OSError)):
            raise UserError(f"{iface} not brought up: {err}") from None
        raise
    return 0


def _start_daemon(iface: str, log_level: str | None = None, log_format: str | None = None) -> None:
    """meshwg-tun for `iface`, logging at our --log-level in our --log-format (to MESHWG_LOG_FILE if set)."""
    env = daemon_env(os.environ, log_level, log_format)
    proc = subprocess.run([sys.executable, "-m", "meshwg.commands.tun_launcher", iface], check=False, env=env,
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise UserError(proc.stderr.strip() or f"meshwg-tun {iface} failed")


def daemon_env(environ, log_level: str | None, log_format: str | None) -> dict:
    """meshwg-tun's environment: ours, daemonizing, with our log level and format in its variables (LOG_LEVEL,
    MESHWG_LOG_FORMAT), which it reads as wireguard-go does. The CLI's defaults (warning, text) leave a variable
    the caller set alone: `MESHWG_LOG_FORMAT=json meshwg up` keeps working."""
    env = dict(environ)
    env.pop("WG_PROCESS_FOREGROUND", None)
    for var, value, default in (("LOG_LEVEL", log_level, "warning"), ("MESHWG_LOG_FORMAT", log_format, "text")):
        if value and (value != default or var not in env):
            env[var] = value
    return env


# ---------------------------------------------------------------------------------------- down


def cmd_down(args) -> int:
    iface, path = _resolve_config(args.config)
    if _is_iface_name(args.config):
        # The file `up` used wins over /etc/wireguard/IFACE.conf: it is the one that brought it up.
        state = _read_state(iface)
        if state is not None:
            if os.path.exists(state["config"]):
                path = state["config"]
            else:
                _warn(f"{state['config']} (which brought {iface} up) is gone: its Down hooks and DNS are skipped")
    config = _load(path) if path is not None else None
    if not _is_wireguard(iface):
        _remove_state(iface)
        raise UserError(f"{iface} is not a WireGuard interface")
    try:
        _teardown(iface, config, quiet=False, hooks=True, save_path=path)
    finally:
        _remove_state(iface)
    return 0


def _is_wireguard(iface: str) -> bool:
    """wg-quick's test (`wg show interfaces`): a UAPI socket, and the link here, so that
    `down eth0` never deletes a link that is not a WireGuard device."""
    from meshwg.io.oscfg import netconfig
    from meshwg.io.ipc import uapi_client

    return iface in uapi_client.list_interfaces() and netconfig.link_exists(iface)


def _teardown(iface: str, config, *, quiet: bool, hooks: bool, save_path: str | None = None) -> None:
    """wg-quick's cmd_down (hooks=True) or its failed-up trap (hooks=False), in its order."""
    from meshwg.io.oscfg import netconfig
    from meshwg.io.ipc import uapi_client, uapi_server

    itf = config.interface if config is not None else None
    if hooks and itf is not None:
        for hook in itf.pre_down:
            _quiet(quiet, netconfig.run_hook, hook, iface)
        if itf.save_config and save_path is not None:
            save_config(iface, config, save_path)
    try:
        device = uapi_client.get(iface)
    except OSError:
        device = {"peers": []}
    fwmark = int(device.get("fwmark", "0") or 0)
    table = itf.table if itf is not None else None
    has_default = any(a.endswith("/0") for p in device["peers"] for a in p["allowed_ips"])
    if fwmark and table in (None, "auto") and has_default:
        netconfig.remove_default_rules(fwmark)
    if netconfig.link_exists(iface):
        _quiet(quiet, netconfig.delete_link, iface)
    # The daemon notices the TUN is gone and removes its socket; wait so `down; up` cannot race it.
    sock = uapi_server.socket_path(iface)
    deadline = time.monotonic() + 3
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    if itf is not None and itf.dns:
        netconfig.unset_dns(iface)
    _quiet(quiet, netconfig.remove_firewall, iface)
    if hooks and itf is not None:
        for hook in itf.post_down:
            _quiet(quiet, netconfig.run_hook, hook, iface)


def _quiet(quiet: bool, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as err:
        if not quiet:
            raise UserError(str(err)) from None
        log.warning("%s", err)


# ---------------------------------------------------------------------------------------- save


def running_config(iface: str, config):
    """The interface as it runs now, as a WgQuickConfig: wg-quick's save_config. The wg-quick keys
    come from the OS (addresses, DNS, MTU) and the file (Table, SaveConfig, hooks); the rest is
    `wg showconf` from UAPI. Comments of the file are kept on the interface and on peers still there."""
    from meshwg.config import wgquick
    from meshwg.io.oscfg import netconfig
    from meshwg.io.ipc import uapi_client

    old = config.interface
    raw = uapi_client.get(iface)
    itf = wgquick.InterfaceConfig(comments=dict(old.comments))
    key = bytes.fromhex(raw.get("private_key", "0" * 64))
    itf.private_key = key if any(key) else None
    itf.listen_port = int(raw.get("listen_port", "0") or 0) or None
    itf.fwmark = int(raw.get("fwmark", "0") or 0) or None
    # The kernel's own IPv6 link-local is not configuration; wg-quick's regex does save it, a wart.
    itf.addresses = [wgquick.parse_address(a) for a in netconfig.interface_addresses(iface)
                     if not a.lower().startswith("fe80:")]
    dns = netconfig.current_dns(iface)
    if dns is None:  # resolvconf absent: DNS never applied, keep what the file asked for
        itf.dns, itf.dns_search = list(old.dns), list(old.dns_search)
    else:
        itf.dns = [ipaddress.ip_address(d.partition("%")[0]) for d in dns]
        itf.dns_search = list(old.dns_search) if dns else []
    itf.mtu = netconfig.link_mtu(iface) if old.mtu else None
    itf.table = old.table
    itf.save_config = True if old.save_config else None
    itf.pre_up, itf.post_up = list(old.pre_up), list(old.post_up)
    itf.pre_down, itf.post_down = list(old.pre_down), list(old.post_down)
    old_peers = {p.public_key: p for p in config.peers}
    peers = []
    for p in raw["peers"]:
        pk = bytes.fromhex(p["public_key"])
        psk = bytes.fromhex(p.get("preshared_key", "0" * 64))
        keepalive = int(p.get("persistent_keepalive_interval", "0") or 0)
        endpoint = p.get("endpoint")
        peers.append(wgquick.PeerConfig(
            public_key=pk,
            preshared_key=psk if any(psk) else None,
            allowed_ips=[wgquick.parse_allowed_ip(a) for a in p["allowed_ips"]],
            endpoint=wgquick.parse_endpoint(endpoint) if endpoint else None,
            persistent_keepalive=keepalive or None,
            comments=dict(old_peers[pk].comments) if pk in old_peers else {},
        ))
    return wgquick.WgQuickConfig(interface=itf, peers=peers, trailing_comments=list(config.trailing_comments))


def save_config(iface: str, config, path: str) -> None:
    """Write the running configuration back to `path` (SaveConfig = true), atomically; the file
    keeps its owner and mode (never more open than 0600's owner bits, as wg-quick's umask 077)."""
    from meshwg.config import wgquick

    real = os.path.realpath(path)  # a symlinked config: replace the target, keep the link
    try:
        mode = os.stat(real).st_mode & 0o700
    except OSError:
        mode = 0o600
    text = wgquick.format_config(running_config(iface, config))
    try:
        atomic_write(real, text.encode(), mode)
    except OSError as err:
        raise UserError(f"could not write configuration file {real}: {err.strerror}") from None


def cmd_save(args) -> int:
    iface, path = _resolve_config(args.config)
    if path is None:
        state = _read_state(iface)
        path = state["config"] if state is not None and os.path.exists(state["config"]) else None
    if path is None:
        raise UserError(f"no configuration file for {iface}")
    if not _is_wireguard(iface):
        raise UserError(f"{iface} is not a WireGuard interface")
    save_config(iface, _load(path), path)
    return 0


# ---------------------------------------------------------------------------------------- show


def _b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


def _device_json(iface: str) -> dict:
    from meshwg.config.keys import public_key
    from meshwg.io.ipc import uapi_client

    raw = uapi_client.get(iface)
    out: dict = {"interface": iface, "listen_port": int(raw.get("listen_port", 0)),
                 "fwmark": int(raw.get("fwmark", 0))}
    if "private_key" in raw:
        out["public_key"] = base64.b64encode(public_key(bytes.fromhex(raw["private_key"]))).decode()
    out["peers"] = []
    for p in raw["peers"]:
        sec = int(p.get("last_handshake_time_sec", 0))
        out["peers"].append({
            "public_key": _b64(p["public_key"]),
            "preshared_key": p.get("preshared_key", "0" * 64) != "0" * 64,
            "endpoint": p.get("endpoint"),
            "allowed_ips": p["allowed_ips"],
            "latest_handshake": sec or None,
            "rx_bytes": int(p.get("rx_bytes", 0)),
            "tx_bytes": int(p.get("tx_bytes", 0)),
            "persistent_keepalive": int(p.get("persistent_keepalive_interval", 0)),
        })
    return out


def _ago(sec: int) -> str:
    delta = max(0, int(time.time()) - sec)
    parts = []
    for name, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        if delta >= size or (name == "second" and not parts):
            count, delta = divmod(delta, size)
            parts.append(f"{count} {name}{'' if count == 1 else 's'}")
    return ", ".join(parts) + " ago"


def _print_device(dev: dict) -> None:
    print(f"interface: {dev['interface']}")
    if "public_key" in dev:
        print(f"  public key: {dev['public_key']}")
        print("  private key: (hidden)")
    if dev["listen_port"]:
        print(f"  listening port: {dev['listen_port']}")
    if dev["fwmark"]:
        print(f"  fwmark: 0x{dev['fwmark']:x}")
    for p in dev["peers"]:
        print(f"\npeer: {p['public_key']}")
        if p["endpoint"]:
            print(f"  endpoint: {p['endpoint']}")
        print(f"  allowed ips: {', '.join(p['allowed_ips']) or '(none)'}")
        if p["latest_handshake"]:
            print(f"  latest handshake: {_ago(p['latest_handshake'])}")
        if p["rx_bytes"] or p["tx_bytes"]:
            print(f"  transfer: {human_bytes(p['rx_bytes'])} received, {human_bytes(p['tx_bytes'])} sent")
        if p["persistent_keepalive"]:
            print(f"  persistent keepalive: every {p['persistent_keepalive']} seconds")


def cmd_show(args) -> int:
    from meshwg.io.ipc import uapi_client

    names = [args.interface] if args.interface else uapi_client.list_interfaces()
    devices = []
    for name in names:
        try:
            devices.append(_device_json(name))
        except OSError as err:
            if args.interface:
                raise UserError(f"cannot reach {name}: {err}") from None
    if args.json:
        print(json.dumps(devices[0] if args.interface else devices, indent=2))
    else:
        for i, dev in enumerate(devices):
            if i:
                print()
            _print_device(dev)
    return 0


def _add_config(parser) -> None:
    parser.add_argument("config", help="CONFIG file (…/IFACE.conf) or interface name")


def _iface(text: str) -> str:
    """An interface name, checked as the other commands' --interface (a config file's top-level `interface` then
    fits all of them or none)."""
    if not IFACE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"bad interface name {text!r} (1-15 of a-z A-Z 0-9 _=+.-)")
    return text


def _add_show(parser) -> None:
    parser.add_argument("interface", nargs="?", type=_iface,
                        help="interface (default: all meshwg/wireguard-go devices)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


COMMANDS = {
    "up": ("Bring up a WireGuard interface from a wg-quick config (userspace device), like `wg-quick up`.", _add_config, cmd_up),
    "down": ("Take down an interface brought up by `meshwg up`, like `wg-quick down`.", _add_config, cmd_down),
    "save": ("Write an interface's running configuration to its config file, like `wg-quick save`.", _add_config, cmd_save),
    "show": ("Show interfaces, peers, endpoints, handshakes and transfer, like `wg show`.", _add_show, cmd_show),
}

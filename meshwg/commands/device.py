"""`meshwg up CONFIG`, `meshwg down CONFIG|IFACE`, `meshwg show [IFACE] [--json]`.

wg-quick(8) semantics without wireguard-tools: the interface is named after the file; the device is
a meshwg-tun daemon configured over UAPI; addresses, MTU, routes for every AllowedIPs prefix (Table
auto/off/N; /0 through a fwmark and policy routing), DNS through resolvconf, Pre/Post Up/Down hooks
with %i. All OS changes go through meshwg.io.netconfig.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

from meshwg.errors import UserError

log = logging.getLogger(__name__)

CONFIG_DIR = "/etc/wireguard"
_IFACE_RE = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")


def _resolve_config(arg: str) -> tuple[str, str | None]:
    """(interface, config path or None), as wg-quick resolves its CONFIG_FILE argument."""
    if "/" not in arg and _IFACE_RE.fullmatch(arg) and not arg.endswith(".conf"):
        path = os.path.join(CONFIG_DIR, f"{arg}.conf")
        return arg, (path if os.path.exists(path) else None)
    base = os.path.basename(arg)
    if not base.endswith(".conf"):
        raise UserError(f"the config file must be a valid interface name, followed by .conf: {arg}")
    iface = base[:-5]
    if not _IFACE_RE.fullmatch(iface):
        raise UserError(f"the config file must be a valid interface name, followed by .conf: {arg}")
    return iface, arg


def _load(path: str):
    from meshwg.config import wgquick

    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    return wgquick.parse(text, filename=path)


def _resolve_host(host: str, port: int) -> tuple[str, int]:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as err:
        raise UserError(f"cannot resolve endpoint {host}: {err}") from None
    return info[0][4][0], port


# ---------------------------------------------------------------------------------------- up


def cmd_up(args) -> int:
    from meshwg.config import wgquick
    from meshwg.io import netconfig, uapi_client

    iface, path = _resolve_config(args.config)
    if path is None:
        raise UserError(f"no configuration file for {iface}")
    config = _load(path)
    if netconfig.link_exists(iface):
        raise UserError(f"{iface} already exists")
    itf = config.interface
    for hook in itf.pre_up:
        netconfig.run_hook(hook, iface)
    try:
        _start_daemon(iface)
        uapi_client.set_text(iface, wgquick.to_uapi_set(config, resolve=_resolve_host))
        for address in itf.addresses:
            netconfig.add_address(iface, str(address))
        hosts = [p.endpoint.host for p in config.peers if p.endpoint is not None and p.endpoint.ip is not None]
        netconfig.set_mtu_up(iface, itf.mtu or netconfig.default_mtu(hosts))
        netconfig.set_dns(iface, [str(d) for d in itf.dns], itf.dns_search)
        prefixes = netconfig.sorted_prefixes(n for p in config.peers for n in p.allowed_ips)
        fwmark = itf.fwmark or 0
        for prefix in prefixes:
            if prefix.endswith("/0") and itf.table in (None, "auto"):
                if not fwmark:
                    fwmark = netconfig.pick_fwmark_table()
                    uapi_client.set_text(iface, f"set=1\nfwmark={fwmark}\n\n")
                netconfig.add_default_route(iface, prefix, fwmark)
            else:
                netconfig.add_route(iface, prefix, itf.table)
        for hook in itf.post_up:
            netconfig.run_hook(hook, iface)
    except BaseException:
        # Like wg-quick's trap: leave nothing half-configured.
        _teardown(iface, config, quiet=True)
        raise
    return 0


def _start_daemon(iface: str) -> None:
    env = dict(os.environ)
    env.pop("WG_PROCESS_FOREGROUND", None)
    proc = subprocess.run([sys.executable, "-m", "meshwg.commands.tun_launcher", iface], env=env,
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise UserError(proc.stderr.strip() or f"meshwg-tun {iface} failed")


# ---------------------------------------------------------------------------------------- down


def cmd_down(args) -> int:
    from meshwg.io import netconfig

    iface, path = _resolve_config(args.config)
    config = _load(path) if path is not None else None
    if not netconfig.link_exists(iface):
        raise UserError(f"{iface} is not a WireGuard interface")
    _teardown(iface, config, quiet=False)
    return 0


def _teardown(iface: str, config, *, quiet: bool) -> None:
    from meshwg.io import netconfig, uapi_client

    itf = config.interface if config is not None else None
    try:
        device = uapi_client.get(iface)
    except OSError:
        device = {"peers": []}
    if itf is not None:
        for hook in itf.pre_down:
            _quiet(quiet, netconfig.run_hook, hook, iface)
        if itf.dns or itf.dns_search:
            netconfig.unset_dns(iface)
    fwmark = int(device.get("fwmark", "0") or 0)
    table = itf.table if itf is not None else None
    has_default = any(a.endswith("/0") for p in device["peers"] for a in p["allowed_ips"])
    if fwmark and table in (None, "auto") and has_default:
        netconfig.remove_default_rules(fwmark)
    if netconfig.link_exists(iface):
        _quiet(quiet, netconfig.delete_link, iface)
    # The daemon notices the TUN is gone and removes its socket; wait so `down; up` cannot race it.
    sock = os.path.join("/var/run/wireguard", f"{iface}.sock")
    deadline = time.monotonic() + 3
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    if itf is not None:
        for hook in itf.post_down:
            _quiet(quiet, netconfig.run_hook, hook, iface)


def _quiet(quiet: bool, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as err:
        if not quiet:
            raise UserError(str(err)) from None
        log.warning("%s", err)


# ---------------------------------------------------------------------------------------- show


def _b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


def _device_json(iface: str) -> dict:
    from meshwg.config.keys import public_key
    from meshwg.io import uapi_client

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


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


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
            print(f"  transfer: {_human_bytes(p['rx_bytes'])} received, {_human_bytes(p['tx_bytes'])} sent")
        if p["persistent_keepalive"]:
            print(f"  persistent keepalive: every {p['persistent_keepalive']} seconds")


def cmd_show(args) -> int:
    from meshwg.io import uapi_client

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


def _add_show(parser) -> None:
    parser.add_argument("interface", nargs="?", help="interface (default: all meshwg/wireguard-go devices)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


COMMANDS = {
    "up": ("Bring up a WireGuard interface from a wg-quick config (userspace device), like `wg-quick up`.", _add_config, cmd_up),
    "down": ("Take down an interface brought up by `meshwg up`, like `wg-quick down`.", _add_config, cmd_down),
    "show": ("Show interfaces, peers, endpoints, handshakes and transfer, like `wg show`.", _add_show, cmd_show),
}

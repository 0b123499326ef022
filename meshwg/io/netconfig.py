"""OS network configuration through `ip` (and `resolvconf`, `sysctl`): the only module that mutates
the host's network state. Mirrors what wg-quick(8) does on Linux, step by step.

Functions are synchronous (subprocess); the device commands call them outside the data path.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

DEFAULT_MTU = 1420
# Outer IPv6 (40) + UDP (8) + WireGuard data header (16) + tag (16): wg-quick subtracts 80.
MTU_OVERHEAD = 80


class NetconfigError(RuntimeError):
    pass


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    log.info("[#] %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetconfigError(f"{' '.join(cmd)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def _family(prefix: str) -> str:
    return "-6" if ":" in prefix else "-4"


def link_exists(iface: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", iface], capture_output=True).returncode == 0


def delete_link(iface: str) -> None:
    run(["ip", "link", "delete", "dev", iface])


def add_address(iface: str, cidr: str) -> None:
    run(["ip", _family(cidr), "address", "add", cidr, "dev", iface])


def set_mtu_up(iface: str, mtu: int) -> None:
    run(["ip", "link", "set", "mtu", str(mtu), "up", "dev", iface])


def default_mtu(endpoint_hosts: Iterable[str] = ()) -> int:
    """wg-quick's rule: the MTU of the device towards each endpoint (or the default route) minus 80."""
    best = 0
    targets = [["ip", _family(h), "route", "get", h] for h in endpoint_hosts]
    if not targets:
        targets = [["ip", "-4", "route", "show", "default"], ["ip", "-6", "route", "show", "default"]]
    for cmd in targets:
        out = run(cmd, check=False)
        words = out.split()
        mtu = 0
        if "mtu" in words:
            mtu = int(words[words.index("mtu") + 1])
        elif "dev" in words:
            dev = words[words.index("dev") + 1]
            try:
                with open(f"/sys/class/net/{dev}/mtu") as f:
                    mtu = int(f.read())
            except (OSError, ValueError):
                mtu = 0
        best = max(best, mtu)
    return best - MTU_OVERHEAD if best > MTU_OVERHEAD else DEFAULT_MTU


def _route_exists(iface: str, prefix: str) -> bool:
    return bool(run(["ip", _family(prefix), "route", "show", "dev", iface, "match", prefix], check=False).strip())


def _table_in_use(table: int) -> bool:
    return bool(run(["ip", "-4", "route", "show", "table", str(table)], check=False).strip()
                or run(["ip", "-6", "route", "show", "table", str(table)], check=False).strip())


def pick_fwmark_table(start: int = 51820) -> int:
    table = start
    while _table_in_use(table):
        table += 1
    return table


def add_route(iface: str, prefix: str, table: str | None) -> None:
    """One AllowedIPs prefix. `table` is None/"auto", "off" or a number (wg-quick's Table=)."""
    if table == "off":
        return
    if table not in (None, "auto"):
        run(["ip", _family(prefix), "route", "add", prefix, "dev", iface, "table", str(table)])
    elif not _route_exists(iface, prefix):
        run(["ip", _family(prefix), "route", "add", prefix, "dev", iface])


def add_default_route(iface: str, prefix: str, fwmark: int) -> None:
    """A /0 peer: route it in table `fwmark`, used by all packets not marked with `fwmark`
    (the tunnel's own UDP is marked, so it keeps using the main table and never loops)."""
    family = _family(prefix)
    table = str(fwmark)
    run(["ip", family, "rule", "add", "not", "fwmark", table, "table", table])
    run(["ip", family, "rule", "add", "table", "main", "suppress_prefixlength", "0"])
    run(["ip", family, "route", "add", prefix, "dev", iface, "table", table])
    if family == "-4":
        # Replies to the marked socket must pass reverse-path filtering.
        run(["sysctl", "-q", "net.ipv4.conf.all.src_valid_mark=1"], check=False)


def remove_default_rules(fwmark: int) -> None:
    table = str(fwmark)
    for family in ("-4", "-6"):
        while f"lookup {table}" in run(["ip", family, "rule", "show"], check=False):
            if not _try(["ip", family, "rule", "delete", "table", table]):
                break
        while "from all lookup main suppress_prefixlength 0" in run(["ip", family, "rule", "show"], check=False):
            if not _try(["ip", family, "rule", "delete", "table", "main", "suppress_prefixlength", "0"]):
                break


def _try(cmd: Sequence[str]) -> bool:
    try:
        run(cmd)
        return True
    except NetconfigError as err:
        log.warning("%s", err)
        return False


def set_dns(iface: str, servers: Sequence[str], search: Sequence[str]) -> bool:
    """Install DNS through resolvconf, as wg-quick does. False when resolvconf is absent."""
    if not servers and not search:
        return False
    if shutil.which("resolvconf") is None:
        log.warning("DNS= given but resolvconf is not installed: DNS left unchanged")
        return False
    text = "".join(f"nameserver {s}\n" for s in servers)
    if search:
        text += f"search {' '.join(search)}\n"
    run(["resolvconf", "-a", f"tun.{iface}", "-m", "0", "-x"], input=text)
    return True


def unset_dns(iface: str) -> None:
    if shutil.which("resolvconf") is not None:
        run(["resolvconf", "-d", f"tun.{iface}", "-f"], check=False)


def run_hook(command: str, iface: str) -> None:
    """A Pre/PostUp/Down hook: a shell command with %i replaced by the interface name."""
    run(["bash", "-c", command.replace("%i", iface)])


def sorted_prefixes(prefixes: Iterable) -> list[str]:
    """Most specific first, as wg-quick orders routes."""
    nets = {ipaddress.ip_network(str(p), strict=False) for p in prefixes}
    return [str(n) for n in sorted(nets, key=lambda n: (-n.prefixlen, n.version, n))]


def ensure_run_dir(path: str = "/var/run/wireguard") -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chmod(path, 0o755)

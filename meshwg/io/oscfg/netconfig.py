"""OS network configuration through `ip` (and `nft`, `resolvconf`, `sysctl`): the only module that mutates
the host's network state. Mirrors what wg-quick(8) does on Linux, step by step.

Functions are synchronous (subprocess); the device commands call them outside the data path.
"""

from __future__ import annotations

import ipaddress
import logging
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
    proc = subprocess.run(list(cmd), check=False, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetconfigError(f"{' '.join(cmd)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def _family(prefix: str) -> str:
    return "-6" if ":" in prefix else "-4"


def link_exists(iface: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", iface], check=False, capture_output=True).returncode == 0


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


def _resolvconf_name(iface: str) -> str:
    """The resolvconf record name: wg-quick prefixes the first `NAME*` entry of interface-order
    (Debian's "tun*" gives "tun.wg0") so the record sorts where the admin wants tunnels."""
    try:
        with open("/etc/resolvconf/interface-order") as f:
            for line in f:
                word = line.strip()
                if word.endswith("*") and word[:-1] and all(c.isalnum() or c == "-" for c in word[:-1]):
                    return f"{word[:-1]}.{iface}"
    except OSError:
        pass
    return iface


def have_resolvconf() -> bool:
    return shutil.which("resolvconf") is not None


def set_dns(iface: str, servers: Sequence[str], search: Sequence[str]) -> bool:
    """Install DNS through resolvconf, as wg-quick does. False (nothing done) when there are no
    servers or resolvconf is absent; the caller tells the user."""
    if not servers or not have_resolvconf():
        return False
    text = "".join(f"nameserver {s}\n" for s in servers)
    if search:
        text += f"search {' '.join(search)}\n"
    run(["resolvconf", "-a", _resolvconf_name(iface), "-m", "0", "-x"], input=text)
    return True


def unset_dns(iface: str) -> None:
    if have_resolvconf():
        run(["resolvconf", "-d", _resolvconf_name(iface), "-f"], check=False)


def current_dns(iface: str) -> list[str] | None:
    """Nameservers resolvconf holds for iface (what wg-quick's save_config writes back), or None
    when resolvconf is absent and the record cannot be read."""
    name = _resolvconf_name(iface)
    text = None
    if have_resolvconf():
        proc = subprocess.run(["resolvconf", "-l", name], check=False, capture_output=True, text=True)
        if proc.returncode == 0:
            text = proc.stdout
    if text is None:
        try:
            with open(f"/etc/resolvconf/run/interface/{name}") as f:
                text = f.read()
        except OSError:
            return None
    return [line.split()[1] for line in text.splitlines()
            if line.startswith("nameserver ") and len(line.split()) == 2]


def interface_addresses(iface: str, family: str | None = None) -> list[str]:
    """Addresses on iface as "IP/len" (family "-4", "-6" or None for both), in `ip` order."""
    cmd = ["ip", "-o", *([family] if family else []), "address", "show", "dev", iface]
    out = []
    for line in run(cmd, check=False).splitlines():
        words = line.split()
        for kind in ("inet", "inet6"):
            if kind in words and words.index(kind) + 1 < len(words):
                out.append(words[words.index(kind) + 1])
    return out


def link_mtu(iface: str) -> int | None:
    words = run(["ip", "link", "show", "dev", iface], check=False).split()
    return int(words[words.index("mtu") + 1]) if "mtu" in words else None


# ------------------------------------------------------------------ nftables (a /0 peer)

NFT_TABLE_PREFIX = "meshwg-"


def nft_table(iface: str) -> str:
    return f"{NFT_TABLE_PREFIX}{iface}"


def add_firewall(iface: str, prefix: str, fwmark: int) -> None:
    """wg-quick's rules for a /0 peer, in table `ip|ip6 meshwg-<iface>`:
    - preraw: drop packets for the tunnel's own addresses arriving on any other interface from a
      non-local source (with src_valid_mark, rp_filter alone no longer stops such spoofing);
    - postmangle/premangle: save the fwmark of the tunnel's UDP in conntrack and restore it on
      replies, so they match `not fwmark` like the packets that left and use the main table.
    The table is replaced as a whole (add; delete; add) so a stale one never doubles rules."""
    if shutil.which("nft") is None:
        raise NetconfigError("nft is not installed: cannot add the firewall rules a 0.0.0.0/0 or ::/0 peer needs")
    v6 = ":" in prefix
    pf, table = ("ip6" if v6 else "ip"), nft_table(iface)
    cmds = [f"add table {pf} {table}", f"delete table {pf} {table}", f"add table {pf} {table}",
            f"add chain {pf} {table} preraw {{ type filter hook prerouting priority -300; }}",
            f"add chain {pf} {table} premangle {{ type filter hook prerouting priority -150; }}",
            f"add chain {pf} {table} postmangle {{ type filter hook postrouting priority -150; }}"]
    for cidr in interface_addresses(iface, "-6" if v6 else "-4"):
        ip = cidr.partition("/")[0]
        cmds.append(f'add rule {pf} {table} preraw iifname != "{iface}" {pf} daddr {ip} fib saddr type != local drop')
    cmds.append(f"add rule {pf} {table} postmangle meta l4proto udp mark {fwmark} ct mark set mark")
    cmds.append(f"add rule {pf} {table} premangle meta l4proto udp meta mark set ct mark")
    if not v6:
        run(["sysctl", "-q", "net.ipv4.conf.all.src_valid_mark=1"])
    run(["nft", "-f", "-"], input="\n".join(cmds) + "\n")


def remove_firewall(iface: str) -> bool:
    """Delete every `meshwg-<iface>` table (any family). True if one was there."""
    if shutil.which("nft") is None:
        return False
    suffix = " " + nft_table(iface)
    cmds = [f"delete {line.strip()}" for line in run(["nft", "list", "tables"], check=False).splitlines()
            if line.strip().startswith("table ") and line.rstrip().endswith(suffix)]
    if cmds:
        run(["nft", "-f", "-"], input="\n".join(cmds) + "\n")
    return bool(cmds)


def run_hook(command: str, iface: str) -> None:
    """A Pre/PostUp/Down hook: a shell command with %i replaced by the interface name."""
    run(["bash", "-c", command.replace("%i", iface)])


def sorted_prefixes(prefixes: Iterable) -> list[str]:
    """Most specific first, as wg-quick orders routes."""
    nets = {ipaddress.ip_network(str(p), strict=False) for p in prefixes}
    return [str(n) for n in sorted(nets, key=lambda n: (-n.prefixlen, n.version, n))]

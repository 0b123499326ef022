"""The host side of subnet routes and exit nodes (issue 12): forwarding, masquerade and exit policy routing.

Everything here is undone by `close()` (and each piece by turning it off), so a node that stops leaves the
host as it found it:
- Forwarding (an advertising node: subnet routes or exit node): net.ipv4.ip_forward and
  net.ipv6.conf.all.forwarding set to 1, the previous values written back when advertising stops.
- One nftables table of our own, `inet meshwg-<iface>`, rebuilt whole on every change (add; delete; add, as
  wg-quick does): `iifname <mesh> oifname != <mesh> masquerade` while advertising with --snat-routes on; and,
  while an exit node is in use, wg-quick's conntrack mark save/restore for our marked TCP and UDP so the replies
  to our control, relay and WireGuard traffic pass reverse-path checks with src_valid_mark.
- Exit node in use: wg-quick's policy routing. Our own sockets carry fwmark M (the shells set SO_MARK);
  `ip rule add not fwmark M table M`, `ip route add default dev <mesh> table M` and
  `ip rule add table main suppress_prefixlength 0`, for IPv4 and IPv6; rules and table removed when the exit
  node is no longer in use. M is the first table number from 51820 nobody uses.
Synchronous (subprocess): the agent runs these in a thread.
"""

from __future__ import annotations

import logging
import shutil

from meshwg.io.oscfg import netconfig

log = logging.getLogger("meshwg.routes")

FORWARDING = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")
SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value + "\n")
        return True
    except OSError as exc:
        log.warning("cannot set %s to %s: %s", path, value, exc)
        return False


class Sysctls:
    """Set /proc/sys values, remembering what each was the first time, to write back on restore()."""

    def __init__(self) -> None:
        self.saved: dict[str, str] = {}

    def set(self, path: str, value: str) -> None:
        old = _read(path)
        if old is None:
            log.warning("%s is not there: left alone", path)
            return
        self.saved.setdefault(path, old)
        if old != value:
            _write(path, value)

    def restore(self, paths=None) -> None:
        for path in list(paths if paths is not None else self.saved):
            if path in self.saved:
                _write(path, self.saved.pop(path))


def nft_table(iface: str) -> str:
    return netconfig.nft_table(iface)


def nft_commands(iface: str, masquerade: bool, mark: int | None) -> list[str]:
    """The whole table for this state (empty: no table)."""
    if not masquerade and not mark:
        return []
    t = f"inet {nft_table(iface)}"
    cmds = [f"add table {t}", f"delete table {t}", f"add table {t}"]
    if masquerade:
        cmds += [f"add chain {t} nat_post {{ type nat hook postrouting priority srcnat; }}",
                 f'add rule {t} nat_post iifname "{iface}" oifname != "{iface}" masquerade']
    if mark:
        cmds += [f"add chain {t} premangle {{ type filter hook prerouting priority mangle; }}",
                 f"add chain {t} postmangle {{ type filter hook postrouting priority mangle; }}",
                 f"add rule {t} postmangle meta l4proto {{ tcp, udp }} mark {mark} ct mark set mark",
                 f"add rule {t} premangle meta l4proto {{ tcp, udp }} meta mark set ct mark"]
    return cmds


class SubnetRouting:
    """The host state for one mesh interface. Call apply() with the wanted state; close() undoes all."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.sysctls = Sysctls()
        self.forwarding = False
        self.masquerade = False
        self.mark: int | None = None      # the fwmark/table of the exit policy routing in place
        self._table = False

    def choose_mark(self) -> int:
        return netconfig.pick_fwmark_table()

    def apply(self, *, forwarding: bool, masquerade: bool, exit_mark: int | None) -> None:
        if forwarding and not self.forwarding:
            for path in FORWARDING:
                self.sysctls.set(path, "1")
        elif not forwarding and self.forwarding:
            self.sysctls.restore(FORWARDING)
        self.forwarding = forwarding
        if exit_mark != self.mark:
            if self.mark:
                self._exit_rules_off(self.mark)
            if exit_mark:
                self.sysctls.set(SRC_VALID_MARK, "1")
                self._exit_rules_on(exit_mark)
            else:
                self.sysctls.restore([SRC_VALID_MARK])
            self.mark = exit_mark
        masquerade = masquerade and forwarding
        self._nft(masquerade, self.mark)
        self.masquerade = masquerade

    def _nft(self, masquerade: bool, mark: int | None) -> None:
        cmds = nft_commands(self.iface, masquerade, mark)
        if not cmds and not self._table:
            return
        if shutil.which("nft") is None:
            log.warning("nft is not installed: no masquerade for the mesh's routed traffic")
            return
        if not cmds:
            cmds = [f"delete table inet {nft_table(self.iface)}"]
        try:
            netconfig.run(["nft", "-f", "-"], input="\n".join(cmds) + "\n")
            self._table = bool(nft_commands(self.iface, masquerade, mark))
        except netconfig.NetconfigError as exc:
            log.warning("%s", exc)

    def _exit_rules_on(self, mark: int) -> None:
        m = str(mark)
        for fam in ("-4", "-6"):
            for cmd in (["ip", fam, "route", "replace", "default", "dev", self.iface, "table", m],
                        ["ip", fam, "rule", "add", "not", "fwmark", m, "table", m],
                        ["ip", fam, "rule", "add", "table", "main", "suppress_prefixlength", "0"]):
                try:
                    netconfig.run(cmd)
                except netconfig.NetconfigError as exc:
                    log.warning("%s", exc)   # e.g. IPv6 disabled here: IPv4 still goes through the exit node
                    break

    def _exit_rules_off(self, mark: int) -> None:
        m = str(mark)
        for fam in ("-4", "-6"):
            netconfig.run(["ip", fam, "rule", "del", "not", "fwmark", m, "table", m], check=False)
            netconfig.run(["ip", fam, "rule", "del", "table", "main", "suppress_prefixlength", "0"], check=False)
            netconfig.run(["ip", fam, "route", "flush", "table", m], check=False)

    def close(self) -> None:
        """Undo everything: rules, table, nftables table, sysctls."""
        if self.mark:
            self._exit_rules_off(self.mark)
            self.mark = None
        if self._table:
            self._nft(False, None)
        self.sysctls.restore()
        self.forwarding = self.masquerade = False

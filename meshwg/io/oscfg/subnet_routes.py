"""The host side of subnet routes and exit nodes (issue 12): forwarding, masquerade and exit policy routing.

Everything here is undone by `close()` (and each piece by turning it off), so a node that stops leaves the
host as it found it:
- Forwarding (an advertising node: subnet routes or exit node): net.ipv4.ip_forward and
  net.ipv6.conf.all.forwarding set to 1, the previous values written back when advertising stops.
- One nftables table of our own, `inet meshwg-<iface>`, rebuilt whole on every change (add; delete; add, as
  wg-quick does): `iifname <mesh> oifname != <mesh> masquerade` while advertising with --snat-routes on; while
  advertising subnet routes but no exit node, a forward chain that lets the mesh reach only the advertised routes
  (forwarding is global: without it a peer, or a plain peer that widens its AllowedIPs, would use the node as an
  unapproved exit node into any network it reaches; dropped packets are counted); and, while an exit node is in use, wg-quick's conntrack mark save/restore for our marked TCP and UDP so the replies
  to our control, relay and WireGuard traffic pass reverse-path checks with src_valid_mark.
- Exit node in use: wg-quick's policy routing. Our own sockets carry fwmark M (the shells set SO_MARK);
  `ip rule add not fwmark M table M`, `ip route add default dev <mesh> table M` and
  `ip rule add table main suppress_prefixlength 0`, for IPv4 and IPv6, with priorities of our own (so removing
  them never removes wg-quick's identical suppress rule); rules and table removed when the exit node is no
  longer in use. M is the first table number from 51820 nobody uses. While the exit node in use is reached through
  the relay, the table's default routes carry `mtu N` (exit_mtus, meshwg.mesh.path_mtu), so internet traffic
  through it is not fragmented; replaced without it when it goes direct.
With a state directory, what is about to change (original sysctl values, the table, the mark) is written there
first (agent_state.save_os_undo), and recover() at the next start undoes what a crashed run left.
Synchronous (subprocess): the agent runs these in a thread.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil

from meshwg.io.agent import agent_state as S
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
    """Set /proc/sys values, remembering what each was the first time, to write back on restore().
    before_change(): called once a new original value is remembered and before it is overwritten (to persist it)."""

    def __init__(self, before_change=None) -> None:
        self.saved: dict[str, str] = {}
        self.before_change = before_change

    def set(self, path: str, value: str) -> None:
        old = _read(path)
        if old is None:
            log.warning("%s is not there: left alone", path)
            return
        if path not in self.saved:
            self.saved[path] = old
            if self.before_change is not None:
                self.before_change()
        if old != value:
            _write(path, value)

    def restore(self, paths=None) -> None:
        for path in list(paths if paths is not None else self.saved):
            if path in self.saved:
                _write(path, self.saved.pop(path))


def nft_table(iface: str) -> str:
    return netconfig.nft_table(iface)


def nft_commands(iface: str, masquerade: bool, mark: int | None, allow=None) -> list[str]:
    """The whole table for this state (empty: no table). allow: None, no forward filter (not advertising, or
    advertising an exit node: everything); else the prefixes (CIDR texts) the mesh may reach through us."""
    if not masquerade and not mark and allow is None:
        return []
    t = f"inet {nft_table(iface)}"
    cmds = [f"add table {t}", f"delete table {t}", f"add table {t}"]
    if allow is not None:
        cmds += _forward_filter(t, iface, allow)
    if masquerade:
        cmds += [f"add chain {t} nat_post {{ type nat hook postrouting priority srcnat; }}",
                 f'add rule {t} nat_post iifname "{iface}" oifname != "{iface}" masquerade']
    if mark:
        cmds += [f"add chain {t} premangle {{ type filter hook prerouting priority mangle; }}",
                 f"add chain {t} postmangle {{ type filter hook postrouting priority mangle; }}",
                 f"add rule {t} postmangle meta l4proto {{ tcp, udp }} mark {mark} ct mark set mark",
                 f"add rule {t} premangle meta l4proto {{ tcp, udp }} meta mark set ct mark"]
    return cmds


def _forward_filter(t: str, iface: str, allow) -> list[str]:
    """From the mesh interface, only to the advertised routes; the rest dropped and counted. Traffic from other
    interfaces is not ours to judge (replies from the LAN pass: they come in on the LAN's interface)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in allow]
    cmds = [f"add chain {t} forward {{ type filter hook forward priority filter; }}"]
    for fam, version in (("ip", 4), ("ip6", 6)):
        mine = ", ".join(str(n) for n in nets if n.version == version)
        if mine:
            cmds.append(f'add rule {t} forward iifname "{iface}" {fam} daddr {{ {mine} }} accept')
    cmds.append(f'add rule {t} forward iifname "{iface}" counter drop')
    return cmds


DEFAULTS = (("-4", "0.0.0.0/0"), ("-6", "::/0"))   # the exit policy table's default route of each family


def rule_priorities(mark: int) -> tuple[int, int]:
    """(suppress rule, fwmark rule) priorities of our exit policy routing: ours alone (one pair per table number),
    the suppress rule first as in wg-quick, both before the main table's 32766."""
    base = 31000 + 2 * ((mark - 51820) % 500)
    return base, base + 1


class SubnetRouting:
    """The host state for one mesh interface. Call apply() with the wanted state; close() undoes all."""

    def __init__(self, iface: str, state_dir: str | None = None) -> None:
        self.iface = iface
        self.state_dir = state_dir        # where what to undo is kept across a crash (None: memory only)
        self.sysctls = Sysctls(self._save_undo)
        self.forwarding = False
        self.masquerade = False
        self.allow: tuple | None = None   # the forward filter in place (None: none)
        self.mark: int | None = None      # the fwmark/table of the exit policy routing in place
        self.exit_mtus: dict[str, int] = {}   # the MTU of its default routes ("0.0.0.0/0", "::/0"; absent: none)
        self._defaults: set[str] = set()      # the families whose default route is in the table ("-4", "-6")
        self._table = False

    # ---- what a crash leaves -----------------------------------------------------------------
    def _save_undo(self, *, table: bool | None = None) -> None:
        """Before a change: what undoes everything, including the change about to be made."""
        if self.state_dir is None:
            return
        undo = {"version": 1, "iface": self.iface, "sysctls": dict(self.sysctls.saved), "mark": self.mark,
                "nft": self._table if table is None else (table or self._table)}
        try:
            S.save_os_undo(self.state_dir, undo)
        except OSError as exc:
            log.warning("cannot save what to undo after a crash: %s", exc)

    def recover(self) -> None:
        """At startup, before anything else: undo what a run that did not close() left (the values it saved)."""
        if self.state_dir is None:
            return
        undo = S.load_os_undo(self.state_dir)
        if undo is None:
            return
        log.warning("undoing what a previous run left on the host (it did not stop cleanly)")
        known = (*FORWARDING, SRC_VALID_MARK)   # a file we write must not name any other path
        sysctls = undo.get("sysctls")
        for path, value in (sysctls.items() if isinstance(sysctls, dict) else ()):
            if path in known and isinstance(value, str) and value.isdigit() and len(value) <= 3:
                _write(path, value)
        mark = undo.get("mark")
        if isinstance(mark, int) and not isinstance(mark, bool) and 0 < mark < 2**32:
            self._exit_rules_off(mark)
        iface = undo.get("iface")
        if undo.get("nft") is True and isinstance(iface, str) and iface.isprintable() and 0 < len(iface) <= 15:
            if shutil.which("nft") is not None:
                netconfig.run(["nft", "delete", "table", "inet", nft_table(iface)], check=False)
        S.remove_os_undo(self.state_dir)

    def choose_mark(self) -> int:
        return netconfig.pick_fwmark_table()

    def apply(self, *, forwarding: bool, masquerade: bool, exit_mark: int | None, routes=(),
              advertise_exit: bool = False, exit_mtus=None) -> None:
        """routes: the prefixes this node advertises (the mesh may reach only those through us, unless
        advertise_exit: everything). exit_mtus: {"0.0.0.0/0" | "::/0": mtu} for the exit table's default routes
        (None: as they are; {}: none)."""
        old_mtus = self.exit_mtus
        if exit_mtus is not None:
            self.exit_mtus = dict(exit_mtus)
        if forwarding and not self.forwarding:
            for path in FORWARDING:
                self.sysctls.set(path, "1")
        elif not forwarding and self.forwarding:
            self.sysctls.restore(FORWARDING)
            self._save_undo()
        self.forwarding = forwarding
        if exit_mark != self.mark:
            if self.mark:
                self._exit_rules_off(self.mark)
            self.mark = exit_mark   # saved (with what undoes it) before any rule is added
            if exit_mark:
                self.sysctls.set(SRC_VALID_MARK, "1")
                self._save_undo()
                self._exit_rules_on(exit_mark)
            else:
                self.sysctls.restore([SRC_VALID_MARK])
                self._save_undo()
        elif self.mark and self.exit_mtus != old_mtus:
            self._retune_defaults(self.mark, old_mtus)
        masquerade = masquerade and forwarding
        allow = tuple(routes) if forwarding and not advertise_exit else None
        self._nft(masquerade, self.mark, allow)
        self.masquerade, self.allow = masquerade, allow

    def _nft(self, masquerade: bool, mark: int | None, allow=None) -> None:
        cmds = nft_commands(self.iface, masquerade, mark, allow)
        if not cmds and not self._table:
            return
        if shutil.which("nft") is None:
            log.warning("nft is not installed: no masquerade and no forward filter for the mesh's routed traffic")
            return
        if not cmds:
            cmds = [f"delete table inet {nft_table(self.iface)}"]
        else:
            self._save_undo(table=True)
        try:
            netconfig.run(["nft", "-f", "-"], input="\n".join(cmds) + "\n")
            self._table = bool(nft_commands(self.iface, masquerade, mark, allow))
        except netconfig.NetconfigError as exc:
            log.warning("%s", exc)

    def _default_route(self, fam: str, prefix: str, mark: int) -> list[str]:
        """`ip FAM route replace default dev IFACE table M [mtu N]`: replace, so no mtu clears an earlier one."""
        mtu = self.exit_mtus.get(prefix)
        return (["ip", fam, "route", "replace", "default", "dev", self.iface, "table", str(mark)]
                + (["mtu", str(mtu)] if mtu else []))

    def _retune_defaults(self, mark: int, old_mtus: dict) -> None:
        """The default routes whose MTU changed, in the families that have one (not where IPv6 is off)."""
        for fam, prefix in DEFAULTS:
            if fam in self._defaults and self.exit_mtus.get(prefix) != old_mtus.get(prefix):
                try:
                    netconfig.run(self._default_route(fam, prefix, mark))
                except netconfig.NetconfigError as exc:
                    log.warning("%s", exc)

    def _exit_rules_on(self, mark: int) -> None:
        m = str(mark)
        suppress, marked = (str(p) for p in rule_priorities(mark))
        self._defaults = set()
        for fam, prefix in DEFAULTS:
            for cmd in (self._default_route(fam, prefix, mark),
                        ["ip", fam, "rule", "add", "priority", marked, "not", "fwmark", m, "table", m],
                        ["ip", fam, "rule", "add", "priority", suppress, "table", "main", "suppress_prefixlength",
                         "0"]):
                try:
                    netconfig.run(cmd)
                except netconfig.NetconfigError as exc:
                    if "File exists" in str(exc):
                        continue   # already there (ours, left over): the next rule is still needed
                    log.warning("%s", exc)   # e.g. IPv6 disabled here: IPv4 still goes through the exit node
                    break
                if cmd[2] == "route":
                    self._defaults.add(fam)

    def _exit_rules_off(self, mark: int) -> None:
        """Only our rules: matched by our priority and table, never another's identical suppress rule."""
        m = str(mark)
        suppress, marked = (str(p) for p in rule_priorities(mark))
        for fam in ("-4", "-6"):
            netconfig.run(["ip", fam, "rule", "del", "priority", marked, "not", "fwmark", m, "table", m],
                          check=False)
            netconfig.run(["ip", fam, "rule", "del", "priority", suppress, "table", "main", "suppress_prefixlength",
                           "0"], check=False)
            netconfig.run(["ip", fam, "route", "flush", "table", m], check=False)
        self._defaults = set()

    def close(self) -> None:
        """Undo everything: rules, table, nftables table, sysctls."""
        if self.mark:
            self._exit_rules_off(self.mark)
            self.mark = None
        if self._table:
            self._nft(False, None)
        self.sysctls.restore()
        self.forwarding = self.masquerade = False
        self.allow = None
        if self.state_dir is not None and not self._table:
            S.remove_os_undo(self.state_dir)   # all undone (a table that could not go stays for recover())

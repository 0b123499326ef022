"""`meshwg join --accept-dns` (issue 15, names): the host's resolver asks this node for the mesh domain.

- systemd-resolved running (resolvectl there, the service active, and we are in the host's network namespace:
  resolved manages only that one's links): per-link DNS, for the domain only, as wg-quick and Tailscale do:
  `resolvectl dns IFACE <our mesh address>`, `resolvectl domain IFACE ~<domain>` and `default-route IFACE false`
  (no other query goes to the mesh); undone with `resolvectl revert IFACE` (the link's going away undoes it too).
- else /etc/resolv.conf (replaced whole by a rename where the symlink points, or rewritten in place when it is a
  bind mount, as `ip netns exec` makes it): our nameserver first and the domain first in `search`. Our server
  answers REFUSED for any other name, and glibc then asks the next nameserver. The original text is written to the
  state directory BEFORE the change (no change when that fails), and put back at exit, or at the next start after
  a crash, if the file is still ours (starts with MARKER, or is empty: a write cut short): a file that DHCP or the
  administrator rewrote since is left as it is, and becomes the original of our next change. An agent in another
  network namespace that sees the host's own file (`ip netns exec` without /etc/netns/NS/resolv.conf) leaves it.
Synchronous (subprocess, file writes): the agent runs these in a thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess

from meshwg.fsutil import atomic_write

log = logging.getLogger("meshwg.dns")

RESOLV_CONF = "/etc/resolv.conf"
UNDO_FILE = "dns-undo.json"
MARKER = "# meshwg:"


def resolv_conf_with(original: str, server: str, domain: str, iface: str) -> str:
    """`original` with `nameserver SERVER` before the others and DOMAIN first in the search list. Pure."""
    search: list[str] = []
    rest = []
    for line in original.splitlines():
        words = line.split()
        if words and words[0] in ("search", "domain"):   # glibc: the last of them wins; one line says it all
            search = [w for w in words[1:] if w != domain]
            continue
        rest.append(line)
    head = [f"{MARKER} {iface} put the two lines below first (names of the mesh); the original comes back when it "
            f"stops", f"nameserver {server}", "search " + " ".join([domain, *search])]
    return "\n".join(head + rest) + "\n"


def _same_netns() -> bool:
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False    # cannot tell: the resolv.conf way touches only what our namespace sees


def resolved_usable(run=subprocess.run) -> bool:
    if shutil.which("resolvectl") is None or not _same_netns():
        return False
    try:
        return run(["systemctl", "is-active", "--quiet", "systemd-resolved"], timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class SystemResolver:
    """The host resolver's split DNS for one mesh interface. apply() as often as the domain or address change;
    close() undoes it; recover() at start undoes what a crashed run left."""

    def __init__(self, iface: str, state_dir: str, *, resolv_conf: str = RESOLV_CONF, run=subprocess.run,
                 use_resolved=None) -> None:
        self.iface, self.state_dir, self.path, self._run = iface, state_dir, resolv_conf, run
        self._use_resolved = use_resolved   # None: resolved_usable() decides at the first apply
        self.mode: str | None = None        # "resolved" | "resolv.conf" while something is changed
        self.original: str | None = None    # resolv.conf's text before our change

    @property
    def _undo_path(self) -> str:
        return os.path.join(self.state_dir, UNDO_FILE)

    def apply(self, domain: str, server: str | None) -> None:
        if not domain or not server:
            self.close()
            return
        if self._use_resolved is None:
            self._use_resolved = resolved_usable(self._run)
        if self._use_resolved:
            self._save_undo({"mode": "resolved", "iface": self.iface})   # the link's going away undoes it too
            self.mode = "resolved"
            for args in (["dns", self.iface, server], ["domain", self.iface, f"~{domain}"],
                         ["default-route", self.iface, "false"]):
                self._resolvectl(*args)
            log.info("DNS: systemd-resolved asks %s for *.%s (link %s)", server, domain, self.iface)
            return
        current = _read(self.path)
        if current is None:
            log.warning("DNS: cannot read %s: --accept-dns does nothing", self.path)
            return
        if _shares_the_hosts_file(self.path):
            log.warning("DNS: %s is the host's own file (another network namespace, no /etc/netns/NAME/resolv.conf):"
                        " left as it is; --accept-dns does nothing", self.path)
            return
        if not current.startswith(MARKER):
            original = current    # our first change, or the file was rewritten since ours (DHCP): now the original
        elif self.original is None:   # left by a run whose undo file is gone: not an original to keep
            log.warning("DNS: %s holds an older meshwg change with nothing saved to undo it", self.path)
            return
        else:
            original = self.original
        if original != self.original:
            if not self._save_undo({"mode": "resolv.conf", "path": self.path, "original": original}):
                return    # a change nothing could undo after a crash: not made
            self.original = original
        self.mode = "resolv.conf"
        _write(self.path, resolv_conf_with(self.original, server, domain, self.iface))
        log.info("DNS: %s asks %s first, search %s (restored at exit)", self.path, server, domain)

    def close(self) -> None:
        """Undo our change, if any. Never raises (it runs while the agent stops)."""
        if self.mode == "resolved":
            self._resolvectl("revert", self.iface)
        elif self.mode == "resolv.conf" and self.original is not None:
            _restore(self.path, self.original)
        self.mode, self.original = None, None
        try:
            os.unlink(self._undo_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self._undo_path, exc)

    def recover(self) -> None:
        """At start: undo what a run that did not close() left (what its undo file says)."""
        try:
            with open(self._undo_path, "rb") as f:
                undo = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("DNS: unreadable %s (%s): nothing undone", self._undo_path, exc)
            undo = {}
        if undo.get("mode") == "resolv.conf" and isinstance(undo.get("path"), str) \
                and isinstance(undo.get("original"), str):
            log.warning("DNS: restoring %s as a previous run left it changed", undo["path"])
            _restore(undo["path"], undo["original"])
        elif undo.get("mode") == "resolved" and isinstance(undo.get("iface"), str):
            self._resolvectl("revert", undo["iface"])
        self.mode = None
        self.close()

    def _save_undo(self, undo: dict) -> bool:
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            atomic_write(self._undo_path, json.dumps(undo).encode(), mode=0o600)
        except OSError as exc:
            log.warning("DNS: cannot save what to undo after a crash (%s): the host's resolver is left as it is", exc)
            return False
        return True

    def _resolvectl(self, *args: str) -> None:
        try:
            res = self._run(["resolvectl", *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("DNS: resolvectl %s: %s", " ".join(args), exc)
            return
        if res.returncode != 0:
            log.warning("DNS: resolvectl %s: %s", " ".join(args), (res.stderr or "").strip())


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _shares_the_hosts_file(path: str) -> bool:
    """Whether we run in another network namespace than the host's and `path` is the host's own file there: not a
    file mounted over it for this namespace (`ip netns exec` mounts /etc/netns/NAME/resolv.conf), and the same
    file PID 1 sees when that can be read. False when we cannot tell we are elsewhere."""
    if not _in_named_netns():
        try:
            if os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino:
                return False
        except OSError:
            return False
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == real for line in f if len(line.split()) > 4):
                return False   # mounted over for this namespace: its own file
    except OSError:
        pass
    try:
        ours, hosts = os.stat(real), os.stat("/proc/1/root" + real)
        return (ours.st_dev, ours.st_ino) == (hosts.st_dev, hosts.st_ino)
    except OSError:
        return True   # another namespace, a file nobody mounted for it: the host's, as far as we can tell


def _in_named_netns() -> bool:
    """Whether this process runs in a network namespace `ip netns` made (its /run/netns/NAME)."""
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        return any(os.stat(os.path.join("/run/netns", n)).st_ino == ours for n in os.listdir("/run/netns"))
    except OSError:
        return False


def _write(path: str, text: str) -> bool:
    """Replaced whole (a rename where a symlink points, its mode and owner kept): readers and a crash see the old
    or the new text, never an empty file. A bind mount (ip netns exec) cannot be renamed over: rewritten in place."""
    real = os.path.realpath(path)
    try:
        atomic_write(real, text.encode(), mode=os.stat(real).st_mode & 0o7777)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS):
            log.warning("DNS: cannot write %s: %s", path, exc)
            return False
    try:
        with open(path, "r+") as f:
            f.truncate(0)
            f.write(text)
        return True
    except OSError as exc:
        log.warning("DNS: cannot write %s: %s", path, exc)
        return False


def _restore(path: str, original: str) -> None:
    current = _read(path)
    if current is None or not (current.startswith(MARKER) or current == ""):   # "": a write cut short
        log.warning("DNS: %s was rewritten since we changed it: left as it is", path)
        return
    _write(path, original)

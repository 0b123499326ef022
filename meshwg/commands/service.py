"""`meshwg service install|uninstall` and `meshwg-signal service install|uninstall [--relay]`: the systemd units
(meshwg/service_units.py renders them) for `meshwg join`, `meshwg-signal serve` and (--relay) `meshwg-signal relay`.

install writes the unit (0644) and, when absent, a starter config file (meshwg.toml 0600: it may hold the invite);
`--invite-file` copies the invite next to it (0600) for the first join. systemctl runs only where systemd runs (PID 1)
and the unit is in its search path: daemon-reload, then enable (--enable) and start (--now) when asked. Elsewhere
one line says what to run. uninstall stops and disables the unit and removes it; configs and state stay.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

from meshwg import service_units as U
from meshwg.errors import UserError
from meshwg.fsutil import atomic_write

UNIT_DIR = "/etc/systemd/system"
# Where systemd looks for system units (a unit written elsewhere is not seen by `systemctl`).
SYSTEMD_UNIT_PATHS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                      "/usr/lib/systemd/system", "/lib/systemd/system")
AGENT_CONFIG = "/etc/meshwg/meshwg.toml"
SERVER_CONFIG = "/etc/meshwg/signal.toml"


def systemd_running() -> bool:
    """sd_booted(3): systemd is PID 1."""
    return os.path.isdir("/run/systemd/system")


def pid1_name() -> str:
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def executable(script: str, module: str) -> list[str]:
    """The argv that runs this installation's `script`: the console script beside this interpreter (a venv's),
    else the one on PATH, else `python -m module` with this interpreter."""
    here = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), script)
    if os.access(here, os.X_OK):
        return [here]
    found = shutil.which(script)
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", module]


def _systemctl(*args: str) -> None:
    res = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"systemctl {' '.join(args)}: {res.stderr.strip() or f'exit {res.returncode}'}")


def _write(path: str, data: str, mode: int, say) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    try:
        atomic_write(path, data.encode(), mode)
    except OSError as err:
        raise UserError(f"{path}: {err.strerror or err}") from None
    say(f"wrote {path}")


class Installer:
    """The steps both programs share; systemd detection and systemctl are injectable for tests."""

    def __init__(self, unit_dir: str | None, *, systemd=systemd_running, systemctl=_systemctl, say=print):
        self.unit_dir = os.path.abspath(unit_dir or UNIT_DIR)
        self.systemd, self.systemctl, self.say = systemd, systemctl, say

    def _managed(self) -> bool:
        return self.systemd() and self.unit_dir in SYSTEMD_UNIT_PATHS

    def _hint(self, command: str) -> None:
        where = (f"systemd is not running here (PID 1 is {pid1_name()})" if not self.systemd() else
                 f"{self.unit_dir} is not in systemd's search path")
        self.say(f"{where}: on the systemd host run `{command}`")

    def install(self, unit: str, text: str, *, enable: bool, now: bool) -> str:
        path = os.path.join(self.unit_dir, unit)
        _write(path, text, 0o644, self.say)
        start = ["enable", "--now", unit] if now else ["enable", unit] if enable else None
        if not self._managed():
            self._hint(f"systemctl daemon-reload && systemctl {' '.join(start or ['enable', '--now', unit])}")
            return path
        self.systemctl("daemon-reload")
        if start:
            self.systemctl(*start)
            self.say(f"{unit}: {'enabled and started' if now else 'enabled'}")
        else:
            self.say(f"start it with `systemctl enable --now {unit}`")
        return path

    def uninstall(self, unit: str) -> None:
        path = os.path.join(self.unit_dir, unit)
        managed = self._managed()
        if managed:
            try:
                self.systemctl("disable", "--now", unit)
            except UserError as err:   # not loaded or already gone: removing the file is what matters
                self.say(f"note: {err}")
        try:
            os.remove(path)
            self.say(f"removed {path} (config files and state kept)")
        except FileNotFoundError:
            self.say(f"{path} was not installed")
        if managed:
            self.systemctl("daemon-reload")
        else:
            self._hint(f"systemctl disable --now {unit} && systemctl daemon-reload")


def _read_invite(path: str) -> str:
    """The invite's text from FILE ('-': standard input), checked before it is copied."""
    from meshwg.signaling.invite import InviteFormatError, parse_invite

    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"service install: {path}: cannot read the invite: "
                        f"{getattr(err, 'strerror', None) or err}") from None
    try:
        parse_invite(text)
    except InviteFormatError as err:
        raise UserError(f"service install: {path}: {err}") from None
    return text.strip() + "\n"


def _config_key(path: str, table: str, key: str):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get(table, {}).get(key)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return None


def run_agent_install(args, installer: Installer | None = None) -> int:
    inst = installer or Installer(args.unit_dir)
    config = os.path.abspath(args.service_config)
    invite_path = None
    if args.invite_file:
        invite_path = os.path.join(os.path.dirname(config), "invite.txt")
        _write(invite_path, _read_invite(args.invite_file), 0o600, inst.say)
    if not os.path.exists(config):
        _write(config, U.agent_config(config, args.state_dir, invite_path), 0o600, inst.say)
    elif invite_path and _config_key(config, "join", "invite-file") != invite_path:
        inst.say(f'add invite-file = "{invite_path}" under [join] in {config} (kept as it is)')
    text = U.agent_unit(executable("meshwg", "meshwg"), config, args.state_dir)
    inst.install(U.AGENT_UNIT, text, enable=args.enable or args.now, now=args.now)
    return 0


def run_server_install(args, installer: Installer | None = None) -> int:
    inst = installer or Installer(args.unit_dir)
    config = os.path.abspath(args.service_config)
    url = args.db.startswith(("postgresql://", "postgres://"))   # store_api.open_store: no file to write
    db = args.db if url else os.path.abspath(args.db)
    if not os.path.exists(config):
        _write(config, U.server_config(config, db), 0o644, inst.say)
    relay = getattr(args, "relay", False)
    regional = relay and _config_key(config, "relay", "region") is not None  # a regional relay has no database
    if args.init:
        _init_db(db, inst.say)
    elif not url and not regional and not os.path.exists(db):
        inst.say(f"no database at {db} yet: create it with `meshwg-signal --db {db} service install --init` "
                 f"before starting the service")
    text = U.server_unit(executable("meshwg-signal", "signal_server"), config,
                         U.SERVER_STATE + "/signal.db" if url else db, command="relay" if relay else "serve")
    inst.install(U.RELAY_UNIT if relay else U.SERVER_UNIT, text, enable=args.enable or args.now, now=args.now)
    return 0


def _init_db(db: str, say) -> None:
    """The server's identity, as `serve --init` makes it (an existing one is kept)."""
    from meshwg.config.keys import key_to_base64, public_key
    from signal_server.store_api import open_store

    if not db.startswith(("postgresql://", "postgres://")):
        os.makedirs(os.path.dirname(db), mode=0o700, exist_ok=True)
    store = open_store(db, init=True)
    verb = "created" if store.created_identity else "kept"
    say(f"{verb} the database {db}; server key {key_to_base64(public_key(store.server_private_key()))}")
    store.close()


def run_uninstall(unit: str):
    def run(args, installer: Installer | None = None) -> int:
        (installer or Installer(args.unit_dir)).uninstall(unit)
        return 0
    return run


def _install_common(p, config_default: str) -> None:
    p.add_argument("--unit-dir", metavar="DIR", default=None,
                   help=f"where the unit goes (default {UNIT_DIR}; systemctl is run only for systemd's own "
                        f"directories)")
    p.add_argument("--service-config", metavar="FILE", default=config_default,
                   help=f"the config file the service reads (default {config_default}; a starter one is written "
                        f"when it does not exist)")
    p.add_argument("--enable", action="store_true", help="enable the unit (started at boot)")
    p.add_argument("--now", action="store_true", help="enable and start the unit now")


def _agent_args(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = sub.add_parser("install", help="write meshwg.service (and a starter config); systemctl daemon-reload",
                       description="Write meshwg.service, which runs `meshwg join` from its config file.")
    _install_common(i, AGENT_CONFIG)
    i.add_argument("--invite-file", metavar="FILE",
                   help="copy this invite ('-': standard input) next to the config file (mode 0600) for the first "
                        "join")
    i.add_argument("--state-dir", default=U.AGENT_STATE, help=f"the node's state directory (default {U.AGENT_STATE})")
    i.set_defaults(service_run=run_agent_install)
    u = sub.add_parser("uninstall", help="stop, disable and remove meshwg.service (config and state stay)",
                       description="Stop, disable and remove meshwg.service; the config file and state stay.")
    u.add_argument("--unit-dir", metavar="DIR", default=None, help=f"where the unit is (default {UNIT_DIR})")
    u.set_defaults(service_run=run_uninstall(U.AGENT_UNIT))


def add_signal_command(sub, parents) -> None:
    """`meshwg-signal service install|uninstall` (signal_server/cli.py)."""
    sp = sub.add_parser("service", parents=parents, help="install or remove meshwg-signal.service (systemd)")
    acts = sp.add_subparsers(dest="action", required=True)
    i = acts.add_parser("install", parents=parents,
                        help="write meshwg-signal.service (and a starter config); systemctl daemon-reload")
    _install_common(i, SERVER_CONFIG)
    i.add_argument("--init", action="store_true",
                   help="create the database and the server's identity now if --db has none (as `serve --init`)")
    i.add_argument("--relay", action="store_true",
                   help=f"write {U.RELAY_UNIT} instead, which runs `meshwg-signal relay` (STUN + relay only; its "
                        f"options under [relay] in the config file)")
    u = acts.add_parser("uninstall", parents=parents,
                        help="stop, disable and remove meshwg-signal.service (config and database stay)")
    u.add_argument("--unit-dir", metavar="DIR", default=None, help=f"where the unit is (default {UNIT_DIR})")
    u.add_argument("--relay", action="store_true", help=f"remove {U.RELAY_UNIT} instead")


def run_signal(args) -> int:
    """meshwg-signal's dispatch for `service`; one-line errors as meshwg's."""
    try:
        if args.action == "install":
            return run_server_install(args)
        return run_uninstall(U.RELAY_UNIT if args.relay else U.SERVER_UNIT)(args)
    except UserError as err:
        print(f"meshwg-signal: {err}", file=sys.stderr)
        return 1


def run(args) -> int:
    return args.service_run(args)


COMMANDS = {
    "service": ("Install or remove meshwg.service, the systemd unit that runs `meshwg join`.", _agent_args, run),
}

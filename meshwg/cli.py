"""`meshwg` command line: a thin dispatcher over meshwg/commands/*.

Each command module exposes COMMANDS = {name: (help, add_arguments(parser), run(args) -> int)}.
Options also come from a TOML config file (--config, default /etc/meshwg/meshwg.toml when it exists), under the
command line's; meshwg/cli_config.py derives its keys from these parsers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from meshwg import cli_config, logfmt
from meshwg import completion
from meshwg.commands.mesh import INVITE_ENV
from meshwg.errors import UserError
from meshwg.hotpath import describe

DEFAULT_CONFIG = "/etc/meshwg/meshwg.toml"
# `join`'s invite, given one way (argument, --invite-file or $MESHWG_INVITE) hides the config file's other ways:
# join refuses two of them, and the command line and the environment come before the file.
INVITE_SOURCES = ("invite", "invite_file")

COMMAND_MODULES = [
    "meshwg.commands.keys",      # genkey, pubkey, genpsk
    "meshwg.commands.config",    # strip
    "meshwg.commands.device",    # up, down, show
    "meshwg.commands.mesh",      # join, status, netcheck
    "meshwg.commands.ping",      # ping
    "meshwg.commands.scenario",  # scenario run|list
    "meshwg.commands.service",   # service install|uninstall (systemd)
    "meshwg.commands.leave",     # leave
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshwg", description="Mesh VPN on a userspace WireGuard data plane.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="least severe messages logged (default warning; `join` logs info)")
    parser.add_argument("--log-format", default="text", choices=list(logfmt.FORMATS),
                        help="text lines (UTC time, level, logger: message) or one JSON object per line")
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML config file: keys are long option names, a table per command ([join]); "
                             f"flags override it (default {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--version", action=cli_config.LazyVersion,
                        text=lambda: f"meshwg {cli_config.package_version()} ({describe()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for name, (help_text, add_arguments, run) in module.COMMANDS.items():
            command_parser = sub.add_parser(name, help=help_text, description=help_text)
            add_arguments(command_parser)
            command_parser.set_defaults(run=run)
    completion.add_command(sub).set_defaults(run=_print_completion)
    # Global flags before or after the command: `meshwg join --log-level debug` as `meshwg --log-level debug join`.
    cli_config.share_options(parser, ("log_level", "log_format", "config_file"))
    return parser


def parse_args(argv: list[str] | None = None, warn=None) -> argparse.Namespace:
    """The command line over the config file; cli_config.ConfigError for a bad file."""
    env = set(INVITE_SOURCES) if INVITE_ENV in os.environ else set()
    return cli_config.parse_args(build_parser(), argv, DEFAULT_CONFIG, warn or _warn, exclusive=(INVITE_SOURCES,),
                                 given_elsewhere=env)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except cli_config.ConfigError as err:
        print(f"meshwg: {err}", file=sys.stderr)
        return 2
    logfmt.setup(args.log_level, args.log_format)
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"meshwg: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _print_completion(args) -> int:
    print(completion.script(build_parser(), args.shell), end="")
    return 0


def _warn(line: str) -> None:
    print(f"meshwg: {line}", file=sys.stderr)

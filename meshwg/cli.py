"""`meshwg` command line: a thin dispatcher over meshwg/commands/*.

Each command module exposes COMMANDS = {name: (help, add_arguments(parser), run(args) -> int)}.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from meshwg.errors import UserError
from meshwg.hotpath import version_line

COMMAND_MODULES = [
    "meshwg.commands.keys",      # genkey, pubkey, genpsk
    "meshwg.commands.config",    # strip
    "meshwg.commands.device",    # up, down, show
    "meshwg.commands.mesh",      # join, status, netcheck
    "meshwg.commands.scenario",  # scenario run|list
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshwg", description="Mesh VPN on a userspace WireGuard data plane.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=version_line("meshwg"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for name, (help_text, add_arguments, run) in module.COMMANDS.items():
            command_parser = sub.add_parser(name, help=help_text, description=help_text)
            add_arguments(command_parser)
            command_parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"meshwg: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

"""`meshwg strip CONFIG`: validate a wg-quick config and print its wg(8)-only form, like `wg-quick strip`."""

from __future__ import annotations

import argparse
import sys

from meshwg.config import wgquick
from meshwg.errors import UserError


def _strip_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="path of a wg-quick config file (- for stdin)")


def read_config_text(path: str) -> str:
    """The text of a config file; a missing or unreadable file is a one-line UserError."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{path}: {err.strerror or err}") from None


def run_strip(args: argparse.Namespace) -> int:
    filename = "<stdin>" if args.config == "-" else args.config
    sys.stdout.write(wgquick.strip(read_config_text(args.config), filename))
    return 0


COMMANDS = {
    "strip": ("Print a config with the wg-quick-only keys removed, like `wg-quick strip`.", _strip_arguments, run_strip),
}

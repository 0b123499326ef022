"""`completion bash|zsh` for both CLIs: shtab generates the script from the real parser, so every new command or
option completes without anyone keeping a hand-written script in step."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")
HELP = "print a shell completion script (e.g. `completion bash > /etc/bash_completion.d/NAME`)"
# Arguments that name a file or a directory (by metavar, else dest): the shells complete paths for them.
_FILES = {"FILE", "CONFIG", "DB", "MANIFEST"}
_DIRS = {"STATE_DIR"}


def add_command(sub, parents=()) -> argparse.ArgumentParser:
    """The `completion` subcommand on a subparsers action; the caller wires up how it runs."""
    parser = sub.add_parser("completion", parents=list(parents), help=HELP, description=HELP)
    parser.add_argument("shell", choices=SHELLS, help="the shell the script is for")
    return parser


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab  # lazily: ~30 ms, and only this command needs it

    for sub in _parsers(parser):
        for action in sub._actions:
            name = str(action.metavar or action.dest).upper()
            if name in _FILES:
                action.complete = shtab.FILE
            elif name in _DIRS:
                action.complete = shtab.DIRECTORY
    return shtab.complete(parser, shell)


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action._name_parser_map.values()):
                yield from _parsers(child)

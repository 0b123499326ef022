"""`meshwg scenario list|run NAME [--keep]|down LAB_JSON`: the NAT lab runner (scenarios/cli.py does the work)."""

from __future__ import annotations


def _add_arguments(parser) -> None:
    from scenarios.cli import add_arguments
    add_arguments(parser)


def _run(args) -> int:
    from scenarios.cli import run_command
    return run_command(args)


COMMANDS: dict = {
    "scenario": ("run the NAT lab scenarios in network namespaces (list, run NAME, down)", _add_arguments, _run),
}

"""`python -m scenarios list|run NAME [--keep]|down LAB_JSON` (also `meshwg scenario ...`)."""

from __future__ import annotations

import argparse
import os
import sys

from scenarios.definitions import SCENARIOS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="scenario_command", metavar="{list,run,down}", required=True)
    sub.add_parser("list", help="show the scenarios")
    run = sub.add_parser("run", help="build a scenario's NAT lab, start the mesh on it, check every pair")
    run.add_argument("name", help="scenario name (see `list`)")
    run.add_argument("--keep", action="store_true", help="leave the lab up afterwards for exploring")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds each pair may take to connect")
    down = sub.add_parser("down", help="tear down a lab left up by `run --keep`")
    down.add_argument("manifest", help="the lab.json path that `run --keep` printed")


def run_command(args: argparse.Namespace) -> int:
    if args.scenario_command == "list":
        width = max(len(name) for name in SCENARIOS)
        for name, scenario in SCENARIOS.items():
            print(f"{name:<{width}}  {scenario.description}")
        return 0
    if args.scenario_command == "down":
        from scenarios.topology import teardown_manifest
        removed = teardown_manifest(args.manifest)
        print(f"removed {len(removed)} namespaces")
        return 0
    scenario = SCENARIOS.get(args.name)
    if scenario is None:
        print(f"unknown scenario {args.name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("the NAT lab needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    from scenarios.runner import Timings, run
    outcome = run(scenario, keep=args.keep, timings=Timings(connect_timeout=args.timeout))
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios", description="The meshwg NAT lab scenarios.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except KeyboardInterrupt:
        return 130

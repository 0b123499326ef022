"""`meshwg ping NAME|IP`: disco pings to a peer through the running agent, as `tailscale ping` does.

Each ping is one request to the agent's status socket (meshwg.io.ipc.status_server, op "ping"): the agent pings the
peer on every candidate path and through the relay at once and answers with the path whose pong came first and its
round trip (meshwg.disco.user_ping). One a second, -c of them; --until-direct stops at the first direct answer and
exits 1 when none came ("direct connection not established"). Without it: 0 when any ping was answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from meshwg.commands.mesh import _common, _query
from meshwg.disco.user_ping import DEFAULT_TIMEOUT, MAX_TIMEOUT
from meshwg.errors import UserError

INTERVAL = 1.0      # seconds from one ping's start to the next's
DEFAULT_COUNT = 10


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 100000:
        raise argparse.ArgumentTypeError(f"bad count {text!r} (1 or more)")
    return n


def _timeout(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = 0.0
    if not 0 < t <= MAX_TIMEOUT:   # NaN too
        raise argparse.ArgumentTypeError(f"bad timeout {text!r} (seconds, above 0 and at most {MAX_TIMEOUT:g})")
    return t


def _ping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("peer", metavar="NAME|IP", help="the peer: its name, mesh IP address or public key")
    p.add_argument("-c", "--count", type=_count, default=DEFAULT_COUNT,
                   help=f"how many pings, one a second (default {DEFAULT_COUNT})")
    p.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT,
                   help=f"seconds each ping waits for its pong (default {DEFAULT_TIMEOUT:g}, at most {MAX_TIMEOUT:g})")
    p.add_argument("--until-direct", action="store_true",
                   help="stop at the first pong from a direct path; exit 1 if none came within --count pings")
    p.add_argument("--json", action="store_true", help="one JSON object a ping")
    _common(p, query=True)


def _ms(rtt_ms: float) -> str:
    return f"{rtt_ms:.1f} ms" if rtt_ms >= 1 else f"{rtt_ms:.2f} ms"


def format_pong(rep: dict) -> str:
    """One ping's line: which path answered first and how fast, or that none did."""
    who = f"{rep['peer']} ({rep['address']})" if rep.get("address") else rep["peer"]
    if rep["path"] is None:
        return f"no pong from {who} within {rep['timeout']:g} s"
    via = rep["endpoint"] if rep["path"] == "direct" else "relay"
    return f"pong from {who} via {via} in {_ms(rep['rtt_ms'])}"


def run_ping(args) -> int:
    answered = False
    start = time.monotonic()
    for i in range(args.count):
        if i:
            time.sleep(max(0.0, start + i * INTERVAL - time.monotonic()))
        rep = _query(args, {"op": "ping", "peer": args.peer, "timeout": args.timeout})
        if "error" in rep:
            raise UserError(f"ping: {rep['error']}")
        print(json.dumps(rep) if args.json else format_pong(rep), flush=True)
        answered |= rep["path"] is not None
        if args.until_direct and rep["path"] == "direct":
            return 0
    if args.until_direct:
        print("direct connection not established", file=sys.stderr)
        return 1
    return 0 if answered else 1


COMMANDS = {
    "ping": ("Ping a peer over every path (disco): which path answered first, and how fast.", _ping_args, run_ping),
}

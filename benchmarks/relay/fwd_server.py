"""The relay under the forwarding microbenchmark: a relay-only SignalServer on 127.0.0.1 in this process,
with the given node keys allowed (no control channel: the benchmark's emulated nodes only HELLO and SEND).

    fwd_server.py DB KEYS_HEX_FILE [--node-rate MBIT] [--total-rate MBIT] [--profile FILE]

Prints "port <udp port> <server public key hex>" once listening; runs until killed (SIGTERM) or stdin closes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import trio  # noqa: E402

from signal_server.server import ServerConfig, SignalServer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("keys")
    p.add_argument("--node-rate", type=float, default=None, help="Mbit/s per node (None: the server's default)")
    p.add_argument("--total-rate", type=float, default=None)
    p.add_argument("--profile", metavar="FILE")
    args = p.parse_args()
    cfg = ServerConfig(db=args.db, init=True, control_enabled=False, udp=[("127.0.0.1", 0)], relay_tcp=[],
                       plain_udp=None, stun_alt_port=None)
    for name, value in (("relay_node_rate", args.node_rate), ("relay_total_rate", args.total_rate)):
        if value is not None and hasattr(cfg, name):
            setattr(cfg, name, value)
    srv = SignalServer(cfg)
    if args.node_rate is not None and not hasattr(cfg, "relay_node_rate"):
        # The code before the limit flags: lift the per-key limits by hand.
        from signal_server.ratelimit import KeyedLimiter
        srv.relay.pkt_limit = KeyedLimiter(1e9, 1e9)
        srv.relay.byte_limit = KeyedLimiter(args.node_rate * 1e6 / 8, args.node_rate * 1e6 / 4)
    with open(args.keys) as f:
        for line in f:
            if line.strip():
                srv.relay.allowed.add(bytes.fromhex(line.strip()))
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()

    async def run():
        async with trio.open_nursery() as n:
            bound = await n.start(srv.run)
            print("port", bound.udp[0][1], srv.server_pk.hex(), flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            n.cancel_scope.cancel()

    if profiler:
        profiler.enable()
    trio.run(run)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    sys.stdout.write("counters " + " ".join(f"{k}={v}" for k, v in sorted(srv.relay.counters.items())) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

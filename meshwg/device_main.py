"""Run one userspace WireGuard device (TUN + UDP + UAPI) until SIGINT/SIGTERM or the TUN disappears.

    run_device(tun, listener, ready=callback)   # blocks; removes socket files and closes fds on exit

Used by `meshwg-tun` (the wireguard-go compatible launcher) and by `meshwg up`.
Dropped packets are logged (INFO, "drops: reason=n ...") every MESHWG_STATS_INTERVAL seconds
(default 60) when they changed, and once more at shutdown.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from collections.abc import Callable

import trio

from meshwg.io.dataplane.device import Device
from meshwg.io.dataplane.tun import Tun
from meshwg.io.ipc.uapi_server import UapiListener

log = logging.getLogger(__name__)
DEFAULT_STATS_INTERVAL = 60.0


def format_drops(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


async def _log_drops(device: Device, interval: float) -> None:
    last: dict[str, int] = {}
    while True:
        await trio.sleep(interval)
        counts = device.drop_counts()
        if counts != last:
            log.info("%s: drops: %s", device.name, format_drops(counts))
            last = counts


async def _main(device: Device, ready: Callable[[], None] | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            if ready is not None:
                ready()

            async def watch_signals():
                async for signum in signals:
                    log.info("signal %d: shutting down", signum)
                    device.stop(f"signal {signum}")
                    return

            nursery.start_soon(watch_signals)
            nursery.start_soon(_log_drops, device, _stats_interval())
            await device.stopped.wait()
            nursery.cancel_scope.cancel()
    log.info("%s: drops: %s", device.name, format_drops(device.drop_counts()))


def _stats_interval() -> float:
    try:
        return max(0.1, float(os.environ.get("MESHWG_STATS_INTERVAL", DEFAULT_STATS_INTERVAL)))
    except ValueError:
        return DEFAULT_STATS_INTERVAL


def run_device(tun: Tun, listener: UapiListener, *, ready: Callable[[], None] | None = None) -> str:
    """Serve until stopped; return the reason. Everything is closed and unlinked on the way out."""
    device = Device(tun, listener)
    # Everything allocated so far lives as long as the process: keep it out of the collector's
    # full passes, which would otherwise walk it and stall the data path for milliseconds.
    gc.collect()
    gc.freeze()
    try:
        trio.run(_main, device, ready)
    finally:
        device.close()
    return device.stop_reason or "stopped"

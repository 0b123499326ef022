"""Run one userspace WireGuard device (TUN + UDP + UAPI) until SIGINT/SIGTERM or the TUN disappears.

    run_device(tun, listener, ready=callback)   # blocks; removes socket files and closes fds on exit
    drop_counters(device) -> dict[str, int]      # what was dropped and why (core, TUN, UDP send)

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

from meshwg.io.device import Device
from meshwg.io.tun import Tun
from meshwg.io.uapi_server import UapiListener

log = logging.getLogger(__name__)
DEFAULT_STATS_INTERVAL = 60.0


def drop_counters(device: Device) -> dict[str, int]:
    """Every packet the device dropped, by reason: the core's (bad datagrams, no route, ...),
    the kernel's on our UDP sockets, TUN writes the kernel refused, and the driver's send failures."""
    counts = dict(device.core.drops)
    if device.tun.write_drops:
        counts["tun_write"] = device.tun.write_drops
    if kernel := device.udp.kernel_drops():
        counts["socket"] = kernel  # junk refused by the socket filter, or a full receive buffer
    for key in ("send_error", "send_no_socket", "send_no_sender", "send_raw_error", "gso_disabled"):
        if device.driver.stats[key]:
            counts[key] = device.driver.stats[key]
    return counts


def format_drops(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


async def _log_drops(device: Device, interval: float) -> None:
    last: dict[str, int] = {}
    while True:
        await trio.sleep(interval)
        counts = drop_counters(device)
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
    log.info("%s: drops: %s", device.name, format_drops(drop_counters(device)))


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

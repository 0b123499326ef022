"""Run one userspace WireGuard device (TUN + UDP + UAPI) until SIGINT/SIGTERM or the TUN disappears.

    run_device(tun, listener, ready=callback)   # blocks; removes socket files and closes fds on exit

Used by `meshwg-tun` (the wireguard-go compatible launcher) and by `meshwg up`.
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
            await device.stopped.wait()
            nursery.cancel_scope.cancel()


def run_device(tun: Tun, listener: UapiListener, *, ready: Callable[[], None] | None = None,
               listen_port: int = 0) -> str:
    """Serve until stopped; return the reason. Everything is closed and unlinked on the way out."""
    device = Device(tun, listener, listen_port=listen_port)
    # Everything allocated so far lives as long as the process: keep it out of the collector's
    # full passes, which would otherwise walk it and stall the data path for milliseconds.
    gc.collect()
    gc.freeze()
    try:
        trio.run(_main, device, ready)
    finally:
        device.close()
    return device.stop_reason or "stopped"

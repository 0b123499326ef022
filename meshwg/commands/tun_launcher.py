"""`meshwg-tun [-f] INTERFACE`: a wireguard-go compatible launcher for wg-quick.

    WG_QUICK_USERSPACE_IMPLEMENTATION=meshwg-tun wg-quick up ./wg0.conf

Creates the TUN and the UAPI socket in the foreground (so errors reach the caller's exit status),
then daemonizes unless `-f`/`--foreground` or WG_PROCESS_FOREGROUND=1. The parent exits 0 only once
the daemon serves UAPI, so wg-quick's next `wg setconf` finds the socket ready.
LOG_LEVEL=verbose|error|silent as for wireguard-go (and meshwg's debug|info|warning|error, which `meshwg up` passes
with its --log-level, and its --log-format as MESHWG_LOG_FORMAT); MESHWG_LOG_FILE=path keeps a daemon's log, MESHWG_LOG_FORMAT=json
writes it as JSON lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

# wireguard-go's words, and meshwg's --log-level ones (`meshwg up` passes its own).
LEVELS = {"verbose": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "silent": logging.CRITICAL + 1}


def _setup_logging() -> None:
    level = LEVELS.get(os.environ.get("LOG_LEVEL", "error").lower(), logging.ERROR)
    from meshwg import logfmt

    # The format of meshwg and meshwg-signal; MESHWG_LOG_FORMAT=json as their --log-format json.
    kind = os.environ.get("MESHWG_LOG_FORMAT", "text")
    logfmt.setup(level, kind if kind in logfmt.FORMATS else "text", filename=os.environ.get("MESHWG_LOG_FILE"))


def main(argv: list[str] | None = None) -> int:
    from meshwg.hotpath import version_line

    parser = argparse.ArgumentParser(prog="meshwg-tun", description="Userspace WireGuard device (wireguard-go compatible).")
    parser.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    parser.add_argument("--version", action="version", version=version_line("meshwg-tun"))
    parser.add_argument("interface", help="interface name (a template like wg%%d is allowed)")
    args = parser.parse_args(argv)
    foreground = args.foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    return launch(args.interface, foreground=foreground)


def _exit_on_signal(signum, frame):
    raise SystemExit(0)


def launch(iface: str, *, foreground: bool) -> int:
    # Until the trio loop takes over signals, SIGTERM must still unwind through the cleanup
    # (a TERM right after the socket appears would otherwise leave it behind).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    from meshwg.io.dataplane.tun import Tun
    from meshwg.io.ipc.uapi_server import UapiListener

    try:
        tun = Tun.open(iface)
    except OSError as err:
        print(f"meshwg-tun: failed to create TUN device {iface!r}: {err}", file=sys.stderr)
        return 1
    try:
        listener = UapiListener(tun.name)
    except OSError as err:
        tun.close()
        print(f"meshwg-tun: failed to open UAPI socket for {tun.name}: {err}", file=sys.stderr)
        return 1

    if foreground:
        _setup_logging()
        return _serve(tun, listener, ready=None)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        # Parent: wait for "ready" (or the daemon's death), then leave the TUN to the daemon.
        os.close(write_end)
        tun.fd = -1  # the child owns it now; do not close-and-remove the interface
        listener.sock.detach()
        status = os.read(read_end, 1)
        os.close(read_end)
        if status != b"1":
            print(f"meshwg-tun: daemon for {tun.name} failed to start", file=sys.stderr)
            return 1
        return 0

    # Child: new session, no terminal, stdio to /dev/null.
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _setup_logging()

    def ready() -> None:
        os.write(write_end, b"1")
        os.close(write_end)

    code = 1
    try:
        code = _serve(tun, listener, ready=ready)
    except SystemExit:
        code = 0
    except BaseException:
        logging.getLogger("meshwg-tun").exception("daemon failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _serve(tun, listener, *, ready) -> int:
    try:
        reason = _run(tun, listener, ready)
    finally:
        # Idempotent: run_device already closed both unless we were interrupted before it ran.
        listener.close()
        tun.close()
    logging.getLogger("meshwg-tun").info("%s: %s", tun.name, reason)
    return 0


def _run(tun, listener, ready) -> str:
    from meshwg.device_main import run_device

    profile_dir = os.environ.get("MESHWG_PROFILE")
    if profile_dir:
        # Benchmarks: profile the whole device run (benchmarks/throughput --profile).
        import cProfile

        profiler = cProfile.Profile()
        try:
            reason = profiler.runcall(run_device, tun, listener, ready=ready)
        finally:
            profiler.dump_stats(os.path.join(profile_dir, f"{os.getpid()}.prof"))
    else:
        reason = run_device(tun, listener, ready=ready)
    return reason


if __name__ == "__main__":
    sys.exit(main())

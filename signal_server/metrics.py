"""Prometheus text rendering and a tiny HTTP listener for /metrics (trio)."""

from __future__ import annotations

import logging

import trio

log = logging.getLogger("signal.metrics")


def render(counters: dict, gauges: dict, prefix: str = "meshwg_signal_") -> str:
    lines = []
    for name, value in sorted(gauges.items()):
        lines.append(f"# TYPE {prefix}{name} gauge")
        lines.append(f"{prefix}{name} {value}")
    for name, value in sorted(counters.items()):
        lines.append(f"# TYPE {prefix}{name}_total counter")
        lines.append(f"{prefix}{name}_total {value}")
    return "\n".join(lines) + "\n"


def parse_text(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def serve_metrics(listeners, render_fn) -> None:
    async def handle(stream):
        try:
            with trio.move_on_after(2):
                buf = b""
                while b"\r\n\r\n" not in buf and len(buf) < 4096:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
                path = buf.split(b" ", 2)[1] if buf.count(b" ") >= 2 else b""
                if path.split(b"?")[0] == b"/metrics":
                    body, status = render_fn().encode(), b"200 OK"
                else:
                    body, status = b"not found\n", b"404 Not Found"
                await stream.send_all(
                    b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)

"""One log format for `meshwg` (agent and device), `meshwg-signal` and `meshwg-tun`, and the words log lines use
for addresses, endpoints and peers.

Pure apart from `setup()`, which installs the handler: the formatters take the record's own time, the helpers
turn addresses into `host:port` (`[v6]:port`), endpoints into "relay HOST:PORT/UDP" or a host:port, and keys
into a short base64 prefix, so no line shows a Python repr such as `('198.51.100.30', 46598)`.

    text: 2026-12-05T03:40:00.123Z INFO meshwg.agent: message
    json: {"ts": "2026-12-05T03:40:00.123Z", "level": "INFO", "logger": "meshwg.agent", "msg": "message"}
"""

from __future__ import annotations

import base64
import calendar
import json
import logging
import time

FORMATS = ("text", "json")
SHORT_KEY_CHARS = 8  # as `wg show`'s abbreviations: enough to tell a mesh's keys apart


def timestamp(created: float) -> str:
    """UTC, ISO 8601 with milliseconds: 2026-12-05T03:40:00.123Z."""
    ms = int(created * 1000) % 1000  # from the float itself: record.msecs rounds differently across versions
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


TIMESTAMP_PATTERN = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def parse_timestamp(text: str) -> float:
    """timestamp()'s text back to seconds since the epoch (for tools and tests that read logs)."""
    t = time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
    return calendar.timegm(t) + int(text[20:23]) / 1000


class TextFormatter(logging.Formatter):
    """`TS LEVEL logger: message`, the traceback (if any) on the lines below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{timestamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        extra = _exception_text(self, record)
        return f"{line}\n{extra}" if extra else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and exc (the traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": timestamp(record.created), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        extra = _exception_text(self, record)
        if extra:
            out["exc"] = extra
        return json.dumps(out, ensure_ascii=False)


def _exception_text(fmt: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        parts.append(fmt.formatException(record.exc_info))
    if record.stack_info:
        parts.append(fmt.formatStack(record.stack_info))
    return "\n".join(parts)


def formatter(kind: str) -> logging.Formatter:
    if kind not in FORMATS:
        raise ValueError(f"log format {kind!r}: want one of {', '.join(FORMATS)}")
    return JsonFormatter() if kind == "json" else TextFormatter()


def setup(level: int | str, kind: str = "text", *, stream=None, filename: str | None = None) -> logging.Handler | None:
    """The root logger's handler: stderr, `stream` or `filename`, in format `kind`. As logging.basicConfig, it
    leaves a root logger that someone else configured (a test's capture) alone and returns None; a handler of
    an earlier setup() is replaced."""
    fmt = formatter(kind)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "meshwg_logfmt", False)]
    if len(ours) != len(root.handlers):
        return None
    handler = logging.FileHandler(filename) if filename else logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    handler.meshwg_logfmt = True
    for old in ours:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


# --- words for log lines ---------------------------------------------------------------------------------------


def format_addr(addr) -> str:
    """(host, port[, flow, scope]) -> host:port, [v6]:port; a string as it is; None -> "-"."""
    if addr is None:
        return "-"
    if isinstance(addr, (tuple, list)) and len(addr) >= 2:
        host, port = str(addr[0]), addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)


def short_key(key: bytes | str) -> str:
    """A public key as the first characters of its base64 (a base64 string is shortened as it is)."""
    text = key if isinstance(key, str) else base64.b64encode(key).decode()
    return text[:SHORT_KEY_CHARS]


def peer_label(name: str | None, key: bytes | str) -> str:
    """The peer's name when it has one, else its short key."""
    return name or short_key(key)


def endpoint_kind(ep) -> str:
    """"relay" for an endpoint through the relay (it names a peer, not an address), else "direct"."""
    return "relay" if hasattr(ep, "peer_key") else "direct"


def format_endpoint(ep, relay: tuple[str, object] | None = None) -> str:
    """A path for a log line: "relay HOST:PORT/UDP" (relay = (transport, address), when known), "HOST:PORT",
    or "HOST:PORT (socket N)" for a birthday socket."""
    if endpoint_kind(ep) == "relay":
        if relay is None or relay[1] is None:
            return "relay"
        transport, addr = relay
        return f"relay {format_addr(addr)}/{transport.upper()}"
    if hasattr(ep, "socket") and hasattr(ep, "addr"):
        return f"{format_addr(ep.addr)} (socket {ep.socket})"
    return format_addr(ep)


def path_change_level(old_kind: str | None, new_kind: str) -> int:
    """INFO when a peer's path changes kind (relay <-> direct, or its first path), DEBUG for a new address of the
    same kind: a roaming or re-punched peer would otherwise fill the log."""
    return logging.INFO if old_kind != new_kind else logging.DEBUG

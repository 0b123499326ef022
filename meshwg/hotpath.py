"""Which hot-path implementations this installation runs: the compiled modules (built by setup.py)
or their pure-Python equivalents (same behaviour, a higher per-packet latency)."""

from __future__ import annotations

from meshwg.io.dataplane.fastio import fastio
from meshwg.wg import crypto


def missing_compiled() -> list[str]:
    """The compiled modules not in use: not built (no compiler or libsodium-dev at install time),
    or turned off with MESHWG_PURE_PYTHON=1."""
    missing = []
    if crypto.TRANSPORT_BACKEND == "cryptography":
        missing.append("meshwg.wg._transport")
    if fastio is None:
        missing.append("meshwg.io.dataplane._fastio")
    return missing


def version_line(program: str) -> str:
    """`program --version`: the release and which hot path this installation runs."""
    from meshwg import __version__
    return f"{program} {__version__} ({describe()})"


def describe() -> str:
    io = "compiled" if fastio is not None else "pure Python"
    return f"transport crypto: {crypto.TRANSPORT_BACKEND}; TUN/UDP drain: {io}"

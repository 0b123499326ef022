"""Helpers shared by the command modules (no commands here)."""

from __future__ import annotations

import re

# Linux interface names as wg-quick accepts them (IFNAMSIZ: at most 15 bytes).
IFACE_RE = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")


def human_bytes(n: int) -> str:
    """A byte count as `wg show` prints it: "512 B", "1.50 KiB", ... up to GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"

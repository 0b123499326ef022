"""The compiled TUN/UDP drain (meshwg/io/dataplane/_fastio.c), or None where it was not built.

Callers keep a pure-Python path for None (slower per packet, same behaviour); see setup.py.
MESHWG_PURE_PYTHON=1 forces the pure-Python paths (to compare them, or to rule the C out).
"""

from __future__ import annotations

import os

fastio = None
if os.environ.get("MESHWG_PURE_PYTHON", "") != "1":
    try:
        from meshwg.io.dataplane import _fastio as fastio
    except ImportError:
        fastio = None

"""Shared test fixtures.

Real-component tests are never skipped: a missing component or missing root fails the run.
"""

from __future__ import annotations

import os
import shutil

import pytest

REAL_COMPONENTS = ["wireguard-go", "wg", "wg-quick", "ip", "nft", "conntrack", "iperf3", "turnserver", "stun"]


def require_real_components(*names: str) -> None:
    """Fail (not skip) the calling test when a real component or root is missing."""
    if os.geteuid() != 0:
        pytest.fail("real-component tests need root (network namespaces); run scripts/test as root")
    missing = [name for name in (names or REAL_COMPONENTS) if shutil.which(name) is None]
    if missing:
        pytest.fail(f"missing real components: {', '.join(missing)} (scripts/setup installs them)")

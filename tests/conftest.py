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


# Hypothesis profiles: "ci" (the default) is fixed and derandomized so a CI run is reproducible;
# MESHWG_HYPOTHESIS_PROFILE=long runs ten times the examples with fresh randomness (local bug hunts).
# Tests that set max_examples themselves keep their count under either profile.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, print_blob=True)
_hyp_settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True)
_hyp_settings.load_profile(os.environ.get("MESHWG_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["compiled", "python"])
def impl(request, monkeypatch):
    """Runs a test once with the compiled hot path (meshwg/io/dataplane/_fastio.c) and once with the pure-Python
    one, in every module that picks between them."""
    from meshwg.io.dataplane import _fastio, driver, tun, udp

    module = _fastio if request.param == "compiled" else None
    for mod in (tun, udp, driver):
        monkeypatch.setattr(mod, "fastio", module)
    return request.param

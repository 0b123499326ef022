"""The sans-IO cores stay sans-IO: every module documented as pure imports, in a fresh interpreter, without
trio or any socket/select/subprocess machinery, and none of them reads a clock (time is an input).

A pure module that starts importing a shell (as `meshwg.control`'s package once did, pulling trio into
the mesh node, the demultiplexer and the server's relay core) fails here, and so does a new module whose
docstring says "pure" or "sans-IO" without being listed.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE_PACKAGES = ("meshwg/wg", "meshwg/disco", "meshwg/disco/techniques", "meshwg/mesh", "meshwg/signaling",
                 "meshwg/config")
PURE_MODULES = (
    "meshwg/token_bucket.py", "meshwg/nonce_cache.py", "meshwg/control/reconnect.py", "meshwg/io/oscfg/route_plan.py",
    "meshwg/counters.py", "meshwg/control/events.py", "meshwg/control/entry_check.py", "signal_server/store_api.py",
    "signal_server/conn_limits.py", "signal_server/directory.py", "signal_server/invites.py", "signal_server/ipam.py",
    "signal_server/registry.py", "signal_server/control_core.py", "signal_server/routes.py",
    "signal_server/plain_ingress.py", "signal_server/plain_config.py", "signal_server/policy.py",
    "signal_server/punch.py", "signal_server/ratelimit.py", "signal_server/relay.py", "signal_server/stun_responder.py",
    "signal_server/local_routes.py", "signal_server/store_rows.py", "signal_server/relay_auth.py",
    "signal_server/live_state.py",
    "meshwg/cli_config.py", "meshwg/logfmt.py", "meshwg/service_status.py", "meshwg/service_units.py",
)
# Shells whose docstrings mention the pure code they drive, not modules that claim to be pure.
SHELLS = {"meshwg/control/__init__.py", "meshwg/control/relay_client.py", "meshwg/io/dataplane/driver.py", "meshwg/io/dataplane/fastio.py",
          "meshwg/hotpath.py", "meshwg/io/dataplane/device.py", "meshwg/io/dataplane/__init__.py", "signal_server/server.py",
          "signal_server/lograte.py"}
FORBIDDEN = ("trio", "socket", "select", "selectors", "subprocess", "asyncio")
CLOCK_CALLS = re.compile(r"^(time\.(time|monotonic|perf_counter|sleep)(_ns)?|datetime\.(datetime\.)?(now|utcnow|today))$")


def pure_files() -> list[str]:
    files = [str(p.relative_to(ROOT)) for pkg in PURE_PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))]
    return files + list(PURE_MODULES)


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


@pytest.mark.parametrize("path", pure_files())
def test_imports_no_io_machinery(path):
    code = f"import sys, json; import {module_name(path)}; print(json.dumps(sorted(set(sys.modules))))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout))
    assert not loaded & set(FORBIDDEN), f"{path} loads {sorted(loaded & set(FORBIDDEN))}"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func)


@pytest.mark.parametrize("path", pure_files())
def test_reads_no_clock(path):
    tree = ast.parse((ROOT / path).read_text())
    clocks = sorted({name for name in _calls(tree) if CLOCK_CALLS.match(name)})
    assert not clocks, f"{path} reads the clock: {clocks}"


def test_every_module_that_says_it_is_pure_is_checked():
    claimed = set()
    for p in list((ROOT / "meshwg").rglob("*.py")) + list((ROOT / "signal_server").glob("*.py")):
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        first = doc.split("\n\n")[0]
        if re.search(r"\bpure\b|sans-io", first, re.I):
            claimed.add(str(p.relative_to(ROOT)))
    unchecked = claimed - set(pure_files()) - SHELLS
    assert not unchecked, f"documented as pure but not checked here: {sorted(unchecked)}"


def test_the_check_sees_a_shell():
    """The import check can fail: the trio control client is caught."""
    code = "import sys, json; import meshwg.control.client; print(json.dumps(sorted(set(sys.modules))))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "trio" in json.loads(res.stdout)
    assert list(_calls(ast.parse("time.monotonic()"))) == ["time.monotonic"]
    assert CLOCK_CALLS.match("time.monotonic") and not CLOCK_CALLS.match("self.time")

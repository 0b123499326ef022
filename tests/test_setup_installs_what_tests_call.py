"""Every program a test requires comes from a Debian package that scripts/setup installs (or one every Debian
system has): a fresh machine runs the whole suite. CI's machine may already have a program by chance; a
user's does not (tcpdump was missing once: six lab tests failed on a fresh machine)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALL = re.compile(r"require_real_components\(([^)]*)\)")
NAME = re.compile(r'"([A-Za-z0-9_.+-]+)"')


def required_programs() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for args in CALL.findall(path.read_text()):
            names.update(NAME.findall(args))
    return names


def setup_packages() -> set[str]:
    text = (ROOT / "scripts/setup").read_text()
    block = re.search(r"APT_PACKAGES=\(([^)]*)\)", text, re.S).group(1)
    return set(re.sub(r"#[^\n]*", "", block).split())


def package_of(program: str) -> tuple[str, str] | None:
    """(package, priority) that ships `program`, or None when no package does (or dpkg is missing)."""
    path = shutil.which(program)
    if path is None:
        return None
    real = os.path.realpath(path)
    # usr-merged systems: dpkg may know /bin/ip as /bin/ip while PATH finds /usr/bin/ip, or the reverse.
    merged = [p.removeprefix("/usr") if p.startswith("/usr/") else "/usr" + p for p in (real, path)]
    for candidate in dict.fromkeys([real, path, *merged]):
        res = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if res.returncode == 0:
            pkg = res.stdout.split(":", 1)[0].split(",")[0].strip()
            prio = subprocess.run(["dpkg-query", "-W", "-f=${Priority}", pkg], capture_output=True, text=True).stdout
            return pkg, prio.strip()
    return None


def test_the_scan_finds_the_lab_programs():
    progs = required_programs()
    assert {"wg", "wireguard-go", "nft", "tcpdump", "ping"} <= progs  # the scan itself can fail


def test_every_required_program_is_installed_by_setup():
    if shutil.which("dpkg") is None:
        pytest.fail("dpkg is needed to map programs to Debian packages (the project targets Debian)")
    wanted = setup_packages()
    missing = []
    for prog in sorted(required_programs()):
        found = package_of(prog)
        if found is None:
            missing.append(f"{prog} (not installed here: which package ships it?)")
            continue
        pkg, prio = found
        if prio != "required" and pkg not in wanted:
            missing.append(f"{prog} (Debian package {pkg})")
    assert not missing, "scripts/setup does not install: " + ", ".join(missing)

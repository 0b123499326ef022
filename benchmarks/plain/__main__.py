"""Run: .venv/bin/python benchmarks/plain [--time 5] [--pings 100]  (as root; see run.py)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))           # procstat
sys.path.insert(0, os.path.join(REPO, "tests", "scenarios"))   # mesh_lab (MeshLab, MeshNode, Pinger, read_pcap)
sys.path.insert(0, REPO)

from run import main  # noqa: E402

raise SystemExit(main())

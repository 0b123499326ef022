"""Run: .venv/bin/python benchmarks/conn_exhaustion [--seconds 8]  (see run.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))   # procstat
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from run import main  # noqa: E402

raise SystemExit(main())

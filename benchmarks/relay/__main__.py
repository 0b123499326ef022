"""Run: .venv/bin/python benchmarks/relay [--time 8] [--pings 200] [--forward]  (as root; see lab.py, forward.py).
TURN reference, loopback (coturn beside forward.py, same run): .venv/bin/python benchmarks/relay/turn.py"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))                                   # procstat
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "tests", "scenarios")))  # mesh_lab

from lab import main  # noqa: E402

raise SystemExit(main())

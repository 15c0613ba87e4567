"""Torture the coordinator: SIGKILL it at every crash point and at random instants, kill the
participants, break the network, then check offline that every guarantee held.

    python scripts/torture.py                 # 200 coordinator kills (what make test runs)
    python scripts/torture.py --kills 2000    # make torture
    python scripts/torture.py --seed 1234     # replay a failing run
    python scripts/torture.py --replicas 3 --postgresql --kills 600    # make torture-replicas

The harness lives in tests/torture/ (it is also the short run of ``make test``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.torture.command import main

if __name__ == "__main__":
    sys.exit(main())

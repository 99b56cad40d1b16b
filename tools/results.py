"""Result tables and plots of sweeps or runs (the same as `ld3m table`).

.venv/bin/python tools/results.py sweeps_out/cifar10_ld3m [more dirs] [--out report/]
"""

from __future__ import annotations

import sys

from ld3m.cli import main

if __name__ == "__main__":
    sys.exit(main(["table", *sys.argv[1:]]))

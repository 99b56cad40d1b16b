"""`python -m ld3m` runs the command-line interface."""

import sys

from ld3m.cli import main

sys.exit(main())

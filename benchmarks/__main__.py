"""``python -m benchmarks``: the layer benchmark's command line (see ``--help``)."""

import sys

from benchmarks.cli import main

sys.exit(main())

"""``python -m benchmarks``: the layer benchmark's command line (see ``--help``)."""

import sys

from benchmarks.bench_layers import main

sys.exit(main())

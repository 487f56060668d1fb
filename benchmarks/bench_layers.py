"""Benchmark the tensor-parallel layers against dense and PyTorch: ``python benchmarks/bench_layers.py``.

The same as ``python -m benchmarks``; see ``benchmarks/README.md`` and ``--help``.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: benchmarks and tp_gpu
    from benchmarks.cli import main

    sys.exit(main())

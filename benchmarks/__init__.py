"""tp_gpu's benchmarks, a small package with one concern per module.

* :mod:`benchmarks.harness`: timing (interleaved, shuffled rounds, warm-up, spread), memory, BLAS threads;
* :mod:`benchmarks.machine`: what the machine is (CPU, GPUs, BLAS and its environment, torch);
* :mod:`benchmarks.cases`: one spec per layer kind: the TP layer, its dense computation, torch;
* :mod:`benchmarks.comparison`: one comparison (TP, dense, torch on the same weights) and its check;
* :mod:`benchmarks.runner`: every worker count of each (layer, shape, dtype, mode), on the same data;
* :mod:`benchmarks.report`: records, targets, Markdown and JSON;
* :mod:`benchmarks.plots`: the one plotting function, and the two plots it draws;
* :mod:`benchmarks.cli`: the command line (``python -m benchmarks``);
* :mod:`benchmarks.scaling_model` and :mod:`benchmarks.transfers`: the multi-GPU model and its
  transfer counts.
"""

import sys as _sys
from pathlib import Path as _Path

# Run from a checkout without ``pip install -e .`` (as on a lent GPU machine with PYTHONPATH=.):
# the package lives in src/ (the src layout), so the checkout's copy comes first, as it did before.
_SRC = str(_Path(__file__).resolve().parent.parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

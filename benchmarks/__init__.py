"""tp_gpu's benchmarks, a small package with one concern per module.

One skeleton serves every benchmark program:

* :mod:`benchmarks.skeleton`: a program's command line (common options), start (machine, threads),
  runs saved as they go, the results folder, ``--render`` and ``--update``;
* :mod:`benchmarks.harness`: timing (interleaved, shuffled rounds, warm-up, spread), memory, BLAS threads;
* :mod:`benchmarks.machine`: what the machine is (CPU, GPUs, BLAS and its environment, torch);
* :mod:`benchmarks.report`: records, targets' status, Markdown pieces and JSON;
* :mod:`benchmarks.plots`: the figure helpers, and the layer benchmark's plots.

The programs on it, each declaring its cases, targets and tables:

* :mod:`benchmarks.bench_layers` (``python -m benchmarks``): the layers against dense and torch;
  :mod:`benchmarks.cases` (one spec per layer kind), :mod:`benchmarks.comparison` (one comparison and
  its check), :mod:`benchmarks.runner` (every worker count of a group), :mod:`benchmarks.layer_report`;
* :mod:`benchmarks.training_step`: a whole training step, phase by phase; :mod:`benchmarks.step_case`,
  :mod:`benchmarks.step_micro` (Adam, the embedding backward), :mod:`benchmarks.step_report`;
* :mod:`benchmarks.bench_encode`: sentence embeddings against sentence-transformers;
* :mod:`benchmarks.tape_overhead`: the autograd tape's cost per recorded op.

Beside them, :mod:`benchmarks.scaling_model` and :mod:`benchmarks.transfers` (the multi-GPU model and
its transfer counts), ``activation_memory.py`` and ``gpu_check.py``.
"""

import sys as _sys
from pathlib import Path as _Path

# Run from a checkout without ``pip install -e .`` (as on a lent GPU machine with PYTHONPATH=.):
# the package lives in src/ (the src layout), so the checkout's copy comes first, as it did before.
_SRC = str(_Path(__file__).resolve().parent.parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

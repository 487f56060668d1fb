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

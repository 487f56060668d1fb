"""Shared fixtures: every layer test runs on each backend available here.

Backends, as ``(name, devices)``:

* ``numpy``: one host device;
* ``sim1``, ``sim3``, ``sim8``: simulated devices. With ``n_workers`` 1..8,
  ``sim3`` places more workers than devices (round-robin) for ``n_workers > 3``
  and more devices than workers for ``n_workers < 3``; ``sim8`` gives each
  worker its own device; ``sim1`` puts every worker on one device;
* ``cupy``: every visible GPU; marked ``gpu`` and skipped, with the reason,
  where CuPy cannot run.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import skip_unless_cupy

from tp_gpu import TensorParallelConfig

BACKEND_SPECS = [
    pytest.param(("numpy", None), id="numpy"),
    pytest.param(("simulated", 1), id="sim1"),
    pytest.param(("simulated", 3), id="sim3"),
    pytest.param(("simulated", 8), id="sim8"),
    pytest.param(("cupy", None), id="cupy", marks=pytest.mark.gpu),
]

WORKER_COUNTS = list(range(1, 9))


@pytest.fixture(params=BACKEND_SPECS)
def backend_spec(request):
    """``(backend name, devices)`` for each backend; CuPy skips without a GPU."""
    if request.param[0] == "cupy":
        skip_unless_cupy()
    return request.param


@pytest.fixture
def make_config(backend_spec):
    """Build a TensorParallelConfig on the current backend spec."""
    name, devices = backend_spec

    def make(n_workers: int, **kwargs) -> TensorParallelConfig:
        kwargs.setdefault("dtype", "float64")  # the dense references are float64: the tests say so
        return TensorParallelConfig(n_workers=n_workers, backend=name, devices=devices, **kwargs)

    return make


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name, so failures reproduce."""
    seed = sum(map(ord, request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """What did not run and why: each skip reason once, with its count (pytest's ``-rs`` lists one line
    per skipping place, so one missing library fills a screen)."""
    reasons = Counter(skip_reason(report) for report in terminalreporter.stats.get("skipped", []))
    if not reasons:
        return
    terminalreporter.section(f"what did not run: {sum(reasons.values())} skipped tests, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:6d} {'test ' if count == 1 else 'tests'}  {reason}")


def skip_reason(report) -> str:
    """The reason a test was skipped, without pytest's ``Skipped:`` prefix or its place."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")

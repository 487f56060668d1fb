"""Rules about the source of ``tp_gpu`` itself, checked on its syntax tree and in fresh interpreters.

1. Arrays change device only in :mod:`tp_gpu.collectives`, :mod:`tp_gpu.regions`,
   the backends and the communicators. Everywhere else, a reference to
   ``.to_device``, ``.asarray`` (other than NumPy's host ``np.asarray``),
   ``.to_host``, ``.all_gather``, ``.all_reduce``, ``.all_gather_object`` or
   ``.broadcast_object`` is a violation, unless it is one of the allowances
   below, each explained. Calls through the ``collectives`` module itself
   (``collectives.to_host(backend, x)``) are the sanctioned route and pass.
   The scan reads the code with :mod:`ast`, so docstrings, comments and
   strings never count, and attribute references that are not called on the
   spot (``f = backend.to_host``) or ``getattr(x, "to_host")`` do.
2. ``import tp_gpu`` imports neither CuPy nor mpi4py, and neither does
   building a ``TensorParallelConfig(comm="mpi")``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import pytest

import tp_gpu

PACKAGE = Path(tp_gpu.__file__).resolve().parent
REPO = PACKAGE.parent

#: Names whose use moves arrays between devices or between processes.
FORBIDDEN = (
    "to_device",
    "asarray",
    "to_host",
    "all_gather",
    "all_reduce",
    "all_gather_object",
    "broadcast_object",
)

#: ``<these>.asarray`` makes a host array from host data: no device is involved.
HOST_NAMESPACES = {"np", "numpy"}

#: Calls through this module are the sanctioned route (``collectives.to_host(backend, x)``).
SANCTIONED_MODULES = {"collectives"}

#: Modules (relative to the package) where arrays may change device.
ALLOWED_MODULES = ("collectives.py", "regions.py", "backends/*.py", "comm/*.py")

#: ``(module, enclosing function, expression) -> (count, why)``: every use allowed outside
#: ALLOWED_MODULES. Each must still be found, so a stale allowance fails too.
ALLOWANCES: Dict[Tuple[str, str, str], Tuple[int, str]] = {
    ("group.py", "TensorParallelGroup.check_same_on_every_rank", "self.comm.all_gather_object"): (
        1,
        "the rank-agreement check exchanges a small dict of layer arguments (a fingerprint), "
        "not array data; it runs once per layer construction and raises ConfigError on every "
        "rank alike, which needs every rank's fingerprint",
    ),
    ("checkpoint.py", "save_checkpoint", "comm.broadcast_object"): (
        1,
        "rank 0 alone writes the file; it tells the other ranks whether the write failed (a "
        "message string or None), so that every rank raises. Control data, not arrays; the "
        "tensors themselves are gathered through ShardedParameter.full (collectives)",
    ),
}


class Use(NamedTuple):
    module: str  # path relative to the package, with "/"
    line: int
    function: str  # enclosing Class.function, "" at module level
    expression: str  # e.g. "backend.to_host" or 'getattr(comm, "all_reduce")'


def _receiver_name(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else ""


class _Scanner(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module = module
        self.scope: List[str] = []
        self.found: List[Use] = []

    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _add(self, node: ast.AST, expression: str) -> None:
        self.found.append(Use(self.module, node.lineno, ".".join(self.scope), expression))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in FORBIDDEN and isinstance(node.ctx, ast.Load):
            receiver = _receiver_name(node.value)
            host_asarray = node.attr == "asarray" and receiver in HOST_NAMESPACES
            if not host_asarray and receiver not in SANCTIONED_MODULES:
                self._add(node, ast.unparse(node))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in FORBIDDEN:
                self._add(node, ast.unparse(node))
        self.generic_visit(node)


def scan_source(source: str, module: str) -> List[Use]:
    """Every use of a FORBIDDEN name in ``source``, except host ``np.asarray`` and ``collectives.*``."""
    scanner = _Scanner(module)
    scanner.visit(ast.parse(source))
    return scanner.found


def package_modules() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def is_allowed_module(path: Path) -> bool:
    relative = path.relative_to(PACKAGE)
    return any(
        relative.match(pattern) and len(relative.parts) == len(Path(pattern).parts)
        for pattern in ALLOWED_MODULES
    )


def scan_package() -> Tuple[List[Use], List[Use]]:
    """``(uses in allowed modules, uses elsewhere)`` over the whole package."""
    inside, outside = [], []
    for path in package_modules():
        uses = scan_source(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).as_posix())
        (inside if is_allowed_module(path) else outside).extend(uses)
    return inside, outside


# ---------------------------------------------------------------------------- the scanner itself


SAMPLE = '''
"""Docstring: backend.to_device(x, 0) and comm.all_gather(backend, x, 0) are only words here."""
import numpy as np
from tp_gpu import collectives


def f(backend, comm, x):
    # comment: backend.to_host(x)
    text = "backend.asarray(x, float, 0)"
    a = np.asarray(x)
    b = numpy.asarray(x)
    c = collectives.to_host(backend, x)
    d = backend.to_device(x, 1)
    e = backend.asarray(x, float, 1)
    g = backend.xp.asarray(x)
    h = comm.all_gather(backend, x, 0)
    i = comm.all_reduce(backend, x, "sum")
    j = comm.all_gather_object({})
    k = comm.broadcast_object(None)
    move = backend.to_host
    l = getattr(comm, "all_reduce")
    m = hasattr(comm, "all_reduce")


class Layer:
    def forward(self, x):
        return self.backend.to_host(x)
'''


def test_scanner_finds_uses_but_not_words():
    found = scan_source(SAMPLE, "sample.py")
    assert [(u.function, u.expression) for u in found] == [
        ("f", "backend.to_device"),
        ("f", "backend.asarray"),
        ("f", "backend.xp.asarray"),
        ("f", "comm.all_gather"),
        ("f", "comm.all_reduce"),
        ("f", "comm.all_gather_object"),
        ("f", "comm.broadcast_object"),
        ("f", "backend.to_host"),
        ("f", "getattr(comm, 'all_reduce')"),
        ("Layer.forward", "self.backend.to_host"),
    ]
    lines = SAMPLE.splitlines()
    for use in found:
        assert use.expression.split("(")[0].split(".")[-1] in lines[use.line - 1]


@pytest.mark.parametrize("name", FORBIDDEN)
def test_scanner_flags_each_forbidden_name(name):
    (use,) = scan_source(f"def g(obj):\n    return obj.{name}(1)\n", "m.py")
    assert use == Use("m.py", 2, "g", f"obj.{name}")


def test_allowed_modules_exist_and_the_scan_sees_their_moves():
    allowed = [p.relative_to(PACKAGE).as_posix() for p in package_modules() if is_allowed_module(p)]
    for required in ("collectives.py", "regions.py", "backends/simulated.py", "comm/base.py", "comm/mpi.py"):
        assert required in allowed
    assert "layers/linear.py" not in allowed and "group.py" not in allowed
    inside, _ = scan_package()
    modules = {u.module for u in inside}
    assert {"collectives.py", "comm/mpi.py", "backends/simulated.py"} <= modules  # the scan does see moves


# ---------------------------------------------------------------------------- the rule on the package


def test_only_collectives_regions_backends_and_comm_move_arrays():
    _, outside = scan_package()
    counted: Dict[Tuple[str, str, str], int] = {}
    violations = []
    for use in outside:
        key = (use.module, use.function, use.expression)
        if key in ALLOWANCES:
            counted[key] = counted.get(key, 0) + 1
        else:
            violations.append(
                f"tp_gpu/{use.module}:{use.line} in {use.function or '<module>'}: {use.expression}"
            )
    assert violations == [], (
        "arrays must change device (and processes exchange data) only through tp_gpu.collectives / "
        "tp_gpu.regions; route these through collectives (e.g. collectives.to_host(backend, x)):\n  "
        + "\n  ".join(violations)
    )
    stale = {
        key: (want, counted.get(key, 0))
        for key, (want, _) in ALLOWANCES.items()
        if counted.get(key, 0) != want
    }
    assert stale == {}, f"allowances that no longer match the source (expected, found): {stale}"


# ---------------------------------------------------------------------------- imports in a fresh interpreter


#: Stand-ins for the optional packages: importing one leaves it in sys.modules, installed or not.
FAKE_PACKAGES = ("cupy", "cupyx", "cupy_backends", "mpi4py")

PROBE = """
import json, sys
{code}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {fakes!r})))
"""


def imported_after(code: str, tmp_path: Path) -> List[str]:
    """The optional packages a fresh interpreter has imported after running ``code``."""
    fake = tmp_path / "fake_site"
    for name in FAKE_PACKAGES:
        (fake / name).mkdir(parents=True, exist_ok=True)
        (fake / name / "__init__.py").write_text(f"# stand-in for {name}: being imported is the failure\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_GPU_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake), str(REPO), env.get("PYTHONPATH", "")) if p)
    script = PROBE.format(code=textwrap.dedent(code), fakes=set(FAKE_PACKAGES))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_probe_sees_an_import(tmp_path):
    assert imported_after("import cupy, mpi4py", tmp_path) == ["cupy", "mpi4py"]


def test_import_tp_gpu_imports_neither_cupy_nor_mpi4py(tmp_path):
    code = f"""
    import tp_gpu
    assert tp_gpu.__file__.startswith({str(REPO)!r}), tp_gpu.__file__
    """
    assert imported_after(code, tmp_path) == []


def test_a_config_with_comm_mpi_imports_no_mpi4py(tmp_path):
    code = """
    from tp_gpu import TensorParallelConfig
    config = TensorParallelConfig(n_workers=4, comm="mpi", backend="simulated", devices=2)
    assert config.comm == "mpi"
    TensorParallelConfig(comm="nccl", backend="cupy")
    """
    assert imported_after(code, tmp_path) == []

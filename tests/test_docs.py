"""The README's code runs as written, and its API tables match the signatures.

Code blocks
    Every ```` ```python ```` block of README.md and benchmarks/README.md runs on
    its own, as a script in a fresh process (in an empty temporary folder, so
    files it writes go nowhere), and must exit with status 0. Each block is
    self-contained: nothing carries over from the block above. A block that
    needs an optional dependency says so in its first line::

        # needs torch
        # needs torch, mpi4py

    and is skipped, with the reason, where one is not installed (``gpu`` means
    CuPy with a usable CUDA device). Other blocks (```` ```bash ````, plain
    ```` ``` ````) are not run.

API tables
    Every table row of README.md whose first cell holds a call in backticks,
    such as ```| `ColumnParallelLinear(n_in, n_out, config=None, *, seed=0, ...)` | ... |```,
    is compared with ``inspect.signature`` of that name in ``tp_gpu``
    (``Class.method`` and a ``tp.`` prefix work too; several calls in one cell
    are each compared). Parameters must be listed in the signature's order,
    with its kinds (a bare ``*`` before keyword-only ones, ``*args``,
    ``**kwargs``) and exactly its defaults, written as Python literals. A
    trailing ``...`` stands for further parameters that all have defaults.
    Every name of :data:`DOCUMENTED` must have a row.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys
from typing import Any, List, NamedTuple, Optional, Tuple

import pytest

import tp_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]

#: Public names the README's API tables must document.
DOCUMENTED = [
    "TensorParallelConfig",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelEmbedding",
    "ParallelMLP",
    "VocabParallelCrossEntropy",
    "SGD",
    "Adam",
    "from_torch",
    "save_checkpoint",
    "load_checkpoint",
    "ReplicatedLinear",
    "RMSNorm",
    "GatedMLP",
    "RotaryEmbedding",
    "DecoderAttention",
]

#: Seconds one block may run.
BLOCK_TIMEOUT = 300


# --- code blocks ------------------------------------------------------------------------------------


class Block(NamedTuple):
    """One ```python block: where it is, its source, and the modules its first line says it needs."""

    doc: str  # the file, relative to the repository root
    line: int  # 1-based line of its first code line
    source: str
    needs: Tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


_NEEDS = re.compile(r"^#\s*needs\s+(.+?)\s*$", re.IGNORECASE)


def python_blocks(path: pathlib.Path) -> List[Block]:
    """The ```python blocks of the Markdown file ``path``, in order."""
    blocks: List[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    start: Optional[int] = None
    fence = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if start is None:
            match = re.match(r"^(`{3,}|~{3,})\s*python\s*$", stripped, re.IGNORECASE)
            if match:
                start, fence = number + 1, match.group(1)
        elif stripped == fence:
            source = "\n".join(lines[start - 1 : number - 1]) + "\n"
            first = source.lstrip().splitlines()[0] if source.strip() else ""
            needs = _NEEDS.match(first)
            modules = tuple(m for m in re.split(r"[,\s]+", needs.group(1)) if m) if needs else ()
            blocks.append(Block(str(path.relative_to(ROOT)), start, source, modules))
            start = None
    assert start is None, f"{path}: the ```python block opened at line {start - 1} is never closed"
    return blocks


BLOCKS = [block for doc in DOCS if doc.exists() for block in python_blocks(doc)]


def _missing(need: str) -> Optional[str]:
    """Why the dependency ``need`` cannot be used here, or None."""
    if need.lower() in ("gpu", "cuda"):
        from tp_gpu.backends.cupy_backend import cupy_available, cupy_unavailable_reason

        return None if cupy_available() else f"a GPU (CuPy backend unavailable: {cupy_unavailable_reason()})"
    try:
        found = importlib.util.find_spec(need) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{need}, which is not installed"


#: The backends every block runs on (as ``TP_GPU_BACKEND``): NumPy, and simulated devices, which,
#: like CuPy, refuse to mix a device array with a host array; so a block that runs on both shows
#: the documented way to bring a result to the host, and runs on a GPU machine too.
BLOCK_BACKENDS = ("numpy", "simulated")


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs_as_written(block: Block, backend: str, tmp_path: pathlib.Path):
    missing = [why for why in map(_missing, block.needs) if why]
    if missing:
        pytest.skip(f"a README block needs {'; '.join(missing)}")  # the block is in the test's id
    if backend != "numpy" and any(need.lower() in ("gpu", "cuda") for need in block.needs):
        pytest.skip("a README block for CuPy runs on CuPy whatever the backend default")
    script = tmp_path / f"{pathlib.Path(block.doc).stem}_line{block.line}.py"
    script.write_text(block.source, encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, TP_GPU_BACKEND=backend)
    env.setdefault("MPLBACKEND", "Agg")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    numbered = "\n".join(f"{block.line + i:5d}  {text}" for i, text in enumerate(block.source.splitlines()))
    assert result.returncode == 0, (
        f"the ```python block at {block.id} failed (exit status {result.returncode}); a block must run "
        f"on its own, with its imports, and name an optional dependency in a first line "
        f"'# needs torch'.\n{numbered}\n--- stderr ---\n{result.stderr[-4000:]}"
    )


# --- API tables -------------------------------------------------------------------------------------


class Row(NamedTuple):
    """One call documented in a table row: ``name(params)`` at ``line``."""

    line: int
    name: str
    params: str

    @property
    def id(self) -> str:
        return f"{self.name}@README.md:{self.line}"


def _first_cell(line: str) -> Optional[str]:
    """The first cell of the Markdown table row ``line`` (a ``|`` inside backticks does not end it)."""
    if not line.lstrip().startswith("|"):
        return None
    text = line.lstrip()[1:]
    in_code = False
    for i, char in enumerate(text):
        if char == "`":
            in_code = not in_code
        elif char == "|" and not in_code and (i == 0 or text[i - 1] != "\\"):
            return text[:i]
    return None


def api_rows(path: pathlib.Path = ROOT / "README.md") -> List[Row]:
    """Every ``name(params)`` in backticks in the first cell of a table row of ``path``."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cell = _first_cell(line)
        for span in re.findall(r"`([^`]+)`", cell or ""):
            call = re.match(r"^\s*([A-Za-z_][\w.]*)\((.*)\)\s*$", span)
            if call:
                rows.append(Row(number, call.group(1), call.group(2)))
    return rows


ROWS = api_rows()

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}
_NO_DEFAULT = inspect.Parameter.empty


def resolve(name: str) -> Any:
    """The object ``name`` (``tp.X``, ``tp_gpu.X``, ``X.method``) names in tp_gpu; AttributeError if none."""
    parts = name.split(".")
    if parts[0] in ("tp", "tp_gpu"):
        parts = parts[1:]
    obj: Any = tp_gpu
    for part in parts:
        if inspect.ismodule(obj) and not hasattr(obj, part):  # a subpackage: tp_gpu.models
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            obj = getattr(obj, part)
    return obj


def plain_signature(name: str) -> str:
    """``name(params)`` as a README row writes it: the real signature without annotations."""
    try:
        signature = inspect.signature(resolve(name))
    except (AttributeError, TypeError, ValueError):
        return f"{name}(?)"
    params = [p.replace(annotation=_NO_DEFAULT) for p in signature.parameters.values()]
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return f"{name}{signature.replace(parameters=params, return_annotation=_NO_DEFAULT)}"


def documented_parameters(params: str) -> Tuple[List[Tuple[str, str, Any]], bool]:
    """``([(name, kind, default or _NO_DEFAULT)], more)`` of a README parameter list.

    ``more`` is True when it ends with ``...`` (further parameters, all with defaults, omitted).
    """
    text = params.strip()
    more = False
    if text == "..." or text.endswith(", ..."):
        more, text = True, text[:-3].rstrip().rstrip(",")
    tree = ast.parse(f"def documented({text}): pass")
    args = tree.body[0].args  # type: ignore[attr-defined]
    positional = args.posonlyargs + args.args
    defaults = [_NO_DEFAULT] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = []
    for arg, default in zip(positional, defaults):
        kind = "positional-only" if arg in args.posonlyargs else "positional"
        out.append((arg.arg, kind, default))
    if args.vararg:
        out.append((args.vararg.arg, "*args", _NO_DEFAULT))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "keyword-only", _NO_DEFAULT if default is None else default))
    if args.kwarg:
        out.append((args.kwarg.arg, "**kwargs", _NO_DEFAULT))
    return out, more


def signature_problems(row: Row) -> List[str]:
    """How the README's ``row`` differs from the real signature (empty when it matches)."""
    try:
        obj = resolve(row.name)
    except AttributeError:
        return [f"tp_gpu has no {row.name}"]
    real = list(inspect.signature(obj).parameters.values())
    if (
        real
        and real[0].name in ("self", "cls")
        and "." in row.name.removeprefix("tp.").removeprefix("tp_gpu.")
    ):
        real = real[1:]  # an unbound method named as Class.method
    try:
        documented, more = documented_parameters(row.params)
    except SyntaxError as exc:
        return [f"the parameter list is not Python ({exc.msg}); write it as in a def, defaults as literals"]
    problems = []
    for i, (name, kind, default) in enumerate(documented):
        if i >= len(real):
            problems.append(f"lists {name!r}, which the signature does not have")
            continue
        want = real[i]
        if want.name != name:
            problems.append(f"parameter {i + 1} is {want.name!r}, not {name!r}")
            continue
        if _KINDS[want.kind] != kind:
            problems.append(f"{name!r} is {_KINDS[want.kind]}, not {kind}")
        if want.default is _NO_DEFAULT and default is not _NO_DEFAULT:
            problems.append(f"{name!r} has no default")
        elif want.default is not _NO_DEFAULT and default is _NO_DEFAULT:
            problems.append(f"{name!r} has the default {want.default!r}, not shown")
        elif default is not _NO_DEFAULT:
            try:
                value = ast.literal_eval(default)
            except ValueError:
                problems.append(f"{name!r}: write the default as a literal, {want.default!r}")
            else:
                if type(value) is not type(want.default) or value != want.default:
                    problems.append(f"{name!r} defaults to {want.default!r}, not {value!r}")
    for want in real[len(documented) :]:
        if not more:
            problems.append(f"omits {want.name!r} (end the list with '...' to leave out those with defaults)")
        elif want.default is _NO_DEFAULT and want.kind not in (want.VAR_POSITIONAL, want.VAR_KEYWORD):
            problems.append(
                f"omits {want.name!r}, which has no default ('...' stands only for those that do)"
            )
    return problems


#: Parameter lists for ColumnParallelLinear that the checker must accept (True) or reject (False).
CHECKER_CASES = [
    ("n_in, n_out, config=None, *, seed=0, bias=True, unit=1, pad_to_multiple_of=None, layout=None", True),
    ("n_in, n_out, config=None, *, seed=0, ...", True),
    ("n_in, n_out, config=None, seed=0", False),  # seed is keyword-only
    ("n_in, n_out, config=None, *, seed=1, ...", False),  # wrong default
    ("n_in, n_out, config=None, *, seed=0", False),  # omits the keywords after seed without '...'
    ("n_in, config=None, ...", False),  # skips n_out
    ("n_in, n_out, n_workers=2, ...", False),  # no such parameter
]


def test_the_docs_cover_the_public_api(tmp_path, monkeypatch):
    """The README has code to run and a row for every name of DOCUMENTED (the checkers checked first)."""
    for params, ok in CHECKER_CASES:
        assert (signature_problems(Row(0, "ColumnParallelLinear", params)) == []) is ok, params
    sample = tmp_path / "doc.md"
    sample.write_text(
        "text\n```python\n# needs torch, mpi4py\nimport torch\n```\n```bash\nls\n```\n```python\nx = 1\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    blocks = python_blocks(sample)
    assert [(b.line, b.needs, b.source) for b in blocks] == [
        (3, ("torch", "mpi4py"), "# needs torch, mpi4py\nimport torch\n"),
        (10, (), "x = 1\n"),
    ]
    monkeypatch.undo()

    assert [b for b in BLOCKS if b.doc == "README.md"], "README.md has no ```python block to run"
    names = {row.name.split(".")[-1] if row.name.startswith(("tp.", "tp_gpu.")) else row.name for row in ROWS}
    missing = [name for name in DOCUMENTED if name not in names]
    assert not missing, f"README.md's API tables have no row for {missing}; add rows like " + ", ".join(
        f"| `{plain_signature(name)}` | ... |" for name in missing
    )


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_api_row_matches_the_signature(row: Row):
    problems = signature_problems(row)
    if problems:
        pytest.fail(
            f"README.md line {row.line}: `{row.name}({row.params})` does not match the code: "
            + "; ".join(problems)
            + f". The signature is `{plain_signature(row.name)}`"
        )

"""Batch-1 cost per call of LayerNorm, the linears and attention against PyTorch:
``python -m benchmarks.layer_calls [--quick] [--dtype float32 float64] [--workers 1 4] [--out DIR]``.

Cases, hidden ``H`` (``--hidden``, 256), numpy backend, each against its PyTorch module:

* ``layernorm``: ``LayerNorm(H)`` on x (1, H), vs ``torch.nn.LayerNorm(H)``;
* ``column``: ``ColumnParallelLinear(H, 4H)``, gathered, x (1, H), vs ``torch.nn.Linear(H, 4H)``;
* ``row``: ``RowParallelLinear(4H, H)`` on a whole x (1, 4H), vs ``torch.nn.Linear(4H, H)``;
* ``attention``: ``ParallelSelfAttention(H, 4 heads, causal=True)`` on x (1, 16, H), vs
  ``torch.nn.MultiheadAttention(H, 4, batch_first=True)`` with the causal mask and ``is_causal``,
  ``need_weights=False``.

Each in two modes: ``forward`` under ``no_grad`` (the output), and ``forward+backward`` (the input
requires grad; ``y.backward(dy)``, dX read back; the parameters' gradients accumulate, as both
libraries do without a ``zero_grad``; modules in their default training mode, which has no dropout
here). Sides: ``tp p=<n>`` for each ``--workers`` (LayerNorm, kept whole whatever p, at the first
only), ``torch``, and ``numpy``, the floor: the same math written directly in NumPy (``x W + b``;
LayerNorm and attention, forward and backward, every gradient).

Every side and module holds the same logical weights (random, biases included). Each side's output
(its dX in ``forward+backward``) is checked against the NumPy floor in float64 before anything is
timed (:func:`tp_gpu.testing.compare`); a side that disagrees stops the run. Then one run of a side
is ``--calls`` calls in a loop, the sides of a case timed in the same shuffled rounds
(:mod:`.harness`), and the report gives µs per call, ``tp p / torch`` against the 1.5x target, and
the spread. Torch and NumPy's BLAS run on ``--threads`` (1) threads; the BLAS libraries as
threadpoolctl sees them are recorded. JSON and Markdown ``layer-calls-<cpu>-numpy-<date>`` go to
``benchmarks/results/local/`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    LayerNorm,
    ParallelSelfAttention,
    RowParallelLinear,
    TensorParallelConfig,
)
from tp_gpu.backends import get_backend
from tp_gpu.testing import compare

from . import harness, machine, skeleton
from .report import SPREAD_NOTE, STATUS_CELL, Record, file_stem, machine_lines, sides_record, spread_cell
from .report import status as target_status
from .skeleton import option, positive_int

CASES = ("layernorm", "column", "row", "attention")
MODES = ("forward", "forward+backward")
TARGET = 1.5  # tp p / torch, per call
HEADS, SEQ, EPS = 4, 16, 1e-5

TIMING, TIMING_QUICK = skeleton.timing_options(
    repeat=(20, 3), warmup=2, max_time=(6.0, 0.3), min_time=(1.0, 0.0), retries=(1, 0)
)
OPTIONS: skeleton.Options = {
    "--hidden": option("hidden size H (default 256)", type=positive_int, default=256),
    "--calls": option("calls per timed run (default 200, quick 20)", type=positive_int),
    "--dtype": option("dtypes (default float32 float64)", nargs="+", choices=["float32", "float64"],
                      default=["float32", "float64"]),
    "--workers": skeleton.workers_option([1, 4]),
    "--cases": option(f"cases (default all: {' '.join(CASES)})", nargs="+", choices=CASES,
                      default=list(CASES)),
    "--threads": option("BLAS and torch threads (default 1)", type=positive_int, default=1),
    "--quick": option("3 rounds, 20 calls a run, no retry; files named *-quick.*", action="store_true"),
    **TIMING, **skeleton.output_options(),
}  # fmt: skip
PROGRAM = skeleton.Program(
    prog="python -m benchmarks.layer_calls", options=OPTIONS,
    quick_defaults={**TIMING_QUICK, "calls": (200, 20)},
    description="Time LayerNorm, the linears and attention at batch 1 per call, forward and "
    "forward+backward, against PyTorch and a NumPy floor.",
)  # fmt: skip

Params = dict[str, np.ndarray]
Side = Callable[[], Any]  # one call: the output (forward) or dX (forward+backward)


class SideDisagrees(AssertionError):
    """A side's output is not the float64 reference's (got error, expected at most the allowance)."""


# --------------------------------------------------------------------------- the NumPy floor


def layernorm_np(x: np.ndarray, p: Params, dy: np.ndarray | None = None) -> Any:
    """``y = xhat w + b``, ``xhat = (x - mean) rstd``, ``rstd = 1 / sqrt(var + eps)``; with ``dy``:
    ``(dX, dw, db)``, ``dX = rstd (g - mean(g) - xhat mean(g xhat))`` with ``g = dy w``."""
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(-1, keepdims=True) + EPS)
    xhat = (x - mean) * rstd
    y = xhat * p["w"] + p["b"]
    if dy is None:
        return y
    g = dy * p["w"]
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).sum(0), dy.sum(0)


def linear_np(x: np.ndarray, p: Params, dy: np.ndarray | None = None) -> Any:
    """``y = x W + b``; with ``dy``: ``(dX = dy W^T, dW = x^T dy, db = sum(dy))``.

    ``dW`` of one row is the outer product, taken as a broadcast multiply: with OpenBLAS's native
    SkylakeX kernel, (256, 1) x (1, 1024) took 61 µs in float32 and 117 in float64, against
    ``np.dot``'s 119 and 361 and ``matmul``'s 311 and 300 (``np.dot`` wins only under
    ``OPENBLAS_CORETYPE=Haswell``: 32 and 83). A floor must be a floor.
    """
    y = x @ p["w"] + p["b"]  # (N, n_in) @ (n_in, n_out)
    if dy is None:
        return y
    dw = x.T * dy if x.shape[0] == 1 else x.T @ dy  # (n_in, 1) * (1, n_out); (n_in, N) @ (N, n_out)
    return dy @ p["w"].T, dw, dy.sum(0)  # (N, n_out) @ (n_out, n_in)


def attention_np(x: np.ndarray, p: Params, dy: np.ndarray | None = None) -> Any:
    """Causal multi-head self-attention, ``qkv = x W_qkv + b_qkv`` with ``W_qkv = [W_q | W_k | W_v]``,
    ``P_h = softmax(q_h k_h^T / sqrt(d) + M)``, ``y = concat_h(P_h v_h) W_o + b_o``; with ``dy``:
    ``(dX, dW_qkv, db_qkv, dW_o, db_o)`` by ``dZ_h = P_h * (dP_h - rowsum(dP_h * P_h))``."""
    b, s, h = x.shape
    d = h // HEADS
    scale = 1.0 / math.sqrt(d)

    def split(t: np.ndarray) -> np.ndarray:  # (B, S, H) -> (B, heads, S, d)
        return t.reshape(b, s, HEADS, d).transpose(0, 2, 1, 3)

    def merge(t: np.ndarray) -> np.ndarray:  # (B, heads, S, d) -> (B * S, H)
        return t.transpose(0, 2, 1, 3).reshape(b * s, h)

    x2 = x.reshape(b * s, h)
    qkv = x2 @ p["w_qkv"] + p["b_qkv"]  # (B S, H) @ (H, 3H)
    q, k, v = (split(t) for t in np.split(qkv.reshape(b, s, 3 * h), 3, axis=-1))
    scores = q @ k.transpose(0, 1, 3, 2) * scale + p["mask"]  # (B, heads, S, d) @ (B, heads, d, S)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    ctx = merge(probs @ v)  # (B, heads, S, S) @ (B, heads, S, d)
    y = (ctx @ p["w_o"] + p["b_o"]).reshape(b, s, h)  # (B S, H) @ (H, H)
    if dy is None:
        return y
    dy2 = dy.reshape(b * s, h)
    dctx = split((dy2 @ p["w_o"].T).reshape(b, s, h))  # (B S, H) @ (H, H)
    dp = dctx @ v.transpose(0, 1, 3, 2)  # (B, heads, S, d) @ (B, heads, d, S)
    dv = probs.transpose(0, 1, 3, 2) @ dctx  # (B, heads, S, S) @ (B, heads, S, d)
    dz = probs * (dp - (dp * probs).sum(-1, keepdims=True))
    dq = dz @ k * scale  # (B, heads, S, S) @ (B, heads, S, d)
    dk = dz.transpose(0, 1, 3, 2) @ q * scale  # (B, heads, S, S) @ (B, heads, S, d)
    dqkv = np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)  # (B S, 3H)
    dx = (dqkv @ p["w_qkv"].T).reshape(b, s, h)  # (B S, 3H) @ (3H, H)
    # (H, B S) @ (B S, 3H); (H, B S) @ (B S, H)
    return dx, x2.T @ dqkv, dqkv.sum(0), ctx.T @ dy2, dy2.sum(0)


FLOOR = {"layernorm": layernorm_np, "column": linear_np, "row": linear_np, "attention": attention_np}


# --------------------------------------------------------------------------- the cases


def shapes(case: str, hidden: int) -> tuple[tuple[int, ...], int, int]:
    """The input's shape, and the layer's (n_in, n_out)."""
    n_in, n_out = {"column": (hidden, 4 * hidden), "row": (4 * hidden, hidden)}.get(case, (hidden, hidden))
    return ((1, SEQ, hidden) if case == "attention" else (1, n_in)), n_in, n_out


def logical_params(case: str, hidden: int, rng: np.random.Generator) -> Params:
    """Random float64 weights and biases of a case (the attention's causal mask too)."""
    _, n_in, n_out = shapes(case, hidden)
    if case == "layernorm":
        return {"w": 1.0 + 0.1 * rng.standard_normal(hidden), "b": 0.1 * rng.standard_normal(hidden)}
    if case != "attention":
        return {
            "w": rng.standard_normal((n_in, n_out)) / math.sqrt(n_in),
            "b": 0.1 * rng.standard_normal(n_out),
        }
    w = lambda *shape: rng.standard_normal(shape) / math.sqrt(hidden)  # noqa: E731
    mask = np.triu(np.full((SEQ, SEQ), -np.inf), 1)
    return {"w_qkv": w(hidden, 3 * hidden), "b_qkv": 0.1 * rng.standard_normal(3 * hidden),
            "w_o": w(hidden, hidden), "b_o": 0.1 * rng.standard_normal(hidden), "mask": mask}  # fmt: skip


def tp_layer(case: str, hidden: int, workers: int, dtype: str, p: Params) -> Any:
    """The tp_gpu layer on ``workers`` numpy workers, holding ``p``."""
    config = TensorParallelConfig(n_workers=workers, backend="numpy", dtype=dtype)
    _, n_in, n_out = shapes(case, hidden)
    if case == "layernorm":
        layer = LayerNorm(hidden, config, eps=EPS)
        layer.load_dense(p["w"], p["b"])
    elif case in ("column", "row"):
        layer = (ColumnParallelLinear if case == "column" else RowParallelLinear)(n_in, n_out, config)
        layer.load_dense(p["w"], p["b"])
    else:
        layer = ParallelSelfAttention(hidden, HEADS, config, causal=True)
        wq, wk, wv = np.split(p["w_qkv"], 3, axis=1)
        bq, bk, bv = np.split(p["b_qkv"], 3)
        layer.load_dense(wq, bq, wk, bk, wv, bv, p["w_o"], p["b_o"])
    return layer


def torch_layer(torch: Any, case: str, hidden: int, dtype: str, p: Params) -> Callable[[Any], Any]:
    """The PyTorch module holding ``p``, as a function of x."""
    nn, kind = torch.nn, getattr(torch, dtype)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(kind)  # noqa: E731
    with torch.no_grad():
        if case == "layernorm":
            module = nn.LayerNorm(hidden, eps=EPS, dtype=kind)
            module.weight.copy_(t(p["w"]))
            module.bias.copy_(t(p["b"]))
            return module
        if case in ("column", "row"):
            module = nn.Linear(*p["w"].shape, dtype=kind)
            module.weight.copy_(t(p["w"].T))
            module.bias.copy_(t(p["b"]))
            return module
        mha = nn.MultiheadAttention(hidden, HEADS, batch_first=True, dtype=kind)
        mha.in_proj_weight.copy_(t(p["w_qkv"].T))
        mha.in_proj_bias.copy_(t(p["b_qkv"]))
        mha.out_proj.weight.copy_(t(p["w_o"].T))
        mha.out_proj.bias.copy_(t(p["b_o"]))
    mask = t(p["mask"])
    return lambda x: mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]


def case_sides(
    torch: Any, case: str, mode: str, dtype: str, hidden: int, workers: Sequence[int]
) -> tuple[dict[str, Side], np.ndarray, int]:
    """Every side of (case, mode, dtype) as one call, the float64 reference of what each gives (the
    output, or dX), and the terms summed per output element (for the tolerance)."""
    rng = np.random.default_rng(0)
    p64 = logical_params(case, hidden, rng)
    shape, n_in, _ = shapes(case, hidden)
    x64 = rng.standard_normal(shape)
    floor = FLOOR[case]
    y64 = floor(x64, p64)
    dy64 = rng.standard_normal(y64.shape)
    backward = mode == "forward+backward"
    reference = floor(x64, p64, dy64)[0] if backward else y64
    p = {k: v.astype(dtype) for k, v in p64.items()}
    x, dy = x64.astype(dtype), dy64.astype(dtype)
    sides: dict[str, Side] = {}
    for n in workers:
        if case == "layernorm" and n != workers[0]:  # kept whole on the output device: p changes nothing
            continue
        layer = tp_layer(case, hidden, n, dtype, p)
        leaf = tp_gpu.tensor(x, requires_grad=backward)
        sides[f"tp p={n}"] = tp_call(layer, leaf, dy, backward)
    module = torch_layer(torch, case, hidden, dtype, p)
    tx = torch.from_numpy(x.copy()).requires_grad_(backward)
    sides["torch"] = torch_call(torch, module, tx, torch.from_numpy(dy.copy()), backward)
    sides["numpy"] = (lambda: floor(x, p, dy)[0]) if backward else (lambda: floor(x, p))
    terms = {"layernorm": hidden, "attention": 3 * hidden}.get(case, n_in)
    return sides, reference, terms


def tp_call(layer: Any, leaf: Any, dy: np.ndarray, backward: bool) -> Side:
    """One tp_gpu call: the forward under ``no_grad``, or forward and backward (-> dX)."""
    if not backward:

        def forward() -> Any:
            with tp_gpu.no_grad():
                return layer(leaf)

        return forward

    def forward_backward() -> Any:
        leaf.grad = None
        layer(leaf).backward(dy)
        return leaf.grad

    return forward_backward


def torch_call(torch: Any, module: Callable, x: Any, dy: Any, backward: bool) -> Side:
    """One PyTorch call: the forward under ``torch.no_grad``, or forward and backward (-> dX)."""
    if not backward:

        def forward() -> Any:
            with torch.no_grad():
                return module(x)

        return forward

    def forward_backward() -> Any:
        x.grad = None
        module(x).backward(dy)
        return x.grad

    return forward_backward


def host(value: Any) -> np.ndarray:
    """A side's result as a NumPy array (a torch tensor detached, a tp_gpu tensor brought home)."""
    if hasattr(value, "detach"):
        return value.detach().numpy()
    return np.asarray(tp_gpu.to_numpy(value) if isinstance(value, tp_gpu.Tensor) else value)


def check(sides: dict[str, Side], reference: np.ndarray, dtype: str, terms: int, label: str) -> dict:
    """Each side's result against the float64 reference; raises :class:`SideDisagrees` naming the side,
    its error and the allowance. Returns each side's error."""
    errors = {}
    for name, side in sides.items():
        got = compare(host(side()), reference, dtype, terms)
        if not got.ok:
            raise SideDisagrees(
                f"{label}: side {name!r} disagrees with the float64 reference: got max error "
                f"{got.error:.3g}, expected at most {got.allowed:.3g}"
            )
        errors[name] = got.error
    return errors


def looped(side: Side, calls: int) -> Side:
    """``calls`` calls of ``side`` in one run."""

    def run() -> None:
        for _ in range(calls):
            side()

    return run


def ratios(record: Record) -> dict[str, float]:
    """``tp p=<n> / torch`` per call, for each tp side."""
    us = record["us_per_call"]
    return {name: us[name] / us["torch"] for name in us if name.startswith("tp ")}


def case_record(torch: Any, case: str, mode: str, dtype: str, args: argparse.Namespace) -> Record:
    """(case, mode, dtype): its sides checked, then timed in shared rounds; µs per call of each side."""
    label = f"{case} {mode} {dtype}"
    sides, reference, terms = case_sides(torch, case, mode, dtype, args.hidden, args.workers)
    errors = check(sides, reference, dtype, terms, label)
    fns = {name: looped(side, args.calls) for name, side in sides.items()}
    timed = harness.time_with_retries(fns, harness.cpu_timer(lambda: None), skeleton.timing(args))
    shape, _, _ = shapes(case, args.hidden)
    fields = {"case": case, "mode": mode, "dtype": dtype, "threads": args.threads, "calls": args.calls,
              "input_shape": list(shape), "errors": errors}  # fmt: skip
    record = sides_record(fields, timed)
    record["us_per_call"] = {n: s["median_s"] / args.calls * 1e6 for n, s in record["sides"].items()}
    record["ratios"] = ratios(record)
    print(f"{label}: " + ", ".join(f"{n} {us:.1f} µs" for n, us in record["us_per_call"].items()))
    return record


# --------------------------------------------------------------------------- the program


def threadpools() -> list[dict[str, Any]]:
    """The BLAS and OpenMP libraries loaded, as threadpoolctl reports them (kernel, threads)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads")
    return [{k: info.get(k) for k in keys} for info in threadpool_info()]


def setup(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Torch and the BLAS pinned to ``--threads``; the machine record with threadpoolctl's view."""
    torch = machine.import_torch()
    if torch is None:
        raise SystemExit("error: this benchmark compares against PyTorch, which does not import here")
    meta = skeleton.start(get_backend("numpy"), torch, args.threads)
    meta["threadpools"] = threadpools()
    return meta, torch


def run(args: argparse.Namespace, torch: Any, save: skeleton.Save) -> list[Record]:
    """Every (dtype, case, mode), checked then timed; saved after each."""
    harness.warm_up_machine()
    records: list[Record] = []
    for dtype in args.dtype:
        for case in args.cases:
            for mode in MODES:
                records.append(case_record(torch, case, mode, dtype, args))
                save(records)
    return records


def targets(records: list[Record]) -> list[Record]:
    """One row per record and tp side: ``tp p / torch <= 1.5`` per call."""
    rows = []
    for r in records:
        for name, ratio in r["ratios"].items():
            rows.append({"target": f"{name} <= {TARGET}x torch per call", "case": r["case"],
                         "mode": r["mode"], "dtype": r["dtype"], "side": name, "ratio": ratio,
                         "limit": TARGET, "status": target_status(ratio, TARGET, r["noisy"])})  # fmt: skip
    return rows


def threadpool_line(meta: dict[str, Any]) -> str:
    """The threadpoolctl record as one Markdown list item."""
    pools = meta.get("threadpools")
    if not pools:
        return "- threadpoolctl: not recorded"
    text = "; ".join(
        f"{p['internal_api']} {p['version']} kernel {p['architecture']}, {p['num_threads']} threads "
        f"({p['prefix']})"
        for p in pools
    )
    return f"- threadpoolctl: {text}"


def markdown(meta: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The machine, the cases, µs per call of every side with the ratios and the target, the spread."""
    h = options["hidden"]
    names = set(n for r in records for n in r["us_per_call"])
    tp_sides = sorted((n for n in names if n.startswith("tp ")), key=lambda n: int(n.split("=")[1]))
    sides = tp_sides + [n for n in ("torch", "numpy") if n in names]
    lines = [f"# Batch-1 layer calls against PyTorch, {meta['date']}", "", *machine_lines(meta),
             threadpool_line(meta)]  # fmt: skip
    lines += [
        f"- H = {h}: layernorm LayerNorm({h}) x (1, {h}); column ColumnParallelLinear({h}, {4 * h}) "
        f"gathered, x (1, {h}); row RowParallelLinear({4 * h}, {h}), whole x (1, {4 * h}); attention "
        f"ParallelSelfAttention({h}, {HEADS} heads, causal) x (1, {SEQ}, {h}) vs nn.MultiheadAttention "
        "(causal mask + is_causal, need_weights=False); numpy backend",
        "- forward: under no_grad; forward+backward: input requires grad, y.backward(dy) (parameter "
        "gradients accumulate); numpy: the same math in NumPy, every gradient (the floor)",
        f"- every side checked against a float64 NumPy reference first; {options['calls']} calls per run, "
        f"at least {options['repeat']} shuffled rounds of every side, {options['warmup']} warm-up run(s); "
        f"target: tp / torch <= {TARGET} per call",
        "",
        "| case | mode | dtype | " + " | ".join(f"{n} µs" for n in sides) + " | "
        + " | ".join(f"{n} / torch" for n in tp_sides) + " | met? | spread |",
        "|---|---|---|" + "---:|" * (len(sides) + len(tp_sides)) + "---|---|",
    ]  # fmt: skip
    for r in records:
        us = [f"{r['us_per_call'][n]:.1f}" if n in r["us_per_call"] else "-" for n in sides]
        rat = [f"{r['ratios'][n]:.2f}" if n in r["ratios"] else "-" for n in tp_sides]
        worst = max(r["ratios"].values())
        met = STATUS_CELL[target_status(worst, TARGET, r["noisy"])]
        lines.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {' | '.join(us + rat)} | {met} | "
                     f"{spread_cell(r)} |")  # fmt: skip
    rows = targets(records)
    passed = sum(t["status"] == "met" for t in rows)
    lines += [
        "",
        f"Target met in {passed} of {len(rows)} (case, mode, dtype, p) comparisons.",
        "",
        SPREAD_NOTE,
    ]
    return "\n".join(lines) + "\n"


REPORT = skeleton.Report(
    targets=targets, markdown=markdown, plots=lambda records, stem: [],
    key=lambda r: (r["case"], r["mode"], r["dtype"]),
)  # fmt: skip
BENCHMARK = skeleton.Benchmark(
    program=PROGRAM, report=REPORT, run=run, setup=setup,
    stem=lambda meta, args: "layer-calls-" + file_stem(meta, args.quick),
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the batch-1 layer-call benchmark (or ``--render``); 0 on success."""
    return skeleton.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())

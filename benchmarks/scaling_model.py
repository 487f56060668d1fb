"""A first-order model of tensor-parallel layer time on p GPUs: compute/p + bytes moved / link bandwidth.

    t(p) = t_compute(1) / p + t_comm(p)          (p = 1: t_comm = 0)

    t_compute(1) = max(FLOP / F, bytes touched / HBM)      one GPU, roofline
    t_comm(p)    = n_coll * alpha + moved(p) / BW          alpha: launch + latency per collective

with, for an output of ``bytes_out = B * n_out * s`` bytes (s bytes per element):

* column-parallel, gathered output: an all-gather,  moved = (p - 1) / p * bytes_out;
* row-parallel: an all-reduce (ring),              moved = 2 (p - 1) / p * bytes_out;
* MLP (column -> act -> row): one all-reduce of its output, moved = 2 (p - 1) / p * B * n_in * s.

``--pattern tp_gpu`` models what tp_gpu does by default when one process drives several GPUs, instead
of ring collectives: every transfer goes through the one output GPU (the input broadcast from it,
the partials reduced onto it), so its link carries ``(p - 1)`` whole arrays each way. (Several
processes with ``comm="nccl"`` use NCCL all-gathers and all-reduces: the ring model.)

The one-GPU figures default to the published peak dense throughput of an NVIDIA H100 SXM5 (an
assumption, not a measurement: no GPU run of this benchmark exists yet). ``--from-json`` replaces
t_compute(1) by the dense times measured on one GPU by ``bench_layers.py --backend cupy``.

Prints Markdown: ``python benchmarks/scaling_model.py > table.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

#: Published dense peak of one H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet, SXM5 column; the
#: datasheet's tensor-core figures are "with sparsity", halved here to dense), and its HBM3 bandwidth.
H100_SXM = {
    "fp32": {"flops": 66.9e12, "bytes": 4, "what": "FP32 (CUDA cores)"},
    "tf32": {"flops": 494.7e12, "bytes": 4, "what": "TF32 tensor cores, FP32 data"},
    "bf16": {"flops": 989.4e12, "bytes": 2, "what": "BF16 tensor cores"},
}
H100_HBM = 3.35e12  # bytes/s

#: Link bandwidth per GPU per direction, bytes/s.
LINKS = {
    "NVLink 4": 450e9,  # H100 SXM5: 900 GB/s total, both directions, over 18 links
    "PCIe Gen5 x16": 64e9,  # 32 GT/s x 16 lanes, 128b/130b: ~63 GB/s each way (128 GB/s both)
    "PCIe Gen4 x16": 32e9,  # 16 GT/s x 16 lanes: ~31.5 GB/s each way
}

#: Launch and latency cost of one collective (or one round of peer copies), seconds.
ALPHA = 10e-6

LAYERS = ("column", "row", "mlp")
BATCHES = (8, 256, 2048)
WORKERS = (1, 2, 4, 8)
N = 4096  # n_in = n_out = 4096; the MLP's hidden size is n_out (as in bench_layers.py)


def flop(layer: str, batch: int, n_in: int, n_out: int) -> float:
    """FLOP of one forward: 2 B n_in n_out per GEMM; the MLP has two (n_in -> n_out -> n_in)."""
    return (2 if layer == "mlp" else 1) * 2 * batch * n_in * n_out


def bytes_touched(layer: str, batch: int, n_in: int, n_out: int, s: int) -> float:
    """Bytes each GEMM reads and writes at least once: weight, input, output (the MLP: both GEMMs)."""
    one = s * (n_in * n_out + batch * n_in + batch * n_out)
    return 2 * one if layer == "mlp" else one


def out_bytes(layer: str, batch: int, n_in: int, n_out: int, s: int) -> float:
    return batch * (n_in if layer == "mlp" else n_out) * s


def comm(layer: str, p: int, batch: int, n_in: int, n_out: int, s: int, bw: float, pattern: str) -> float:
    """Seconds of communication for one forward on p GPUs."""
    if p == 1:
        return 0.0
    y = out_bytes(layer, batch, n_in, n_out, s)
    x = batch * n_in * s
    if pattern == "ring":
        moved = {"column": (p - 1) / p * y, "row": 2 * (p - 1) / p * y, "mlp": 2 * (p - 1) / p * y}[layer]
        return ALPHA + moved / bw
    # tp_gpu today: the input is broadcast from the output GPU (column, MLP), and the outputs are
    # gathered (column: (p-1)/p of y) or the partials reduced (row, MLP: p-1 whole partials) onto it.
    moved = {
        "column": (p - 1) * x + (p - 1) / p * y,
        "row": (p - 1) / p * x + (p - 1) * y,  # a dense input is split from the output GPU
        "mlp": (p - 1) * x + (p - 1) * y,
    }[layer]
    return 2 * ALPHA + moved / bw


def t_compute_1(layer: str, batch: int, n_in: int, n_out: int, flops: float, s: int) -> float:
    return max(
        flop(layer, batch, n_in, n_out) / flops, bytes_touched(layer, batch, n_in, n_out, s) / H100_HBM
    )


def measured_dense(path: Path) -> dict[tuple[str, int, int, int, str], float]:
    """Median one-GPU dense forward times from a bench_layers.py JSON: (layer, B, n_in, n_out, dtype) -> s."""
    data = json.loads(path.read_text())
    found: dict[tuple[str, int, int, int, str], list[float]] = {}
    for r in data["results"]:
        if r.get("mode", "fwd") == "fwd" and r["dense_median_s"]:
            found.setdefault((r["layer"], r["batch"], r["n_in"], r["n_out"], r["dtype"]), []).append(
                r["dense_median_s"]
            )
    return {k: statistics.median(v) for k, v in found.items()}


def speedup_table(layer: str, precision: str, pattern: str, measured: dict | None = None) -> list[str]:
    spec = H100_SXM[precision]
    s = spec["bytes"]
    lines = [
        (
            f"**{layer}**, 4096x4096{' (MLP 4096->4096->4096)' if layer == 'mlp' else ''}, {spec['what']}: "
            "t(1) and speedup t(1)/t(p)"
        ),
        "",
        "| batch | t(1) µs | bound | "
        + " | ".join(f"{link} p={p}" for link in LINKS for p in WORKERS[1:])
        + " |",
        "|---:|---:|---|" + "---:|" * (len(LINKS) * (len(WORKERS) - 1)),
    ]
    for batch in BATCHES:
        t1 = t_compute_1(layer, batch, N, N, spec["flops"], s)
        bound = (
            "FLOP"
            if flop(layer, batch, N, N) / spec["flops"] >= bytes_touched(layer, batch, N, N, s) / H100_HBM
            else "HBM"
        )
        dtype = {"fp32": "float32", "tf32": "float32", "bf16": "float16"}[precision]
        if measured and (layer, batch, N, N, dtype) in measured:
            t1, bound = measured[(layer, batch, N, N, dtype)], "measured"
        cells = []
        for bw in LINKS.values():
            for p in WORKERS[1:]:
                tp = t1 / p + comm(layer, p, batch, N, N, s, bw, pattern)
                speed = t1 / tp
                cells.append(f"{speed:.2f}" if speed >= 1 else f"*{speed:.2f}*")
        lines.append(f"| {batch} | {t1 * 1e6:.1f} | {bound} | " + " | ".join(cells) + " |")
    return lines + [""]


def break_even(pattern: str, precisions: Sequence[str]) -> list[str]:
    """For each layer, precision and link: the worker counts at which TP pays (speedup > 1), per batch."""
    lines = [
        "| layer | precision | link | " + " | ".join(f"batch {b}" for b in BATCHES) + " |",
        "|---|---|---|" + "---|" * len(BATCHES),
    ]
    for layer in LAYERS:
        for precision in precisions:
            spec = H100_SXM[precision]
            for link, bw in LINKS.items():
                cells = []
                for batch in BATCHES:
                    t1 = t_compute_1(layer, batch, N, N, spec["flops"], spec["bytes"])
                    speeds = {
                        p: t1 / (t1 / p + comm(layer, p, batch, N, N, spec["bytes"], bw, pattern))
                        for p in WORKERS[1:]
                    }
                    best = max(speeds, key=speeds.get)
                    paying = [p for p, v in speeds.items() if v > 1]
                    if not paying:
                        cells.append(f"**never** (best {speeds[best]:.2f}x)")
                    else:
                        cells.append(
                            f"p={', '.join(map(str, paying))} (best {speeds[best]:.2f}x at p={best})"
                        )
                lines.append(f"| {layer} | {precision} | {link} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pattern",
        choices=("ring", "tp_gpu"),
        default="ring",
        help="ring collectives (NCCL, Megatron; tp_gpu with comm='nccl') or tp_gpu's single-process "
        "transfers through the output GPU",
    )
    parser.add_argument("--precision", nargs="+", choices=tuple(H100_SXM), default=["tf32", "bf16"])
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="take t_compute(1) from a one-GPU bench_layers.py JSON (dense forward medians)",
    )
    parser.add_argument("--summary", action="store_true", help="only the break-even table")
    args = parser.parse_args(argv)
    measured = measured_dense(args.from_json) if args.from_json else None
    out = []
    if not args.summary:
        for precision in args.precision:
            for layer in LAYERS:
                out += speedup_table(layer, precision, args.pattern, measured)
    out += break_even(args.pattern, args.precision)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

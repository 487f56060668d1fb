"""Plots: the helpers every benchmark draws with (:func:`pyplot`, :func:`save`), and the layer
benchmark's plots: one function draws a grid of panels (a row per mode, a column per layer) from the
records; a :class:`Plot` says what each panel draws.

* ``-ratio.png``: TP/dense time against the worker count;
* ``-rate.png``: GFLOP/s (GB/s for the embedding) against the work per run, for dense, torch, and TP
  at the fewest and most workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]

Series = tuple[str, str, str, list[float], list[float]]  # label, colour, dtype, x, y
DTYPE_STYLES = {"float32": "-", "float64": "--", "float16": ":"}


@dataclass(frozen=True)
class Plot:
    """One figure: a panel per (mode, layer), the series each panel draws, and its axes."""

    suffix: str
    series: Callable[[list[Record]], Iterable[Series]]
    axes: Callable[[Any, str, list[Record]], None]  # (matplotlib axes, mode, the panel's records)


def _ratio_series(rows: list[Record]) -> Iterable[Series]:
    """TP/dense against the worker count, a line per (shape, dtype), a colour per shape."""
    colors = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r["shape"] for r in rows))}
    for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        line = [r for r in rows if (r["shape"], r["dtype"]) == (shape, dtype)]
        yield shape, colors[shape], dtype, [r["n_workers"] for r in line], [r["ratio_tp_dense"] for r in line]


def _rate_series(rows: list[Record]) -> Iterable[Series]:
    """Rate against the work per run: dense, TP at the fewest and most workers, torch; a style per dtype."""
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        by_dtype = [r for r in rows if r["dtype"] == dtype]
        workers = sorted({r["n_workers"] for r in by_dtype})
        series = [("dense", "dense_rate", None, "C0"), (f"TP p={workers[0]}", "tp_rate", workers[0], "C1")]
        series += [(f"TP p={workers[-1]}", "tp_rate", workers[-1], "C2")] if len(workers) > 1 else []
        series += [("torch", "torch_rate", None, "C3")]
        for label, key, n, color in series:
            points = {
                r["work"]: r[key] for r in by_dtype if (n is None or r["n_workers"] == n) and r.get(key)
            }
            if points:
                yield label, color, dtype, sorted(points), [points[s] for s in sorted(points)]


def _ratio_axes(ax: Any, mode: str, rows: list[Record]) -> None:
    from matplotlib.ticker import NullFormatter

    ax.axhline(1.0, color="gray", linewidth=0.8)
    for limit in (1.05, 1.5) if mode == "fwd" else ():  # the speed targets' limits
        ax.axhline(limit, color="gray", linewidth=0.6, linestyle=":")
    ticks = sorted({r["n_workers"] for r in rows})
    ax.set(xlabel="workers", ylabel="TP / dense time", xscale="log")
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _rate_axes(ax: Any, mode: str, rows: list[Record]) -> None:
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    unit = rows[0]["unit"]
    ax.set(xlabel=f"{unit.split('/')[0]} per run", xscale="log", yscale="log", ylabel=unit)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    rates = [v for r in rows for v in (r["tp_rate"], r["dense_rate"], r.get("torch_rate")) if v]
    narrow = max(rates) < 10 * min(rates)  # within a decade: label the minor ticks too, plainly
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if narrow else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=6)


PLOTS = (Plot("ratio", _ratio_series, _ratio_axes), Plot("rate", _rate_series, _rate_axes))


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` drawing into files (Agg), or None, with a note, where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 72) -> Path:
    """Write ``fig`` to ``path`` (a PNG with a 64-colour palette: a third of the size), and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    _shrink_png(path)
    return path


def write_plot(plt: Any, records: list[Record], stem: Path, plot: Plot) -> Path:
    """Draw ``plot`` into ``<stem>-<suffix>.png``: a panel per mode (rows) and layer (columns)."""
    layers = list(dict.fromkeys(r["layer"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig, axes = plt.subplots(
        len(modes), len(layers), figsize=(4.2 * len(layers), 3.4 * len(modes)), squeeze=False
    )
    for row, mode in enumerate(modes):
        for ax, layer in zip(axes[row], layers):
            rows = [r for r in records if r["layer"] == layer and r["mode"] == mode]
            if not rows:
                ax.set_visible(False)
                continue
            for label, color, dtype, xs, ys in plot.series(rows):
                style = DTYPE_STYLES.get(dtype, "-")
                tag = f"{label} {dtype.replace('float', 'f')}"
                ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=tag)
            plot.axes(ax, mode, rows)
            ax.set_title(f"{layer}, {mode}")
            ax.legend(fontsize=5.5)
    fig.tight_layout()
    return save(fig, stem.with_name(f"{stem.name}-{plot.suffix}.png"))


def write_plots(records: list[Record], stem: Path) -> list[Path]:
    """Every plot in :data:`PLOTS`; [] with a note where matplotlib does not import."""
    plt = pyplot()
    return [] if plt is None else [write_plot(plt, records, stem, plot) for plot in PLOTS]


def _shrink_png(path: Path) -> None:
    """Re-save a plot with a 64-colour palette (a third of the size; plots have few colours)."""
    try:
        from PIL import Image  # Pillow comes with matplotlib
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)

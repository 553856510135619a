"""--plot: median latency bars, one panel per provider and batch (matplotlib, imported only here).

Whiskers run from min to p90, each bar is labelled with its speedup over the first model and int8
bars are hatched. The title is wrapped to the figure's width, so a narrow figure (one pair of
models at one batch size) does not clip it.
"""
from __future__ import annotations

import textwrap

import numpy as np

from ..errors import UsageError
from ..files import write_atomic
from ..io import check_output_path

TITLE = "onnxrep bench: median latency, whiskers min..p90, label = speedup vs the first model"
TITLE_SIZE = 10


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    return matplotlib


def _bars(rows: list[dict], colors: list[str]) -> dict:
    """Heights, whiskers, colours and labels of one panel's bars (a skipped row is an empty bar)."""
    bars: dict = {"labels": [], "med": [], "lo": [], "hi": [], "col": [], "notes": []}
    for r in rows:
        ok = r["status"] == "ok"
        bars["labels"].append(f"{r['model_name']}\n{r['precision']}")
        bars["med"].append(r["median_ms"] if ok else 0.0)
        bars["lo"].append((r["median_ms"] - r["min_ms"]) if ok else 0.0)
        bars["hi"].append((r["p90_ms"] - r["median_ms"]) if ok else 0.0)
        bars["col"].append(colors[r["model"] % len(colors)])
        if not ok:
            bars["notes"].append("skipped")
        else:
            bars["notes"].append(f"{r['speedup_vs_first']:.2f}x" if r["speedup_vs_first"] is not None else "")
    return bars


def _panel(ax, prov: str, batch: int, rows: list[dict], colors: list[str]) -> None:
    b = _bars(rows, colors)
    x = np.arange(len(rows))
    drawn = ax.bar(x, b["med"], color=b["col"], yerr=[b["lo"], b["hi"]], capsize=4, error_kw={"elinewidth": 1})
    for r, bar in zip(rows, drawn):
        if r["precision"] == "int8":
            bar.set_hatch("//")
    top = max([m + h for m, h in zip(b["med"], b["hi"])] + [1e-9])
    for xi, m, h, t in zip(x, b["med"], b["hi"], b["notes"]):
        ax.text(xi, m + h + top * 0.02, t, ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(x)
    ax.set_xticklabels(b["labels"], fontsize=8)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"{prov}, batch {batch}")
    ax.grid(axis="y", alpha=0.3)


def _wrapped_title(width_in: float) -> str:
    """The title in lines that fit `width_in` inches (about 0.6 em per character, with a margin)."""
    per_line = max(20, int(width_in * 72 / (TITLE_SIZE * 0.6)) - 4)
    return textwrap.fill(TITLE, per_line)


def build_figure(result: dict):
    """The matplotlib Figure of a bench() result (Agg backend)."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in result["latency"]:
        groups.setdefault((r["provider"], r["batch"]), []).append(r)
    panels = [(k, rows) for k, rows in groups.items() if any(r["status"] == "ok" for r in rows)]
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, "no latency measured\n(every provider or batch was skipped)", ha="center", va="center")
        return fig
    width = max(4.5, 1.2 + 1.1 * max(len(r) for _, r in panels)) * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    for ax, ((prov, b), rows) in zip(axes[0], panels):
        _panel(ax, prov, b, rows, colors)
    fig.suptitle(_wrapped_title(width), fontsize=TITLE_SIZE)
    fig.tight_layout()
    return fig


def write_plot(result: dict, path) -> None:
    """The latency chart as a PNG, written atomically with the umask's permissions."""
    check_output_path(None, path)
    fig = build_figure(result)
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)

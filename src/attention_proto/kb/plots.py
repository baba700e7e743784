"""Plots for REPORT.md, drawn from measurement rows (matplotlib, optional)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def make_plots(rows: List[Dict[str, Any]], run: Dict[str, Any], folder: Path) -> List[str]:
    """Write the PNGs that have data; returns their file names. No matplotlib: no plots."""
    plt = _plt()
    if plt is None or run.get("mode") != "gpu":
        return []
    made: List[str] = []
    for name, fn in (("tflops_vs_n.png", _tflops_vs_n), ("fwd_bwd_tflops_vs_n.png", _fwd_bwd_vs_n),
                     ("paged_bandwidth.png", _paged_bw), ("linear_crossover.png", _linear_crossover),
                     ("modifier_overhead.png", _modifiers), ("tile_heatmap.png", _tile_heatmap)):
        try:
            fig = fn(plt, rows, run)
        except Exception as e:  # noqa: BLE001 - a plot must never break the export
            print(f"plot {name} failed: {type(e).__name__}: {e}")
            fig = None
        if fig is not None:
            fig.savefig(folder / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            made.append(name)
    return made


def _series(rows, key_fn, x="N", y="tflops"):
    s = defaultdict(dict)
    for r in rows:
        if r.get(y) is None or r.get(x) is None:
            continue
        k = key_fn(r)
        s[k][r[x]] = max(r[y], s[k].get(r[x], 0))
    return s


def _line_grid(plt, rows, run, op, title):
    rows = [r for r in rows if r["op"] == op and r["study"] in ("flash", "ceilings") and r["tflops"]
            and not r["extra"].get("sweep")]
    if not rows:
        return None
    panels = sorted({(r["D"], bool(r["causal"])) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (D, causal) in zip(axes[0], panels):
        sub = [r for r in rows if r["D"] == D and bool(r["causal"]) == causal]
        for impl, pts in sorted(_series(sub, lambda r: r["impl"]).items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D{D} {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("N")
        ax.set_ylabel("TFLOPS")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title} on {run['gpu']}")
    return fig


def _tflops_vs_n(plt, rows, run):
    return _line_grid(plt, rows, run, "attn_fwd", "Forward TFLOPS vs N")


def _fwd_bwd_vs_n(plt, rows, run):
    return _line_grid(plt, rows, run, "attn_fwd_bwd", "Forward+backward TFLOPS vs N")


def _paged_bw(plt, rows, run):
    rows = [r for r in rows if r["op"] == "paged_decode" and r["gbps"] and r["extra"].get("page_size")
            and r["extra"].get("sweep") == "page_size"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    by = defaultdict(dict)
    for r in rows:
        by[r["variant"] or r["impl"]][r["extra"]["page_size"]] = r["gbps"]
    for name, pts in sorted(by.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    copy = (run.get("ceilings") or {}).get("copy_gbps")
    if copy:
        ax.axhline(copy, color="k", ls="--", lw=1, label="copy ceiling")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("page size (tokens)")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=7)
    ax.set_title("Paged decode bandwidth vs page size")
    return fig


def _linear_crossover(plt, rows, run):
    rows = [r for r in rows if r["study"] == "linear" and r["ms_median"] and r["op"] in
            ("linear_fwd", "attn_fwd", "linear_fwd_bwd", "attn_fwd_bwd") and not r["extra"].get("sweep")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, ops in zip(axes, (("linear_fwd", "attn_fwd"), ("linear_fwd_bwd", "attn_fwd_bwd"))):
        by = defaultdict(dict)
        for r in rows:
            if r["op"] in ops:
                by[f"{r['impl']} {r['op']}{' ' + r['variant'] if r['variant'] else ''}"][r["N"]] = r["ms_median"]
        for name, pts in sorted(by.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (B*N fixed)")
        ax.set_ylabel("ms")
        ax.set_title(ops[0].replace("linear_", ""))
        ax.legend(fontsize=6)
    fig.suptitle("Linear vs dense causal attention")
    return fig


def _modifiers(plt, rows, run):
    rows = [r for r in rows if r["study"] == "modifiers" and r["ms_median"] and r["extra"].get("overhead") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = [f"{r['impl']}:{'+'.join(r['mods']) or 'plain'} N{r['N']}" for r in rows]
    ax.barh(range(len(rows)), [r["extra"]["overhead"] for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("time / plain kernel")
    ax.set_title("Modifier overhead")
    return fig


def _tile_heatmap(plt, rows, run):
    rows = [r for r in rows if r["study"] == "flash" and r["extra"].get("sweep") == "tiles" and r["tflops"]]
    if not rows:
        return None
    panels = sorted({(r["D"], bool(r["causal"])) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (D, causal) in zip(axes[0], panels):
        sub = [r for r in rows if r["D"] == D and bool(r["causal"]) == causal]
        bms = sorted({r["extra"]["BLOCK_M"] for r in sub})
        bns = sorted({r["extra"]["BLOCK_N"] for r in sub})
        grid = [[0.0 for _ in bns] for _ in bms]
        for r in sub:
            i, j = bms.index(r["extra"]["BLOCK_M"]), bns.index(r["extra"]["BLOCK_N"])
            grid[i][j] = max(grid[i][j], r["tflops"])
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(bns)))
        ax.set_xticklabels(bns)
        ax.set_yticks(range(len(bms)))
        ax.set_yticklabels(bms)
        ax.set_xlabel("BLOCK_N")
        ax.set_ylabel("BLOCK_M")
        ax.set_title(f"D{D} {'causal' if causal else 'non-causal'} (best TFLOPS)")
        for i in range(len(bms)):
            for j in range(len(bns)):
                ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return fig

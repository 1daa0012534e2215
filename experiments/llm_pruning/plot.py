"""Perplexity against sparsity, one line per method, from the sweep's report.csv (the framework's report).

    python experiments/llm_pruning/plot.py outputs/llm_pruning/report.csv experiments/llm_pruning/perplexity_vs_sparsity.png

Left: unstructured 30/50/70 % with the dense model at 0 %; right: 50 % unstructured vs the 2:4 and
4:8 patterns. Only reads numbers the sweep's jobs measured; log scale, since magnitude pruning
moves perplexity by orders of magnitude.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
METRIC = "test/perplexity"


def pattern(row: dict) -> str:
    m = row.get("compression.prune_m") or "0"
    return f"{row['compression.prune_n']}:{m}" if m not in ("", "0") else "unstructured"


def main(report_csv: str, out: str) -> int:
    # The SparseGPT run at calibration batch 8 is a check of batching, not a point of the curve.
    rows = [r for r in csv.DictReader(open(report_csv)) if r.get(METRIC)
            and not r.get("compression.calibration_batch_size")]
    dense = [float(r[METRIC]) for r in rows if r.get("compression") in ("none", "")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for method in METHODS:
        mine = [r for r in rows if r.get("compression") == method]
        points = sorted((float(r["compression.sparsity"]), float(r[METRIC])) for r in mine
                        if pattern(r) == "unstructured")
        if dense and points:
            points = [(0.0, dense[0]), *points]
        if points:
            left.plot(*zip(*points), "o-", label=method)
        bars = [(p, float(r[METRIC])) for p in ("unstructured", "2:4", "4:8") for r in mine
                if pattern(r) == p and float(r["compression.sparsity"]) == 0.5]
        if bars:
            right.plot([b[0].replace("unstructured", "50 % unstr.") for b in bars], [b[1] for b in bars], "o-",
                       label=method)
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_ylabel("perplexity, Macbeth (lower is better)")
        ax.grid(alpha=0.3, which="both")
        if dense:
            ax.axhline(dense[0], color="grey", linestyle="--", linewidth=1, label=f"dense {dense[0]:.1f}")
        ax.legend(fontsize=8)
    left.set_xlabel("sparsity of the pruned linear layers (unstructured)")
    left.set_title("SmolLM2-135M, one-shot, unstructured")
    right.set_xlabel("sparsity pattern (all 50 %)")
    right.set_title("unstructured vs N:M")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

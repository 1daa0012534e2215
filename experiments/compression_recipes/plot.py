"""Accuracy against CPU speed-up over the dense model, one point per recipe, from the sweep's report.csv.

    python experiments/compression_recipes/plot.py outputs/compression_recipes/report.csv \
        experiments/compression_recipes/accuracy_vs_speedup.png

Only reads numbers the jobs measured: test accuracy, and the speed-up of a typical batch of 32 test
sentences (dense over compressed median latency, timed alternately in the same process at one thread).
The dense baseline has no compressed model to time and sits at 1.0 by definition. The framework's own
plots (plots/) rank by latency at batch 1 and label only the Pareto front; this one names every recipe.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(report_csv: str, out: str) -> int:
    rows = [r for r in csv.DictReader(open(report_csv)) if r.get("test/acc")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        name = row["job_dirs"].split(";")[0].rsplit("_", 1)[0]
        speedup = float(row["latency/bs32/speedup"]) if row.get("latency/bs32/speedup") else 1.0
        accuracy = float(row["test/acc"])
        ax.plot(speedup, accuracy, "o", color="grey" if name == "dense" else "tab:blue")
        ax.annotate(f"{name} (size x{float(row['size/ratio']):.2f})" if row.get("size/ratio") else name,
                    (speedup, accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("CPU speed-up over the dense model (batch 32, one thread)")
    ax.set_ylabel("test accuracy (1,000 sentences)")
    ax.set_title("MiniLM-L6 sentiment: compression recipes")
    ax.grid(alpha=0.3)
    ax.set_xlim(0.5, None)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

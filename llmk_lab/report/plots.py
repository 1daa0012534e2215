"""plots/*.png: the optimised metric against each cost, configurations with their seed spread, the Pareto
front marked."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from llmk_lab.report.pareto import TRADE_OFFS, pareto_front, trade_off_key
from llmk_lab.report.tables import label


def plot_trade_offs(rows: list[dict[str, Any]], columns: Sequence[str], metrics: Sequence[str], optimized: str,
                    direction: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    scored = [r for r in rows if r.get(optimized) is not None]
    for title, candidates, higher_x in TRADE_OFFS:
        x_key = trade_off_key(title, candidates, metrics)
        if x_key is None or not scored:
            continue
        # A run without pruning reports no sparsity: it is dense.
        xs = [r.get(x_key) if r.get(x_key) is not None else (0.0 if title == "sparsity" else None) for r in scored]
        points = [(x, r) for x, r in zip(xs, scored) if x is not None]
        if not points:
            continue
        coords = [(float(x), float(r[optimized])) for x, r in points]
        front = set(pareto_front(coords, higher_x, direction == "maximize"))
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ax.errorbar([c[0] for c in coords], [c[1] for c in coords],
                    yerr=[r.get(f"{optimized}_std") or 0.0 for _, r in points], fmt="o", color="tab:blue",
                    alpha=0.6, capsize=3, label="configuration (mean ± std over seeds)")
        ordered = sorted(front, key=lambda i: coords[i][0])
        ax.plot([coords[i][0] for i in ordered], [coords[i][1] for i in ordered], "o-", color="tab:red",
                markersize=8, label="Pareto front")
        for i in ordered:
            ax.annotate(label(points[i][1], columns), coords[i], textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        positive = [c[0] for c in coords if c[0] > 0]
        if title != "sparsity" and positive and max(positive) / min(positive) > 100:
            ax.set_xscale("log")
        ax.set_xlabel(f"{x_key} ({'higher' if higher_x else 'lower'} is better)")
        ax.set_ylabel(f"{optimized} ({'higher' if direction == 'maximize' else 'lower'} is better)")
        ax.set_title(f"{optimized} vs {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{optimized.replace('/', '_')}_vs_{title.replace(' ', '_').replace('-', '')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written

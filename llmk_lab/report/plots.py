"""plots/*.png: the optimised metric against each cost, configurations with their seed spread, the Pareto
front marked; with a series key (`--series compression`), one line per value of that key."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from llmk_lab.report.pareto import TRADE_OFFS, pareto_front, trade_off_key
from llmk_lab.report.tables import label


def series_lines(points: Sequence[tuple[float, dict[str, Any]]], optimized: str,
                 series: str) -> dict[str, list[tuple[float, float, float]]]:
    """The lines of a plot by `series`: each value of that column -> its configurations' (x, mean, std) in x
    order. A curve needs one configuration per value and x (e.g. one learning rate per method)."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for x, row in points:
        lines.setdefault(str(row.get(series)), []).append(
            (float(x), float(row[optimized]), float(row.get(f"{optimized}_std") or 0.0)))
    return {name: sorted(line) for name, line in lines.items()}


def plot_trade_offs(rows: list[dict[str, Any]], columns: Sequence[str], metrics: Sequence[str], optimized: str,
                    direction: str, out_dir: Path, series: Optional[str] = None) -> list[Path]:
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
        ordered = sorted(front, key=lambda i: coords[i][0])
        if series is None:
            ax.errorbar([c[0] for c in coords], [c[1] for c in coords],
                        yerr=[r.get(f"{optimized}_std") or 0.0 for _, r in points], fmt="o", color="tab:blue",
                        alpha=0.6, capsize=3, label="configuration (mean ± std over seeds)")
            ax.plot([coords[i][0] for i in ordered], [coords[i][1] for i in ordered], "o-", color="tab:red",
                    markersize=8, label="Pareto front")
            for i in ordered:
                ax.annotate(label(points[i][1], columns), coords[i], textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        else:  # the lines carry the labels; the front is ringed
            for name, line in series_lines(points, optimized, series).items():
                ax.errorbar(*zip(*[(x, y) for x, y, _ in line]), yerr=[std for *_, std in line], fmt="o-",
                            capsize=3, label=f"{series}={name} (mean ± std over seeds)")
            ax.plot([coords[i][0] for i in ordered], [coords[i][1] for i in ordered], "o", markersize=12,
                    markerfacecolor="none", markeredgecolor="tab:red", label="Pareto front")
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

"""Trade-off axes and Pareto fronts: which configurations no other beats on both the metric and a cost."""
from __future__ import annotations

from typing import Optional, Sequence

# x axes of the trade-off plots: (title, candidate metric keys in order of preference, higher is better)
TRADE_OFFS = (
    ("sparsity", ("sparsity/after_merge", "sparsity/pruned_layers", "sparsity/requested"), True),
    ("trainable parameters", ("params/trainable",), False),
    ("non-zero parameters", ("params/nonzero",), False),
    ("latency", (), False),  # the first metric whose name mentions latency
)


def pareto_front(points: Sequence[tuple[float, float]], higher_x: bool, higher_y: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (and strictly on one)."""
    def better_or_equal(a: float, b: float, higher: bool) -> bool:
        return a >= b if higher else a <= b

    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            better_or_equal(xj, xi, higher_x) and better_or_equal(yj, yi, higher_y) and (xj, yj) != (xi, yi)
            for j, (xj, yj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def trade_off_key(title: str, candidates: Sequence[str], metrics: Sequence[str]) -> Optional[str]:
    """The metric plotted on a trade-off's x axis, or None when the sweep has none."""
    if title == "latency":  # of the compressed model, at the smallest batch size measured
        timed = [m for m in metrics if m.startswith("latency/") and m.endswith("_ms")]
        return min(timed, key=lambda m: ("compressed" not in m, len(m), m), default=None)
    return next((c for c in candidates if c in metrics), None)

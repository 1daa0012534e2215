"""Seeds aggregated per configuration: mean, sample standard deviation and count of every metric."""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

from llmk_lab.report.collection import Job, is_number

# Training telemetry (time, throughput, memory of the training process) varies
# from run to run and machine to machine; the report is about results and cost.
SKIPPED_PREFIXES = ("train/", "data/", "time/")
SKIPPED_KEYS = ("wall_time_s", "config_hash")


def number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def _value_order(value: str) -> tuple:
    n = number(value)
    return (0, n, "") if isinstance(n, float) else (1, 0, str(value))


def metric_keys(jobs: Sequence[Job], optimized: str) -> list[str]:
    """Every numeric metric of the completed jobs: the optimised one first, then task metrics, sparsity,
    parameters, the rest."""
    keys: dict[str, None] = {}
    for job in jobs:
        for key, value in (job.metrics or {}).items():
            if not is_number(value):
                continue
            if key.startswith(SKIPPED_PREFIXES) or key in SKIPPED_KEYS:
                continue
            keys[key] = None

    def rank(key: str) -> tuple:
        group = 0 if key == optimized else 1 if key.startswith(("val/", "test/")) else \
            2 if key.startswith("sparsity/") else 3 if key.startswith("params/") else 4
        return group, key

    return sorted(keys, key=rank)


def aggregate(jobs: Sequence[Job], columns: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per configuration (values of `columns`): each metric as mean and std (n > 1), the number of
    completed seeds `n`, and the names of the job directories aggregated (`job_dirs`)."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        settings = job.settings
        groups.setdefault(tuple(settings.get(c, "") for c in columns), []).append(job)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(_value_order(v) for v in k)):
        members = groups[key]
        row: dict[str, Any] = dict(zip(columns, key))
        row["n"] = len(members)
        row["job_dirs"] = ";".join(j.name for j in members)
        for metric in metrics:
            values = [float(j.metrics[metric]) for j in members if isinstance(j.metrics.get(metric), (int, float))]
            values = [v for v in values if not math.isnan(v)]
            row[metric] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def best_row(rows: list[dict[str, Any]], metric: str, direction: str) -> Optional[dict[str, Any]]:
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        return None
    return (max if direction == "maximize" else min)(scored, key=lambda r: r[metric])

"""report.md and report.csv: the headline table (mean ± std over seeds), the best configuration, failures."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

from llmk_lab.report.collection import SEED_KEYS
from llmk_lab.report.pareto import TRADE_OFFS
from llmk_lab.report.statistics import number
from llmk_lab.sweep_layout import override_key

from llmk_lab.paths import write_atomically

PER_CLASS_PREFIXES = ("precision_", "recall_", "f1_")


def headline_metrics(metrics: Sequence[str], optimized: str) -> list[str]:
    """The Markdown table's columns: task metrics and one figure per cost; report.csv keeps every metric."""
    def first(candidates) -> list[str]:
        return next(([m] for m in candidates if m in metrics), [])

    task = [m for m in metrics if m.count("/") == 1 and m.startswith(("val/", "test/")) and m != optimized
            and not m.split("/")[1].startswith(PER_CLASS_PREFIXES) and "loss" not in m]
    latency = [m for m in metrics if m.startswith("latency/") and m.endswith("_ms")]
    return [optimized, *task,
            *first(TRADE_OFFS[0][1] + tuple(m for m in metrics if m.startswith("sparsity/"))),
            *first(("params/trainable",)), *first(("params/nonzero",)),
            *first(sorted((m for m in metrics if "bytes" in m), key=lambda m: "compressed" not in m)),
            *first(sorted(latency, key=lambda m: ("compressed" not in m, len(m)))),
            *first(("fidelity/agreement",))]


def short(value: str, digits: int = 4) -> str:
    """Optuna's 0.0012520653814999472 -> 0.001252; grid values as typed."""
    n = number(value)
    return f"{n:.{digits}g}" if isinstance(n, float) and len(value) > digits + 2 else value


def label(row: dict[str, Any], columns: Sequence[str]) -> str:
    return ", ".join(f"{c.rsplit('.', 1)[-1]}={short(row[c], 3)}" for c in columns) or "default"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def cell(row: dict[str, Any], metric: str) -> str:
    mean, std = row.get(metric), row.get(f"{metric}_std")
    if mean is None:
        return ""
    return f"{_fmt(mean)} ± {_fmt(std)}" if std is not None else _fmt(mean)


def markdown(result, sweep_dir: Path, fixed: list[str], optuna: Optional[dict]) -> str:
    cols, metrics = result.columns, headline_metrics(result.metrics, result.optimized_metric)
    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"Optimised metric: `{result.optimized_metric}` ({result.direction}). "
             f"{sum(r['n'] for r in result.rows)} completed jobs in {len(result.rows)} configurations, "
             f"{len(result.failures)} failed, {len(result.unfinished)} unfinished. "
             "Cells are mean ± sample standard deviation over seeds; n is the number of completed seeds.", ""]
    if fixed:
        lines += ["Fixed overrides: " + " ".join(f"`{o}`" for o in fixed), ""]
    if result.best is not None:
        setting = " ".join(f"`{c}={short(result.best[c])}`" for c in cols) or "(the only configuration)"
        lines += [f"**Best configuration** by mean `{result.optimized_metric}`: {setting} -> "
                  f"{cell(result.best, result.optimized_metric)} (n={result.best['n']})", ""]
    if optuna:
        params = " ".join(f"`{k}={v}`" for k, v in (optuna.get("best_params") or {}).items())
        lines += [f"Optuna's best trial: {params} -> {_fmt(optuna.get('best_value'))}", ""]
    header = [*cols, "n", *metrics]
    lines += ["## Results", "", f"Every metric of every configuration is in `{result.csv.name}`.", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        lines.append("| " + " | ".join([*(short(row[c]) for c in cols), str(row["n"]),
                                        *(cell(row, m) for m in metrics)]) + " |")
    if result.failures:
        lines += ["", "## Failed jobs", "", "| job | overrides | error |", "|---|---|---|"]
        for job in result.failures:
            error = f"{job.failure.get('type', 'Error')}: {job.failure.get('error', '')}".replace("|", "\\|")
            shown = [o for o in job.overrides if override_key(o) in cols or override_key(o) in SEED_KEYS]
            lines.append(f"| {job.name} | {' '.join(shown or job.overrides)} | {error} |")
    if result.unfinished:
        lines += ["", "## Unfinished jobs (no metrics.json, no failed.json)", "",
                  ", ".join(job.name for job in result.unfinished)]
    if result.plots:
        lines += ["", "## Trade-offs (Pareto front in red)", ""]
        lines += [f"![{p.stem}]({p.relative_to(sweep_dir).as_posix()})" for p in result.plots]
    return "\n".join(lines) + "\n"


def csv_header(columns: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """Configuration columns, `n` (completed seeds), `job_dirs` (the job directories, `;`-separated),
    then each metric's mean and std."""
    return [*columns, "n", "job_dirs", *(k for m in metrics for k in (m, f"{m}_std"))]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str], metrics: Sequence[str]) -> None:
    header = csv_header(columns, metrics)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in header})

    write_atomically(path, write)

"""Sweep directory -> one table row per configuration, seeds aggregated, failures listed, Pareto plots.

    python -m llmk_lab.report outputs/multirun/2025-01-01/12-00-00

Writes `report.md`, `report.csv` and `plots/*.png` into the sweep directory
(also run automatically at the end of every multirun). A configuration is a
job's overrides without `seed`; its seeds are aggregated as mean, sample
standard deviation and count. At the end of a multirun whose jobs logged to
W&B, the table and the plots go to one more run of the sweep's group (job type
`report`); from the command line only with `--wandb`.

One module per job: `collection` (reading the jobs), `statistics` (seeds per
configuration), `pareto` (fronts and trade-off axes), `plots`, `tables`
(Markdown and CSV), `wandb_log`, `cli`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from llmk_lab.report.collection import SEED_KEYS, Job, collect_jobs, job_config_value, recorded_value
from llmk_lab.report.pareto import pareto_front
from llmk_lab.report.plots import plot_trade_offs
from llmk_lab.report.statistics import aggregate, best_row, metric_keys
from llmk_lab.report.tables import markdown, write_csv
from llmk_lab.sweep_layout import infer_direction, read_sweep_info, sweep_group
from llmk_lab.paths import write_text_atomically

__all__ = ["Job", "SweepReportResult", "aggregate", "collect_jobs", "infer_direction", "main", "pareto_front",
           "write_report"]


@dataclass
class SweepReportResult:
    rows: list[dict[str, Any]]
    failures: list[Job]
    unfinished: list[Job]
    columns: list[str]
    metrics: list[str]
    optimized_metric: str
    direction: str
    best: Optional[dict[str, Any]]
    markdown: Path
    csv: Path
    plots: list[Path] = field(default_factory=list)


def write_report(sweep_dir: Path | str, optimized_metric: Optional[str] = None, direction: Optional[str] = None,
                 wandb: Optional[bool] = None, series: Optional[str] = None) -> SweepReportResult:
    """Read every job of `sweep_dir`; write report.md, report.csv and plots/ (with `series`, a swept key,
    one line per value of it); with `wandb` (None: when the jobs logged to W&B) also log them to W&B."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    info = read_sweep_info(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    # The sweep's setting, else what its jobs resolved (`optimized_metric: null` is the task's primary metric).
    optimized = optimized_metric or info.get("optimized_metric") or recorded_value(jobs, "optimized_metric") \
        or job_config_value(jobs, "optimized_metric") or "test/acc"
    direction = direction or info.get("direction") or infer_direction(optimized)
    done = [j for j in jobs if j.metrics]
    failures = [j for j in jobs if not j.metrics and j.failure]
    unfinished = [j for j in jobs if not j.metrics and not j.failure]

    swept = [k for k in info.get("swept_keys", []) if k not in SEED_KEYS]
    all_settings = [j.settings for j in jobs]
    keys = dict.fromkeys(k for s in all_settings for k in s)
    varying = [k for k in keys if len({s.get(k) for s in all_settings}) > 1]
    columns = [*swept, *(k for k in varying if k not in swept)]
    fixed = [f"{k}={all_settings[0][k]}" for k in keys if k not in columns and all_settings]

    metrics = metric_keys(done, optimized)
    rows = aggregate(done, columns, metrics)
    result = SweepReportResult(rows=rows, failures=failures, unfinished=unfinished, columns=columns, metrics=metrics,
                               optimized_metric=optimized, direction=direction,
                               best=best_row(rows, optimized, direction),
                               markdown=sweep_dir / "report.md", csv=sweep_dir / "report.csv")
    if series is not None and series not in columns:
        raise ValueError(f"--series={series} is not a swept key of {sweep_dir} (allowed: {', '.join(columns)})")
    result.plots = plot_trade_offs(rows, columns, metrics, optimized, direction, sweep_dir / "plots", series)
    optuna_results = sweep_dir / "optimization_results.yaml"
    optuna = OmegaConf.to_container(OmegaConf.load(optuna_results)) if optuna_results.exists() else None
    write_text_atomically(result.markdown, markdown(result, sweep_dir, fixed, optuna))
    write_csv(result.csv, rows, columns, metrics)

    logger_cfg = job_config_value(jobs, "logger")
    if wandb is None:
        wandb = bool(logger_cfg) and "wandb" in (logger_cfg.get("kinds") or [logger_cfg.get("kind")])
    if wandb and rows:
        # Lazy: W&B logging goes through tracking, which imports Lightning and torch; a report without W&B
        # (the common case, and `python -m llmk_lab.report` on a laptop) needs neither.
        from llmk_lab.report.wandb_log import log_to_wandb

        log_to_wandb(result, logger_cfg or {}, info.get("group") or sweep_group(sweep_dir), sweep_dir)
    return result

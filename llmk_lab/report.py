"""Sweep directory -> one table row per configuration, seeds aggregated, failures listed, Pareto plots.

    python -m llmk_lab.report outputs/multirun/2025-01-01/12-00-00

Writes `report.md`, `report.csv` and `plots/*.png` into the sweep directory
(also run automatically at the end of every multirun). A configuration is a
job's overrides without `seed`; its seeds are aggregated as mean, sample
standard deviation and count. When the jobs logged to W&B, the table and the
plots go to one more run of the sweep's group (job type `report`).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from llmk_lab.sweep import is_control_key, override_key, read_sweep_info, sweep_group

log = logging.getLogger(__name__)

SEED_KEYS = ("seed",)
# Training telemetry (time, throughput, memory of the training process) varies
# from run to run and machine to machine; the report is about results and cost.
SKIPPED_PREFIXES = ("train/", "data/")
SKIPPED_KEYS = ("wall_time_s", "config_hash")
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "latency", "ms", "bytes", "kl")
# x axes of the trade-off plots: (title, candidate metric keys in order of preference, higher is better)
TRADE_OFFS = (
    ("sparsity", ("sparsity/after_merge", "sparsity/pruned_layers", "sparsity/requested"), True),
    ("trainable parameters", ("params/trainable",), False),
    ("non-zero parameters", ("params/nonzero",), False),
    ("latency", (), False),  # the first metric whose name mentions latency
)


@dataclass
class Job:
    name: str
    run_dir: Path
    overrides: list[str]
    metrics: Optional[dict[str, Any]] = None
    failure: Optional[dict[str, Any]] = None

    @property
    def settings(self) -> dict[str, str]:
        """The job's configuration: its overrides, without seed and run controls."""
        pairs = (o.split("=", 1) for o in self.overrides if "=" in o)
        return {k.lstrip("+~"): v for k, v in pairs if k.lstrip("+~") not in SEED_KEYS and not is_control_key(k.lstrip("+~"))}


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


def infer_direction(metric: str) -> str:
    name = metric.rsplit("/", 1)[-1].lower()
    return "minimize" if any(word in name for word in LOWER_IS_BETTER) else "maximize"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_overrides(run_dir: Path) -> list[str]:
    hydra_overrides = run_dir / ".hydra" / "overrides.yaml"
    if hydra_overrides.exists():
        return [str(o) for o in OmegaConf.load(hydra_overrides)]
    for name in ("manifest.json", "failed.json"):
        payload = _read_json(run_dir / name)
        if payload and "overrides" in payload:
            return list(payload["overrides"])
    return []


def _sort_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def collect_jobs(sweep_dir: Path) -> list[Job]:
    jobs = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: _sort_key(p.name)):
        if not any((run_dir / n).exists() for n in (".hydra", "metrics.json", "failed.json", "manifest.json")):
            continue  # plots/, wandb/ and other folders that are not jobs
        metrics = _read_json(run_dir / "metrics.json")
        failure = None if metrics else _read_json(run_dir / "failed.json")
        jobs.append(Job(run_dir.name, run_dir, _job_overrides(run_dir), metrics, failure))
    return jobs


def _number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def _value_order(value: str) -> tuple:
    number = _number(value)
    return (0, number, "") if isinstance(number, float) else (1, 0, str(value))


def _metric_keys(jobs: Sequence[Job], optimized: str) -> list[str]:
    keys: dict[str, None] = {}
    for job in jobs:
        for key, value in (job.metrics or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.startswith(SKIPPED_PREFIXES) or key in SKIPPED_KEYS:
                continue
            keys[key] = None

    def rank(key: str) -> tuple:
        group = 0 if key == optimized else 1 if key.startswith(("val/", "test/")) else \
            2 if key.startswith("sparsity/") else 3 if key.startswith("params/") else 4
        return group, key

    return sorted(keys, key=rank)


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


def aggregate(jobs: Sequence[Job], columns: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per configuration (values of `columns`), each metric as mean, std (n > 1) and n."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        settings = job.settings
        groups.setdefault(tuple(settings.get(c, "") for c in columns), []).append(job)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(_value_order(v) for v in k)):
        members = groups[key]
        row: dict[str, Any] = dict(zip(columns, key))
        row["n"] = len(members)
        row["jobs"] = ";".join(j.name for j in members)
        for metric in metrics:
            values = [float(j.metrics[metric]) for j in members if isinstance(j.metrics.get(metric), (int, float))]
            values = [v for v in values if not math.isnan(v)]
            row[metric] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


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


def _trade_off_key(title: str, candidates: Sequence[str], metrics: Sequence[str]) -> Optional[str]:
    if title == "latency":  # of the compressed model, at the smallest batch size measured
        timed = [m for m in metrics if m.startswith("latency/") and m.endswith("_ms")]
        return min(timed, key=lambda m: ("compressed" not in m, len(m), m), default=None)
    return next((c for c in candidates if c in metrics), None)


def _short(value: str, digits: int = 4) -> str:
    """Optuna's 0.0012520653814999472 -> 0.001252; grid values as typed."""
    number = _number(value)
    return f"{number:.{digits}g}" if isinstance(number, float) and len(value) > digits + 2 else value


def _label(row: dict[str, Any], columns: Sequence[str]) -> str:
    return ", ".join(f"{c.rsplit('.', 1)[-1]}={_short(row[c], 3)}" for c in columns) or "default"


def plot_trade_offs(rows: list[dict[str, Any]], columns: Sequence[str], metrics: Sequence[str], optimized: str,
                    direction: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    scored = [r for r in rows if r.get(optimized) is not None]
    for title, candidates, higher_x in TRADE_OFFS:
        x_key = _trade_off_key(title, candidates, metrics)
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
            ax.annotate(_label(points[i][1], columns), coords[i], textcoords="offset points", xytext=(4, 4),
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


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _cell(row: dict[str, Any], metric: str) -> str:
    mean, std = row.get(metric), row.get(f"{metric}_std")
    if mean is None:
        return ""
    return f"{_fmt(mean)} ± {_fmt(std)}" if std is not None else _fmt(mean)


def _best(rows: list[dict[str, Any]], metric: str, direction: str) -> Optional[dict[str, Any]]:
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        return None
    return (max if direction == "maximize" else min)(scored, key=lambda r: r[metric])


def _markdown(result: SweepReportResult, sweep_dir: Path, fixed: list[str], optuna: Optional[dict]) -> str:
    cols, metrics = result.columns, headline_metrics(result.metrics, result.optimized_metric)
    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"Optimised metric: `{result.optimized_metric}` ({result.direction}). "
             f"{sum(r['n'] for r in result.rows)} completed jobs in {len(result.rows)} configurations, "
             f"{len(result.failures)} failed, {len(result.unfinished)} unfinished. "
             "Cells are mean ± sample standard deviation over seeds; n is the number of completed seeds.", ""]
    if fixed:
        lines += ["Fixed overrides: " + " ".join(f"`{o}`" for o in fixed), ""]
    if result.best is not None:
        setting = " ".join(f"`{c}={_short(result.best[c])}`" for c in cols) or "(the only configuration)"
        lines += [f"**Best configuration** by mean `{result.optimized_metric}`: {setting} -> "
                  f"{_cell(result.best, result.optimized_metric)} (n={result.best['n']})", ""]
    if optuna:
        params = " ".join(f"`{k}={v}`" for k, v in (optuna.get("best_params") or {}).items())
        lines += [f"Optuna's best trial: {params} -> {_fmt(optuna.get('best_value'))}", ""]
    header = [*cols, "n", *metrics]
    lines += ["## Results", "", f"Every metric of every configuration is in `{result.csv.name}`.", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        lines.append("| " + " | ".join([*(_short(row[c]) for c in cols), str(row["n"]),
                                        *(_cell(row, m) for m in metrics)]) + " |")
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


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str], metrics: Sequence[str]) -> None:
    header = [*columns, "n", "jobs", *(k for m in metrics for k in (m, f"{m}_std"))]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in header})


def _job_logger_config(jobs: Sequence[Job]) -> Optional[dict]:
    for job in jobs:
        for name in ("config.yaml", ".hydra/config.yaml"):
            path = job.run_dir / name
            if path.exists():
                cfg = OmegaConf.load(path)
                logger = OmegaConf.select(cfg, "logger")
                return OmegaConf.to_container(logger, resolve=False) if logger is not None else None
    return None


def log_to_wandb(result: SweepReportResult, logger_cfg: dict, group: str, sweep_dir: Path) -> None:
    import wandb

    from llmk_lab.tracking import wandb_mode

    header = [*result.columns, "n", *(k for m in result.metrics for k in (m, f"{m}_std"))]
    table = wandb.Table(columns=header, data=[[r.get(k) for k in header] for r in result.rows])
    run = wandb.init(project=logger_cfg.get("project", "llmk_lab"), entity=logger_cfg.get("entity"),
                     group=logger_cfg.get("group") or group, job_type="report", name=f"{group}-report",
                     dir=str(sweep_dir), mode=wandb_mode(logger_cfg.get("mode", "auto")),
                     config={"sweep_dir": str(sweep_dir), "optimized_metric": result.optimized_metric,
                             "direction": result.direction})
    try:
        payload: dict[str, Any] = {"sweep/table": table}
        for title, candidates, _ in TRADE_OFFS:
            x_key = _trade_off_key(title, candidates, result.metrics)
            if x_key is not None:
                payload[f"sweep/{result.optimized_metric} vs {title}"] = wandb.plot.scatter(
                    table, x_key, result.optimized_metric, title=f"{result.optimized_metric} vs {title}")
        payload.update({f"sweep/plots/{p.stem}": wandb.Image(str(p)) for p in result.plots})
        run.log(payload)
        if result.best is not None:
            run.summary.update({"best/" + k: v for k, v in result.best.items() if v is not None})
        run.summary.update({"sweep/failed_jobs": len(result.failures), "sweep/configurations": len(result.rows)})
    finally:
        run.finish()


def write_report(sweep_dir: Path | str, optimized_metric: Optional[str] = None, direction: Optional[str] = None,
                 wandb: Optional[bool] = None) -> SweepReportResult:
    """Read every job of `sweep_dir`; write report.md, report.csv and plots/; log them to W&B if the jobs did."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    info = read_sweep_info(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    optimized = optimized_metric or info.get("optimized_metric") or _configured_metric(jobs) or "test/acc"
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

    metrics = _metric_keys(done, optimized)
    rows = aggregate(done, columns, metrics)
    result = SweepReportResult(rows=rows, failures=failures, unfinished=unfinished, columns=columns, metrics=metrics,
                               optimized_metric=optimized, direction=direction,
                               best=_best(rows, optimized, direction),
                               markdown=sweep_dir / "report.md", csv=sweep_dir / "report.csv")
    result.plots = plot_trade_offs(rows, columns, metrics, optimized, direction, sweep_dir / "plots")
    optuna_results = sweep_dir / "optimization_results.yaml"
    optuna = OmegaConf.to_container(OmegaConf.load(optuna_results)) if optuna_results.exists() else None
    result.markdown.write_text(_markdown(result, sweep_dir, fixed, optuna))
    _write_csv(result.csv, rows, columns, metrics)

    logger_cfg = _job_logger_config(jobs)
    if wandb is None:
        wandb = bool(logger_cfg) and "wandb" in (logger_cfg.get("kinds") or [logger_cfg.get("kind")])
    if wandb and rows:
        log_to_wandb(result, logger_cfg or {}, info.get("group") or sweep_group(sweep_dir), sweep_dir)
    return result


def _configured_metric(jobs: Sequence[Job]) -> Optional[str]:
    for job in jobs:
        path = job.run_dir / ".hydra" / "config.yaml"
        if path.exists():
            return OmegaConf.select(OmegaConf.load(path), "optimized_metric")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (outputs/multirun/<date>/<time>)")
    parser.add_argument("--metric", help="metric to optimise (default: the sweep's optimized_metric)")
    parser.add_argument("--direction", choices=("maximize", "minimize"), help="default: the sweep's, or by name")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log the table and plots to W&B (default: when the jobs logged to W&B)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = write_report(args.sweep_dir, args.metric, args.direction, args.wandb)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.markdown.read_text())
    print(f"wrote {result.markdown}, {result.csv}" + "".join(f", {p}" for p in result.plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())

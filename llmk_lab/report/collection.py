"""Reading a sweep directory: one `Job` per run directory, with its overrides, metrics or failure."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from llmk_lab.sweep_layout import is_control_key

SEED_KEYS = ("seed",)


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
        return {k.lstrip("+~"): v for k, v in pairs
                if k.lstrip("+~") not in SEED_KEYS and not is_control_key(k.lstrip("+~"))}


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_overrides(run_dir: Path) -> list[str]:
    hydra_overrides = run_dir / ".hydra" / "overrides.yaml"
    if hydra_overrides.exists():
        return [str(o) for o in OmegaConf.load(hydra_overrides)]
    for name in ("manifest.json", "failed.json"):
        payload = read_json(run_dir / name)
        if payload and "overrides" in payload:
            return list(payload["overrides"])
    return []


def _sort_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def is_number(value: Any) -> bool:
    """A metric the report can average (bools are ints to Python, not figures)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def with_method_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` plus each compression method's numeric report entries as `compression/<method>/<key>`
    (metrics.json keeps them in the `compression` list, one dict per method; report.csv needs columns)."""
    flat = dict(metrics)
    for entry in metrics.get("compression") or []:
        for key, value in entry.items():
            if is_number(value):
                flat.setdefault(f"compression/{entry.get('method')}/{key}", value)
    return flat


def collect_jobs(sweep_dir: Path) -> list[Job]:
    jobs = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: _sort_key(p.name)):
        if not any((run_dir / n).exists() for n in (".hydra", "metrics.json", "failed.json", "manifest.json")):
            continue  # plots/, wandb/ and other folders that are not jobs
        metrics = read_json(run_dir / "metrics.json")
        failure = None if metrics else read_json(run_dir / "failed.json")
        if metrics and metrics.get("failed_stage"):
            # A run that failed after training keeps what it measured, but it is not a result.
            failure = {"error": f"stage {metrics['failed_stage']!r}: {metrics.get('error', '')}",
                       "type": "FailedStage", **(read_json(run_dir / "failed.json") or {})}
            metrics = None
        jobs.append(Job(run_dir.name, run_dir, _job_overrides(run_dir), metrics and with_method_figures(metrics),
                        failure))
    return jobs


def recorded_value(jobs: list[Job], key: str) -> Any:
    """`key` of the first completed job's metrics.json (what the run resolved, e.g. its optimized_metric), or None."""
    return next((job.metrics[key] for job in jobs if job.metrics and job.metrics.get(key) is not None), None)


def job_config_value(jobs: list[Job], key: str) -> Any:
    """`key` of the first job's resolved config (config.yaml, else .hydra/config.yaml), or None."""
    for job in jobs:
        for name in ("config.yaml", ".hydra/config.yaml"):
            path = job.run_dir / name
            if path.exists():
                value = OmegaConf.select(OmegaConf.load(path), key)
                return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value
    return None

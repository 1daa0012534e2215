"""The sweep's table and plots as one W&B run of the sweep's group (job type `report`).

The run has a fixed id per sweep directory, so writing the report again updates that run instead of
adding one; W&B's own console lines are silenced (the report prints what it wrote)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from llmk_lab.report.pareto import TRADE_OFFS, trade_off_key
from llmk_lab.report.tables import csv_header
from llmk_lab.tracking import wandb_mode


def report_run_id(group: str) -> str:
    """W&B run ids allow letters, digits, `-` and `_`."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{group}-report")[:128]


def log_to_wandb(result, logger_cfg: dict, group: str, sweep_dir: Path) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    header = [c for c in csv_header(result.columns, result.metrics) if c != "job_dirs"]
    table = wandb.Table(columns=header, data=[[r.get(k) for k in header] for r in result.rows])
    run = wandb.init(project=logger_cfg.get("project", "llmk_lab"), entity=logger_cfg.get("entity"),
                     group=logger_cfg.get("group") or group, job_type="report", name=f"{group}-report",
                     id=report_run_id(group), resume="allow", dir=str(sweep_dir),
                     mode=wandb_mode(logger_cfg.get("mode", "auto")),
                     settings=wandb.Settings(silent=True, console="off"),
                     config={"sweep_dir": str(sweep_dir), "optimized_metric": result.optimized_metric,
                             "direction": result.direction})
    try:
        payload: dict[str, Any] = {"sweep/table": table}
        for title, candidates, _ in TRADE_OFFS:
            x_key = trade_off_key(title, candidates, result.metrics)
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

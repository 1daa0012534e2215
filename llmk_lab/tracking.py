"""Experiment tracking: W&B (online when logged in, offline otherwise), TensorBoard, and a CSV log in the run dir
(`logger=none`: none of them)."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers import CSVLogger, Logger

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai")
                                            .removeprefix("https://").removeprefix("http://")) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str) -> str:
    """`auto` never prompts and never hangs: online only with credentials configured."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_has_credentials() else "offline"


def build_loggers(logger_cfg, run_dir: Path, run_name: str, group: Optional[str], config: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")] if logger_cfg.csv else []
    kinds = logger_cfg.active
    if "tensorboard" in kinds:
        from pytorch_lightning.loggers import TensorBoardLogger

        # Event files straight in <run_dir>/tensorboard (no version_N folder: one run, one directory);
        # view with `tensorboard --logdir outputs/` to compare runs.
        tensorboard = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
        tensorboard.run_config = config  # written with the final metrics, for TensorBoard's HParams view
        loggers.append(tensorboard)
    if "wandb" in kinds:
        from pytorch_lightning.loggers import WandbLogger

        mode = wandb_mode(logger_cfg.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_logger = WandbLogger(
            project=logger_cfg.project, entity=logger_cfg.entity, name=run_name,
            group=logger_cfg.group or group, tags=list(logger_cfg.tags), save_dir=str(run_dir),
            mode=mode, config=config, job_type="train",
        )
        # Lightning always passes `anonymous` (None by default), and W&B warns that the setting has no
        # effect whenever it is passed at all: leave it out, so that warning is not printed on every run.
        wandb_logger._wandb_init.pop("anonymous", None)
        log.info("W&B run in %s mode%s", mode,
                 " (sync later with `wandb sync %s/wandb/offline-run-*`)" % run_dir if mode == "offline" else "")
        loggers.append(wandb_logger)
    return loggers


def log_summary(loggers: list[Logger], summary: dict[str, Any]) -> None:
    """Final numbers: W&B run summary (not a step); TensorBoard: the config as hyperparameters with the
    final numbers as their metrics (the HParams view compares runs); nothing for the CSV log (metrics.json)."""
    for logger in loggers:
        if hasattr(logger, "run_config"):
            numbers = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            logger.log_hyperparams(logger.run_config, numbers)
            continue
        experiment = getattr(logger, "experiment", None)
        if logger.__class__.__name__ == "WandbLogger" and experiment is not None:
            experiment.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


def finish(loggers: list[Logger], failed: bool = False) -> None:
    """Always close the W&B run, so a failing job of a sweep does not break the next one."""
    for logger in loggers:
        if logger.__class__.__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)

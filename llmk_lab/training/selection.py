"""Best-checkpoint selection and early stopping on a named validation metric (Lightning's
ModelCheckpoint and EarlyStopping). After fit the selected weights are loaded back, so the test
metric, the cost figures and every export describe the checkpoint that was selected."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from llmk_lab.errors import UserError

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("loss", "nll", "perplexity")


def monitor_mode(train_cfg) -> str:
    if train_cfg.monitor_mode != "auto":
        return train_cfg.monitor_mode
    return "min" if train_cfg.monitor.endswith(LOWER_IS_BETTER) else "max"


class BestCheckpoint(ModelCheckpoint):
    """Keeps the single best checkpoint (weights only) of the monitored validation metric."""


class MonitorCheck(pl.Callback):
    """A monitored name the task does not log is one line naming the ones it does, at the first validation
    (metric names depend on the task and its labels, so they cannot be checked before the data is read)."""

    def __init__(self, monitor: str):
        self.monitor = monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor in trainer.callback_metrics:
            return
        logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        raise UserError(f"train.monitor={self.monitor!r} is not a validation metric of this task; allowed: {logged}")


def selection_callbacks(train_cfg, run_dir: Path) -> list[pl.Callback]:
    if not train_cfg.monitor or train_cfg.fast_dev_run:
        return []
    mode = monitor_mode(train_cfg)
    callbacks: list[pl.Callback] = [MonitorCheck(train_cfg.monitor), BestCheckpoint(
        dirpath=str(Path(run_dir) / "checkpoints"), filename="best-epoch{epoch}", auto_insert_metric_name=False,
        monitor=train_cfg.monitor, mode=mode, save_top_k=1, save_weights_only=True, enable_version_counter=False)]
    if train_cfg.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor=train_cfg.monitor, mode=mode,
                                       patience=train_cfg.early_stopping_patience,
                                       min_delta=train_cfg.early_stopping_min_delta))
    return callbacks


def restore_best(module: pl.LightningModule, trainer: pl.Trainer, callbacks: list) -> dict[str, Any]:
    """Load the selected weights into `module`; figures say which checkpoint it was and whether training stopped early."""
    best = next((c for c in callbacks if isinstance(c, BestCheckpoint)), None)
    if best is None:
        return {}
    figures: dict[str, Any] = {"train/epochs_run": trainer.current_epoch}
    stopper = next((c for c in callbacks if isinstance(c, EarlyStopping)), None)
    if stopper is not None:
        figures["train/stopped_early"] = bool(stopper.stopped_epoch)
    if not best.best_model_path:  # no validation ran during fit (e.g. max_steps shorter than an epoch)
        log.warning("train.monitor=%s: no validation during fit, the final weights are used", best.monitor)
        return figures
    checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    figures.update({
        # 1 = the first epoch; the checkpoint records the 0-based epoch it was saved in.
        "train/best_epoch": int(checkpoint["epoch"]) + 1,
        "train/best_step": int(checkpoint["global_step"]),
        "train/monitor": best.monitor,
        "train/best_score": float(best.best_model_score),
        "train/best_checkpoint": best.best_model_path,
    })
    log.info("selected the checkpoint of epoch %d (%s=%.4f)", figures["train/best_epoch"], best.monitor,
             figures["train/best_score"])
    return figures

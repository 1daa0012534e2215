"""What every job gets from the sweep machinery: a guard against a diverged loss, and a periodic
checkpoint it continues from when it is run again with `sweep.resume=true` after an interruption."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch

from llmk_lab import hardware

log = logging.getLogger(__name__)

RESUME_CHECKPOINT = "resume"  # checkpoints/resume.ckpt, removed once the job completes


def resume_checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / f"{RESUME_CHECKPOINT}.ckpt"


def job_callbacks(settings, run_dir: Path) -> list:
    """What keeps a job of a sweep honest and resumable: stop on a diverged loss, checkpoint periodically."""
    return [NonFiniteLossGuard(settings.hardware.precision), *checkpoint_callbacks(settings, run_dir)]


class NonFiniteLossGuard(pl.Callback):
    """A NaN/inf training loss fails the job (recorded in failed.json) instead of ending as a result.

    With fp16 mixed precision an occasional overflow is expected: the grad
    scaler skips that step, so only a loss that stays non-finite fails.
    """

    def __init__(self, precision: str, tolerated_steps: Optional[int] = None):
        self.tolerated = tolerated_steps if tolerated_steps is not None else (20 if str(precision).startswith("16") else 0)
        self.streak = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or bool(torch.isfinite(loss.detach()).all()):
            self.streak = 0
            return
        self.streak += 1
        if self.streak > self.tolerated:
            raise FloatingPointError(f"train/loss is {float(loss.detach().float().mean())} at step "
                                     f"{trainer.global_step} (the run diverged: lower train.lr or check the data)")


def checkpointing(settings) -> bool:
    every = settings.sweep
    return not settings.train.fast_dev_run and bool(every.checkpoint_every_n_steps or every.checkpoint_every_minutes)


def checkpoint_callbacks(settings, run_dir: Path) -> list:
    """A ModelCheckpoint that keeps one `resume.ckpt`, overwritten every N steps or minutes."""
    from datetime import timedelta

    from pytorch_lightning.callbacks import ModelCheckpoint

    every = settings.sweep
    if not checkpointing(settings):
        return []
    timing = ({"every_n_train_steps": every.checkpoint_every_n_steps} if every.checkpoint_every_n_steps else
              {"train_time_interval": timedelta(minutes=every.checkpoint_every_minutes)})
    callback = ModelCheckpoint(dirpath=str(resume_checkpoint_path(run_dir).parent), save_top_k=0, save_last=True,
                               enable_version_counter=False, **timing)
    callback.CHECKPOINT_NAME_LAST = RESUME_CHECKPOINT
    return [callback]


def checkpoint_to_resume(settings, run_dir: Path, fingerprint: str) -> Optional[str]:
    """The checkpoint an interrupted job continues from (only with `sweep.resume=true`, not with `force`),
    and only when it was written under the same config: `fingerprint` (the config hash that also marks a
    completed job) is stamped beside the checkpoint when the attempt starts. A checkpoint of an earlier
    attempt with another config (a changed default, a code change that altered the resolved config) would
    otherwise silently continue training a different experiment.

    Every rank of a distributed run reads rank zero's run directory (`hardware.job_dir`), so all of them
    continue from the same checkpoint or none does; only rank zero removes or stamps anything."""
    path = resume_checkpoint_path(hardware.job_dir(run_dir))
    stamp = path.with_suffix(".config")
    fingerprint = hardware.shared_fingerprint(fingerprint)
    if not hardware.is_rank_zero():
        written_with = stamp.read_text().strip() if stamp.exists() else None
        resume = path.exists() and settings.sweep.resume and not settings.sweep.force and written_with == fingerprint
        if resume:
            log.info("resuming from %s", path)
        return str(path) if resume else None
    if path.exists():
        written_with = stamp.read_text().strip() if stamp.exists() else None
        if settings.sweep.resume and not settings.sweep.force and written_with == fingerprint:
            log.info("resuming from %s", path)
            return str(path)
        if settings.sweep.resume and not settings.sweep.force:
            log.info("not resuming from %s: it was written with another config; starting over", path)
        path.unlink()  # a stale checkpoint of an earlier attempt must not be mistaken for this run's
    if checkpointing(settings):
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
    return None


def discard_resume_checkpoint(run_dir: Path) -> None:
    path = resume_checkpoint_path(run_dir)
    path.unlink(missing_ok=True)
    path.with_suffix(".config").unlink(missing_ok=True)

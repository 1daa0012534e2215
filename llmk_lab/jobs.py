"""What every job gets from the sweep machinery: a guard against a diverged loss, a periodic checkpoint it
continues from when it is run again with `sweep.resume=true` after an interruption (`kill -9` included),
exactly as if it had not stopped, and a checkpoint written on the scheduler's warning (SIGTERM, SIGUSR1)
before the job exits to be requeued."""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from llmk_lab import hardware
from llmk_lab.paths import write_atomically, write_text_atomically

log = logging.getLogger(__name__)

RESUME_CHECKPOINT = "resume"  # checkpoints/resume.ckpt, removed once the job completes


def resume_checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / f"{RESUME_CHECKPOINT}.ckpt"


def job_callbacks(settings, run_dir: Path, datamodule) -> list:
    """What keeps a job of a sweep honest and resumable: stop on a diverged loss, checkpoint periodically and
    on the scheduler's warning, and carry what Lightning's checkpoint lacks for an exact continuation."""
    callbacks = [NonFiniteLossGuard(settings.hardware.precision), ExactResume(datamodule),
                 CheckpointOnPreemption(resume_checkpoint_path(run_dir))]
    return [*callbacks, *checkpoint_callbacks(settings, run_dir)]


class ExactResume(pl.Callback):
    """The part of a job's state Lightning's checkpoint does not hold, so that a job resumed mid-epoch goes
    on as the uninterrupted job would, to the last digit: the random number generators' states (dropout,
    noise, anything drawn in a training step) and where the epoch's shuffled order had got to.

    The generators are restored just before the first training batch after the restore, the moment the
    uninterrupted job drew its next number: the steps between (rebuilding the model, one-shot compression,
    adapter initialisation) draw numbers the uninterrupted job drew before the checkpoint. Exact for tasks
    whose batches are made without random numbers (masked-LM masking draws them while the next batch is
    prefetched, so its masks after a resume differ) and one process (see ResumableRandomSampler)."""

    def __init__(self, datamodule):
        self.datamodule = datamodule
        self.rng_to_restore: Optional[dict] = None

    def state_dict(self) -> dict:
        trainer = self.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # `processed`: batches whose optimiser step is done in this epoch, also inside on_train_batch_end,
        # where the periodic checkpoint is written before the batch counts as completed.
        done = progress.processed
        state = {"rng": rng_states()}
        if trainer.world_size == 1:
            state["order"] = self.datamodule.train_order_state(done, done >= trainer.num_training_batches)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.rng_to_restore = state_dict["rng"]
        if "order" in state_dict:
            self.datamodule.resume_train_order(state_dict["order"])

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer  # state_dict() is called without it

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.rng_to_restore is not None:
            set_rng_states(self.rng_to_restore)
            self.rng_to_restore = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing beside the checkpoint and renaming. Lightning's own save
    stages the file in the system's temporary folder and moves it, which onto another file system (a
    scratch disk, a small quota) is a copy that a kill or a full disk leaves half-done under the final name."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def rng_states() -> dict:
    """Every generator a training step may draw from, as values a `weights_only` checkpoint load accepts
    (numpy's state array as a tensor)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class CheckpointOnPreemption(pl.Callback):
    """On SIGTERM (a scheduler's preemption or time limit) Lightning finishes the running step and raises
    SIGTERMException; this writes the resume checkpoint then, so the requeued job (`sweep.resume=true`)
    continues from that step. SIGUSR1, SLURM's usual warning signal (`--signal=USR1@90`), is turned into
    SIGTERM for the same path; under Lightning's own SLURM requeue it is left to Lightning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.previous_usr1 = None

    def on_train_start(self, trainer, pl_module) -> None:
        usr1 = getattr(signal, "SIGUSR1", None)  # not on Windows
        if (usr1 is not None and threading.current_thread() is threading.main_thread()
                and not SLURMEnvironment.detect()):
            self.previous_usr1 = signal.signal(usr1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_usr1()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_usr1()
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(str(self.path))
            log.warning("stopped by a signal at step %d; resume checkpoint written to %s (the same command "
                        "with sweep.resume=true continues from it)", trainer.global_step, self.path)

    def _restore_usr1(self) -> None:
        if self.previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self.previous_usr1)
            self.previous_usr1 = None


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
        resume = resume and checkpoint_damage(path) is None  # the same file, the same verdict as rank zero's
        if resume:
            log.info("resuming from %s", path)
        return str(path) if resume else None
    if path.exists():
        written_with = stamp.read_text().strip() if stamp.exists() else None
        if settings.sweep.resume and not settings.sweep.force and written_with == fingerprint:
            damage = checkpoint_damage(path)
            if damage is None:
                log.info("resuming from %s", path)
                return str(path)
            log.warning("not resuming from %s: it is %s; starting the job from scratch", path, damage)
        elif settings.sweep.resume and not settings.sweep.force:
            log.info("not resuming from %s: it was written with another config; starting over", path)
        path.unlink()  # a stale checkpoint of an earlier attempt must not be mistaken for this run's
    # Stamped even without periodic checkpoints: a signal's checkpoint (CheckpointOnPreemption) is resumable.
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(stamp, fingerprint)
    return None


def checkpoint_damage(path: Path) -> Optional[str]:
    """What is wrong with a resume checkpoint (truncated, corrupt), or None when it is whole. Lightning writes
    checkpoints atomically, but a copied, synced or otherwise damaged file must not be trained on: every
    member of the archive `torch.save` wrote is read and its CRC checked, without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"truncated or not a checkpoint ({err})"
    return None if bad is None else f"corrupt (member {bad} fails its checksum)"


def discard_resume_checkpoint(run_dir: Path) -> None:
    path = resume_checkpoint_path(run_dir)
    path.unlink(missing_ok=True)
    path.with_suffix(".config").unlink(missing_ok=True)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()

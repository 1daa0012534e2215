"""What a run prints: each thing once, in words a user needs, and plain text when not on a terminal.

- transformers: its per-load progress bars ("Loading weights", "Writing model shards") are off, and
  its load report is dropped when it only lists newly initialised weights (`llmk_lab.models` already
  says so in one line); a report with unexpected or mismatched weights still shows.
- Library deprecation chatter the user cannot act on is filtered (`weights_only`, Lightning's
  pytree notice, transformers' gradient-checkpointing rename).
- The training progress bar counts epochs from 1 (`Epoch 1/1`, not `Epoch 0/0`) and does not show
  the logger's version id (`v_num`); when stderr is not a terminal (a log file, CI) it is replaced by
  a few plain lines per epoch, with no ANSI codes.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

# Messages of library warnings that say nothing about the user's run.
NOISE = (r".*weights_only.*", r".*LeafSpec.*", r".*is_gradient_checkpointing.*",
         r".*legacy TorchScript-based ONNX export.*",
         # Lightning on a short run: a per-step log every 10 steps is simply sparser, nothing to fix.
         r".*smaller than the logging interval.*",
         # Lightning looks for the order's state on the DataLoader; ours travels in the ExactResume callback
         # (jobs.py), which restores it, so a mid-epoch resume is exact despite what this says.
         r".*ended before the epoch ended and your dataloader is not resumable.*")


class _DropNewWeightsReport(logging.Filter):
    """transformers' multi-line LOAD REPORT, when it only lists MISSING (newly initialised) weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        return any(kind in message for kind in ("UNEXPECTED", "MISMATCH", "CONVERSION"))


_FILTER = _DropNewWeightsReport()


def quiet_libraries() -> None:
    """Apply the rules above; cheap, idempotent, and imports transformers only if it is already loaded
    or about to be (every caller loads a model next)."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # rank_zero: "GPU available: False" and tips; checkpoint_connector: "`weights_only` was not set" on every
    # restore of the run's own checkpoint (ours, so trusted).
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric", "lightning.pytorch.utilities.rank_zero",
                 "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    for name in ("transformers.modeling_utils", "transformers.utils.loading_report"):
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


def on_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar():
    """The Lightning progress bar for this console: rich on a terminal, plain lines otherwise."""
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.callbacks.progress import ProgressBar

    class RunProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return _epoch_text(self.trainer, current_epoch)

        def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)  # the logger's run id: not something to watch while training
            return items

    class PlainProgress(ProgressBar):
        """A line at about every 10 % of an epoch and one at its end; stage ends in one line each."""

        def __init__(self):
            super().__init__()
            self._enabled = True
            self._started = self._started_eval = 0.0
            self._evaluated, self._first_batch = 0, None

        def disable(self) -> None:
            self._enabled = False

        def enable(self) -> None:
            self._enabled = True

        def _say(self, text: str) -> None:
            if self._enabled and self.trainer.is_global_zero:
                print(text, file=sys.stderr, flush=True)

        def _loss(self, trainer, pl_module) -> str:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())

        def on_train_start(self, trainer, pl_module) -> None:
            # A job resumed in the middle of an epoch gets no on_train_epoch_start for that epoch: time it, and
            # its pace, from the resume (the first batch it trains).
            self._started, self._first_batch = time.perf_counter(), None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._started, self._first_batch = time.perf_counter(), None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            total = self.total_train_batches
            if not isinstance(total, int):
                return
            if trainer.max_steps and trainer.max_steps > 0:  # a step budget ends the epoch early
                total = min(total, trainer.max_steps * trainer.accumulate_grad_batches)
            if total < 10:
                return
            step = max(1, total // 10)
            if self._first_batch is None:
                self._first_batch = batch_idx
            if (batch_idx + 1) % step == 0 and batch_idx + 1 < total:
                seconds = (time.perf_counter() - self._started) / (batch_idx + 1 - self._first_batch)
                pace = f"{1 / seconds:.1f} batches/s" if seconds < 1 else f"{seconds:.1f} s/batch"
                self._say(f"{_epoch_text(trainer, trainer.current_epoch)}: {batch_idx + 1}/{total} batches, "
                          f"{pace}, {self._loss(trainer, pl_module)}")

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seconds = time.perf_counter() - self._started
            self._say(f"{_epoch_text(trainer, trainer.current_epoch)} done in {seconds:.0f} s: "
                      f"{self._loss(trainer, pl_module)}")

        def on_validation_start(self, trainer, pl_module) -> None:
            self._evaluated, self._started_eval = 0, time.perf_counter()

        def on_test_start(self, trainer, pl_module) -> None:
            self._evaluated, self._started_eval = 0, time.perf_counter()

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._evaluated += 1

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._evaluated += 1

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self._say(f"validation: {self._evaluated} batches in {time.perf_counter() - self._started_eval:.0f} s")

        def on_test_end(self, trainer, pl_module) -> None:
            self._say(f"test: {self._evaluated} batches in {time.perf_counter() - self._started_eval:.0f} s")

    return RunProgressBar() if on_terminal() else PlainProgress()


def _epoch_text(trainer, current_epoch: int) -> str:
    """`Epoch 1/3`, counted from 1; without a known number of epochs, `Epoch 1`."""
    text = f"Epoch {current_epoch + 1}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        text += f"/{trainer.max_epochs}"
    return text


def figure_text(value) -> str:
    """A figure as the end-of-run and comparison tables print it: counts with thousands separators, other
    numbers to 4 decimals, anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"

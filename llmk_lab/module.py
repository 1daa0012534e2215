"""The Lightning module: one for every task, so the training loop is written once."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from transformers import get_scheduler

from llmk_lab.training import pooling
from llmk_lab.training.adversarial import EmbeddingAdversary
from llmk_lab.training.llrd import split_by_depth
from llmk_lab.training.regularization import (ADAPTIVE_KEY, AdaptiveWeightDecay, check_label_smoothing,
                                              override_dropout, smoothed_loss)

SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class TaskModule(pl.LightningModule):
    def __init__(self, model: nn.Module, task, train_cfg,
                 loss_terms: Sequence[Callable[[dict, Any, torch.Tensor], torch.Tensor]] = ()):
        super().__init__()
        self.model, self.task, self.train_cfg = model, task, train_cfg
        self.metrics = nn.ModuleDict({"val": task.metrics(), "test": task.metrics()})
        # Functions (batch, outputs, loss) -> loss from the compression methods' `loss_term` (e.g.
        # distillation), applied in order to the task loss.
        self.loss_terms = list(loss_terms)
        check_label_smoothing(task, train_cfg.label_smoothing)
        if pooling.enabled(train_cfg):  # after the PEFT strategy: the new head trains under all of them
            pooling.attach(model, task, train_cfg)
        if train_cfg.dropout is not None:
            override_dropout(model, train_cfg.dropout)
        self.adversary = (EmbeddingAdversary(train_cfg.adversarial, train_cfg.adversarial_epsilon,
                                             train_cfg.adversarial_steps, train_cfg.adversarial_alpha)
                          if train_cfg.adversarial != "none" else None)
        # Parameters the PEFT strategy says must not be decayed toward 0 (`no_decay_parameter_names`).
        self.no_decay_names: set[str] = set()
        # Set before the test stage (`reference.record_test_stage`): keeps the test stage's outputs on
        # the export's reference examples, so the export does not run the trained model over them again.
        self.test_outputs = None

    def forward(self, batch: dict) -> Any:
        return self.model(**batch)

    def task_loss(self, outputs, batch) -> torch.Tensor:
        if self.train_cfg.label_smoothing:
            return smoothed_loss(outputs.logits, batch["labels"], self.train_cfg.label_smoothing)
        return outputs.loss

    def training_step(self, batch, batch_idx):
        if self.adversary is not None:
            outputs, loss = self.adversary.training_loss(self.model, batch, self.task_loss)
        else:
            outputs = self(batch)
            loss = self.task_loss(outputs, batch)
        for term in self.loss_terms:
            loss = term(batch, outputs, loss)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _eval_step(self, stage: str, batch) -> Any:
        outputs = self.task.eval_outputs(self.model, batch)
        self.task.update_metrics(self.metrics[stage], batch, outputs)
        # sync_dist: under DDP each process sees a shard of the split; the logged loss is over all of them.
        self.log(f"{stage}/loss", outputs.loss, on_epoch=True, batch_size=len(batch["input_ids"]), sync_dist=True)
        return outputs

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        outputs = self._eval_step("test", batch)
        if self.test_outputs is not None:
            self.test_outputs.add(batch, outputs)

    def _log_epoch(self, stage: str) -> None:
        values = self.task.compute_metrics(self.metrics[stage])
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        self.metrics[stage].reset()

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")

    def configure_callbacks(self):
        # Called again by validate/test: keep the fitted callback rather than replacing it.
        if self.train_cfg.adaptive_weight_decay and not any(
                isinstance(c, AdaptiveWeightDecay) for c in self.trainer.callbacks):
            return [AdaptiveWeightDecay(self.train_cfg.adaptive_weight_decay,
                                        self.train_cfg.adaptive_weight_decay_average)]
        return []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Under FSDP each rank holds a shard of the gradients: FSDP's own clip_grad_norm_ takes the norm over
        # all of them (Lightning's FSDP precision plugin refuses clipping by norm).
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(wrapped,
                                                                                        FullyShardedDataParallel):
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            # Biases and LayerNorm weights are not decayed (the BERT recipe).
            # So are the ones the PEFT strategy names (IA3's scaling vectors start at 1, soft prompts are
            # embeddings: decaying them toward 0 pulls them away from what they mean).
            (no_decay if param.ndim < 2 or name in self.no_decay_names else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.train_cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if self.train_cfg.adaptive_weight_decay:
            # the adaptive coefficient replaces the fixed one (AdaptiveWeightDecay adds it to the gradient)
            groups[0].update({"weight_decay": 0.0, ADAPTIVE_KEY: True})
        if self.train_cfg.layer_lr_decay < 1:
            groups = split_by_depth(self.model, groups, self.train_cfg.lr, self.train_cfg.layer_lr_decay)
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.train_cfg.lr)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(SCHEDULER_NAMES[self.train_cfg.scheduler], optimizer,
                                  num_warmup_steps=int(self.train_cfg.warmup_ratio * total),
                                  num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ThroughputMonitor(pl.Callback):
    """Training examples per second over the optimisation steps (data loading excluded).

    The counts travel in the job's resume checkpoint, so a job continued after an interruption reports
    the examples and seconds of all its attempts (and not 0 when it resumed from the end of training)."""

    def __init__(self):
        self.examples, self.seconds, self._start = 0, 0.0, 0.0

    def state_dict(self) -> dict:
        return {"examples": self.examples, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.examples, self.seconds = state_dict["examples"], state_dict["seconds"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.examples += len(batch["input_ids"])

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0

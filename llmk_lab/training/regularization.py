"""Regularisation knobs next to plain weight decay: adaptive weight decay (Ghiasi, Shafahi & Ardekani,
"Improving Robustness with Adaptive Weight Decay", NeurIPS 2023), a dropout override and label smoothing."""
from __future__ import annotations

import logging
from typing import Iterable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from llmk_lab.errors import UserError

log = logging.getLogger(__name__)

# Optimiser groups whose parameters get the adaptive decay (instead of the group's fixed weight_decay).
ADAPTIVE_KEY = "adaptive_weight_decay"


@torch.no_grad()
def adaptive_decay_step(params: Iterable[torch.Tensor], lambda_awd: float, previous: float | None,
                        average: float) -> float:
    """One step of adaptive weight decay on the task-loss gradients of `params`, in place.

    lambda_t = lambda_awd * ||grad|| / ||w|| (global norms over the decayed parameters, no gradient
    through it), smoothed as lambda_bar = average * lambda_bar_prev + (1 - average) * lambda_t (the
    paper averages with 0.1 / 0.9; the first step starts from lambda_1 itself, not from 0), and the
    decay term lambda_bar * w joins the gradient before the optimiser step, as in the paper's update
    w <- w - lr (grad + lambda_bar w). The decay's pull is thus lambda_awd times the task gradient's,
    whatever the scale of either. Returns lambda_bar."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return previous or 0.0
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    weight_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in params]))
    current = lambda_awd * float(grad_norm) / max(float(weight_norm), 1e-12)
    value = current if previous is None else average * previous + (1 - average) * current
    for p in params:
        p.grad.add_(p, alpha=value)
    return value


class AdaptiveWeightDecay(pl.Callback):
    """Applies `adaptive_decay_step` after the gradients are complete (accumulated, and unscaled under
    mixed precision) and before clipping and the optimiser step; logs the coefficient each step."""

    def __init__(self, lambda_awd: float, average: float):
        self.lambda_awd, self.average = lambda_awd, average
        self.value: float | None = None
        self.history: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups if group.get(ADAPTIVE_KEY) for p in group["params"]]
        self.value = adaptive_decay_step(params, self.lambda_awd, self.value, self.average)
        self.history.append(self.value)
        pl_module.log("train/effective_weight_decay", self.value, on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict) -> None:
        self.value = state_dict.get("value")


# Dropout modules that belong to a PEFT method's own knob (peft.lora_dropout), not to the model.
PEFT_DROPOUT = ("lora_dropout",)


def override_dropout(model: nn.Module, p: float) -> int:
    """Set every nn.Dropout of the model (hidden, attention probabilities, classifier) to `p`;
    returns how many. Families that take attention dropout as a float from their config rather than
    a module (Llama) keep it."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and not any(key in name for key in PEFT_DROPOUT):
            module.p = p
            count += 1
    if not count:
        log.warning("train.dropout=%s: the model has no nn.Dropout module to override", p)
    return count


def check_label_smoothing(task, smoothing: float) -> None:
    """Smoothing replaces a cross-entropy over logits and `labels` (-100: ignored), the tasks that declare one."""
    if smoothing and not task.loss_is_label_cross_entropy:
        raise UserError(f"train.label_smoothing={smoothing} is not available for task {task.registered_name!r}: its "
                        "loss is not a cross-entropy against the labels alone; allowed: 0, or a task whose loss is "
                        "(sequence_classification, token_classification, masked_lm)")


def smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing (Szegedy et al. 2016), over every labelled position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)

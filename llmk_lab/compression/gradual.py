"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta 2017).

Every `frequency` optimiser steps between `start_step` and `end_step` the
targeted layers are pruned to

    s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))^3

by |W|, one threshold per layer; pruned weights stay at zero (their gradients
are zeroed and the masks re-applied after every step). Masks only grow, so a
weight pruned early never comes back. `ScheduledPruning` is shared with
movement pruning, which ranks by a different score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import nn

from llmk_lab.compression import COMPRESSION, CompressionMethod, target_linears
from llmk_lab.compression.one_shot import check_sparsity, layer_keep_mask
from llmk_lab.masks import MASK, set_mask, sparsity_report
from llmk_lab.errors import UserError, check


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's sparsity at optimiser step `step`: s_i before `start`, s_f from `end` on."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1 - progress) ** 3


# Fraction of the optimiser steps after `start_step` over which the schedule runs when `end_step` is null;
# the rest trains at the final sparsity, the recovery stretch Zhu & Gupta end with.
SCHEDULE_FRACTION = 0.75


def default_end_step(total_steps: int, start: int) -> int:
    """The step from which the final sparsity holds when `end_step` is null: three quarters of the way from
    `start` to the end of training, so that at least one optimiser step trains at the final sparsity."""
    end = start + int(SCHEDULE_FRACTION * (total_steps - start))
    return max(start + 1, min(end, total_steps - 1))


@dataclass
class GradualConfig:
    method: str = "gradual_magnitude"
    # Final sparsity s_f of the targeted layers, in [0, 1).
    sparsity: float = 0.7
    # Sparsity s_i applied at `start_step`, in [0, sparsity].
    initial_sparsity: float = 0.0
    # Optimiser step of the first pruning.
    start_step: int = 0
    # Optimiser step from which the final sparsity holds (null: 3/4 of the way from start_step to the
    # last step, leaving the last quarter to recover at the final sparsity).
    end_step: Optional[int] = None
    # Prune every this many optimiser steps (Zhu & Gupta's Delta t).
    frequency: int = 10
    # Regex over module names or a list of name suffixes (null: the transformer blocks' linear layers).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check(0 <= self.initial_sparsity <= self.sparsity, "initial_sparsity", self.initial_sparsity,
              f"a number in [0, sparsity={self.sparsity}]")
        check(self.start_step >= 0, "start_step", self.start_step, "an integer >= 0")
        check(self.end_step is None or self.end_step > self.start_step, "end_step", self.end_step,
              f"null or an integer > start_step={self.start_step}")
        check(self.frequency >= 1, "frequency", self.frequency, "an integer >= 1")


class ScheduledPruning(pl.Callback):
    """Prunes `layers` on the cubic schedule, ranking weights by `scores(name, layer)`.

    With `regrows` false (gradual magnitude) masks only grow: a pruned weight's score is ignored from then
    on. With `regrows` true (movement pruning) every pruning step ranks all weights, pruned ones included,
    so a pruned weight whose score rises comes back with the value it had when it was pruned (it did not
    train while pruned); the mask only settles at `end_step`."""

    regrows = False

    def __init__(self, layers: dict[str, nn.Linear], settings, report: dict):
        self.layers, self.settings, self.report = layers, settings, report
        self.end = settings.end_step
        self.history: list[tuple[int, float]] = []
        # regrowing methods: the values the pruned weights had when they were pruned (zero where kept)
        self.pruned_values: dict[str, torch.Tensor] = {}
        self.regrown = 0
        # (step, mean |W| of the weights the cut removed / mean |W| of those it kept), per cut that removed
        # any: near 0 when a cut takes weights already near zero, near 1 when it takes weights as large as
        # the rest, as a cut blind to size does.
        self.cut_magnitudes: list[tuple[int, float]] = []

    def scores(self, name: str, layer: nn.Linear) -> torch.Tensor:
        return layer.weight.detach().abs()

    def on_fit_start(self, trainer, pl_module):
        if self.end is None:
            self.end = default_end_step(int(trainer.estimated_stepping_batches), self.settings.start_step)
        self.place_state()

    def place_state(self) -> None:
        """Put the per-weight state beside its layer's weight. Lightning restores a checkpoint before it
        moves the model to its device (after, for the strategies that restore late), so this runs at fit
        start and after a restore."""
        self.pruned_values = {name: values.to(self.layers[name].weight.device)
                              for name, values in self.pruned_values.items()}

    # The masks (buffers left out of the model's state dict, like every pruning mask) and the schedule's
    # history travel in the job's resume checkpoint: a job continued after an interruption keeps its pruned
    # weights at zero and prunes on from where it stopped.
    def state_dict(self) -> dict:
        return {"history": list(self.history), "end": self.end, "regrown": self.regrown,
                "cut_magnitudes": list(self.cut_magnitudes),
                "masks": {name: getattr(layer, MASK) for name, layer in self.layers.items() if hasattr(layer, MASK)},
                "pruned_values": self.pruned_values}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history, self.end = [tuple(entry) for entry in state_dict["history"]], state_dict["end"]
        self.regrown = state_dict.get("regrown", 0)
        self.cut_magnitudes = [tuple(entry) for entry in state_dict.get("cut_magnitudes", [])]
        for name, mask in state_dict["masks"].items():
            set_mask(self.layers[name], mask)
        self.pruned_values = dict(state_dict.get("pruned_values", {}))
        self.place_state()

    def due(self, step: int) -> bool:
        s = self.settings
        return step == self.end or (s.start_step <= step < self.end and (step - s.start_step) % s.frequency == 0)

    @torch.no_grad()
    def prune(self, step: int) -> None:
        s = self.settings
        target = cubic_sparsity(step, s.initial_sparsity, s.sparsity, s.start_step, self.end)
        removed_sum = removed_count = kept_sum = kept_count = 0.0
        for name, layer in self.layers.items():
            size = self.dense_weight(name, layer).abs()  # before the cut, pruned weights at their old values
            mask = getattr(layer, MASK, None)
            was_kept = torch.ones_like(size, dtype=torch.bool) if mask is None else mask.clone()
            scores = self.scores(name, layer).clone()
            if self.regrows:
                self._remask(name, layer, was_kept, layer_keep_mask(scores, target))
            else:
                scores[~was_kept] = -torch.inf  # already pruned weights stay pruned and count first
                set_mask(layer, layer_keep_mask(scores, target))
            keep = getattr(layer, MASK)
            removed = was_kept & ~keep
            removed_sum, removed_count = removed_sum + float(size[removed].sum()), removed_count + int(removed.sum())
            kept_sum, kept_count = kept_sum + float(size[keep].sum()), kept_count + int(keep.sum())
        self.history.append((step, target))
        if removed_count and kept_sum:
            self.cut_magnitudes.append((step, (removed_sum / removed_count) / (kept_sum / kept_count)))

    def _remask(self, name: str, layer: nn.Linear, was_kept: torch.Tensor, keep: torch.Tensor) -> None:
        """Replace the layer's mask `was_kept` by `keep`: weights leaving the mask get back their value from
        when they were pruned, newly pruned ones have theirs put aside and are zeroed."""
        values = self.pruned_values.setdefault(name, torch.zeros_like(layer.weight))
        weight = layer.weight.data
        back, newly = keep & ~was_kept, ~keep & was_kept
        weight[back] = values[back]
        values[back] = 0
        values[newly] = weight[newly]
        weight.mul_(keep)
        self.regrown += int(back.sum())
        if hasattr(layer, MASK):
            getattr(layer, MASK).copy_(keep)
        else:
            layer.register_buffer(MASK, keep.clone(), persistent=False)

    def dense_weight(self, name: str, layer: nn.Linear) -> torch.Tensor:
        """The weight with its pruned entries at the values they were pruned with (what a regrown weight
        would be)."""
        values = self.pruned_values.get(name)
        mask = getattr(layer, MASK, None)
        if values is None or mask is None:
            return layer.weight.detach()
        return torch.where(mask, layer.weight.detach(), values)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # global_step counts optimiser steps; with gradient accumulation it repeats, so prune once per step.
        step = trainer.global_step
        if self.due(step) and (not self.history or self.history[-1][0] != step):
            self.prune(step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Pruned weights do not train: their gradients are zeroed once per optimiser step, after every
        # micro-batch has accumulated (so a subclass can first read the whole, unmasked gradient).
        for layer in self.layers.values():
            mask = getattr(layer, MASK, None)
            if mask is not None and layer.weight.grad is not None:
                layer.weight.grad.mul_(mask)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for layer in self.layers.values():
            mask = getattr(layer, MASK, None)
            if mask is not None:
                layer.weight.mul_(mask)

    def on_fit_end(self, trainer, pl_module):
        # A run shorter than the schedule still ends at the requested sparsity.
        if not self.history or self.history[-1][1] < self.settings.sparsity:
            self.prune(self.end)
        self.report.update(requested_sparsity=self.settings.sparsity, schedule_end_step=self.end,
                           pruning_steps=len(self.history), **({"regrown_weights": self.regrown} if self.regrows else {}),
                           **self.cut_magnitude_report(),
                           achieved_sparsity=sparsity_report(pl_module.model, self.layers)["overall"],
                           pruned_layers=len(self.layers))

    def cut_magnitude_report(self) -> dict:
        """The first cut's and the mean cut's removed-to-kept magnitude ratio (`cut_magnitudes`)."""
        if not self.cut_magnitudes:
            return {}
        ratios = [ratio for _, ratio in self.cut_magnitudes]
        return {"removed_to_kept_magnitude_first_cut": ratios[0],
                "removed_to_kept_magnitude_mean": sum(ratios) / len(ratios)}


def trainable_targets(ctx, settings, key: str) -> dict[str, nn.Linear]:
    """Targeted linears of the model as adapted; they must train, or the schedule has nothing to prune."""
    wrapped = [name for name, module in ctx.model.named_modules() if hasattr(module, "base_layer")]
    layers = {} if wrapped else target_linears(ctx.model, settings.target_modules, f"{key}.target_modules")
    frozen = wrapped or [name for name, layer in layers.items() if not layer.weight.requires_grad]
    if frozen:
        raise UserError(f"{key}.method={settings.method!r} prunes weights while they train, but {len(frozen)} "
                        "targeted layers are frozen by the PEFT strategy; use peft=full")
    return layers


@COMPRESSION.register("gradual_magnitude", config=GradualConfig)
class GradualMagnitudePruning(CompressionMethod):
    prunes_while_training = True

    @property
    def requested_sparsity(self) -> Optional[float]:
        return self.settings.sparsity

    @property
    def target_modules(self) -> Optional[Any]:
        return self.settings.target_modules

    def callbacks(self, ctx) -> list:
        return [ScheduledPruning(trainable_targets(ctx, self.settings, "compression"), self.settings, self.report)]

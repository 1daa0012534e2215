"""AdaLoRA (Zhang et al. 2023) through peft: SVD-shaped LoRA whose rank budget is reallocated in training.

Each target linear gets P diag(E) Q with `init_r` singular values; every
`deltaT` optimiser steps between `tinit` and `total - tfinal`, the least
important singular values (sensitivity smoothed by `beta1`/`beta2`) are zeroed
until the total budget, falling cubically from `init_r` to `target_r` per
layer on average, is met. Trainable parameters per target d_in -> d_out:
init_r * (d_in + d_out + 1), plus the task head; the zeroed values stay
parameters (peft masks, it does not shrink).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig

from llmk_lab.masks import masked_update_forward, route_masked_updates
from llmk_lab.errors import UserError, check
from llmk_lab.architectures import architecture
from llmk_lab.peft import PEFT, check_rank, resolve_targets
from llmk_lab.peft.lora import PeftLibraryStrategy, wrap


@dataclass
class AdaLoraConfig:
    method: str = "adalora"
    # Rank each target starts with.
    init_r: int = 12
    # Average rank per target once the budget has shrunk (total budget = target_r x targets).
    target_r: int = 8
    # Optimiser steps of warm-up at the full budget before any rank is removed.
    tinit: int = 10
    # Optimiser steps at the end that train with the final rank pattern fixed.
    tfinal: int = 10
    # Reallocate every deltaT optimiser steps.
    deltaT: int = 5
    # EMA factors of the sensitivity and of its uncertainty.
    beta1: float = 0.85
    beta2: float = 0.85
    # Weight of the penalty keeping P and Q orthogonal (added to the task loss).
    orth_reg_weight: float = 0.5
    # Scaling numerator (peft's lora_alpha; divided by the current rank).
    alpha: float = 8.0
    dropout: float = 0.1
    # Regex over module names or a list of name suffixes (null: every linear
    # layer inside the transformer blocks).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check(self.init_r >= 1, "init_r", self.init_r, "an integer >= 1")
        check(1 <= self.target_r <= self.init_r, "target_r", self.target_r,
              f"an integer in [1, init_r={self.init_r}] (the budget only shrinks)")
        check(self.tinit >= 0, "tinit", self.tinit, "an integer >= 0")
        check(self.tfinal >= 0, "tfinal", self.tfinal, "an integer >= 0")
        check(self.deltaT >= 1, "deltaT", self.deltaT, "an integer >= 1")
        check(0 < self.beta1 < 1, "beta1", self.beta1, "a number in (0, 1)")
        check(0 < self.beta2 < 1, "beta2", self.beta2, "a number in (0, 1)")
        check(self.orth_reg_weight >= 0, "orth_reg_weight", self.orth_reg_weight, "a number >= 0")
        check(self.alpha > 0, "alpha", self.alpha, "a positive number")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")


# AdaLoRA's update is P diag(E) Q, scaled by alpha over the current rank.
_masked_svd_forward = masked_update_forward(
    lambda layer, name: (layer.lora_B[name], layer.lora_A[name] * layer.lora_E[name],
                         layer.scaling[name] / (layer.ranknum[name] + 1e-5)))


def mask_svd_updates(model) -> int:
    from peft.tuners.adalora.layer import SVDLinear

    return route_masked_updates(model, SVDLinear, _masked_svd_forward)


def ranks_in_use(model) -> dict[str, int]:
    """Non-zero singular values per adapted layer: the rank AdaLoRA has left it."""
    return {name.removesuffix(".lora_E.default"): int(torch.count_nonzero(p))
            for name, p in model.named_parameters() if name.endswith("lora_E.default")}


class RankAllocation(pl.Callback):
    """Runs AdaLoRA's `update_and_allocate` once per optimiser step and logs the budget.

    Where in Lightning's loop: peft needs the gradients of the step just taken
    (after backward and optimizer.step, before zero_grad). Lightning 2 calls
    zero_grad, and `on_before_zero_grad`, inside the *next* step's closure,
    after that step's forward: masking E there would edit tensors autograd has
    saved. `on_train_batch_end` of a batch that completed an optimiser step
    is the point where the step is done and its gradients are still there.
    """

    def __init__(self, model, settings: AdaLoraConfig, reports: dict):
        self.model, self.settings, self.reports = model, settings, reports
        self.last_step = 0
        self.budgets: list[int] = []

    @property
    def tuner(self):
        return self.model.base_model

    def on_fit_start(self, trainer, pl_module):
        self.place_state()
        if trainer.fast_dev_run:  # a smoke run of a step or two: keep peft's placeholder schedule
            return
        total = int(trainer.estimated_stepping_batches)
        s = self.settings
        if s.tinit + s.tfinal >= total:
            raise UserError(f"peft.tinit={s.tinit} + peft.tfinal={s.tfinal} leaves no rank-allocation phase in "
                            f"{total} optimiser steps; make tinit + tfinal < {total}")
        self.tuner.rankallocator.set_total_step(total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last_step:  # accumulating gradients: no optimiser step yet
            return
        self.last_step = trainer.global_step
        step = trainer.global_step - 1  # peft counts optimiser steps from 0
        self.tuner.update_and_allocate(step)
        budget, _ = self.tuner.rankallocator.budget_schedule(step)
        in_use = sum(ranks_in_use(self.model).values())
        self.budgets.append(budget)
        # Straight to the loggers: `self.log` would keep only every `log_every_n_steps`-th value.
        for logger in trainer.loggers:
            logger.log_metrics({"peft/rank_budget": budget, "peft/rank_in_use": in_use}, step=trainer.global_step)

    # The allocator's sensitivity averages and the budget history travel in the job's resume checkpoint: a
    # job continued after an interruption allocates from the same scores as one that ran straight through.
    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        return {"last_step": self.last_step, "budgets": list(self.budgets),
                "ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc}

    def load_state_dict(self, state_dict: dict) -> None:
        allocator = self.tuner.rankallocator
        self.last_step, self.budgets = state_dict["last_step"], list(state_dict["budgets"])
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            dict(state_dict[key]) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"))
        self.place_state()

    def place_state(self) -> None:
        """Put the allocator's scores beside their parameters (keyed by the names of the model peft wraps).
        Lightning restores a checkpoint before it moves the model to its device (after, for the strategies
        that restore late), so this runs at fit start and after a restore."""
        allocator = self.tuner.rankallocator
        devices = {name: p.device for name, p in self.tuner.model.named_parameters()}
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            {name: score.to(devices[name]) for name, score in scores.items()}
            for scores in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc))

    def on_train_end(self, trainer, pl_module):
        ranks = ranks_in_use(self.model)
        self.reports.update({
            "peft/rank_budget_initial": self.tuner.rankallocator.init_bgt,
            "peft/rank_budget_final": self.budgets[-1] if self.budgets else None,
            "peft/rank_in_use_final": sum(ranks.values()),
            "peft_ranks_per_layer": ranks,
        })


@PEFT.register("adalora", config=AdaLoraConfig)
class AdaLoRA(PeftLibraryStrategy):
    masks_its_update = True
    reads_whole_gradients = True  # the rank allocator scores each update from its weight and gradient

    @property
    def target_modules(self) -> Optional[Any]:
        return self.settings.target_modules

    def apply(self, model, ctx):
        s = self.settings
        targets = resolve_targets(model, s.target_modules, default=architecture(model).low_rank_update_targets(model))
        check_rank(model, targets, s.init_r, "peft.init_r")
        config = PeftAdaLoraConfig(
            task_type=ctx.task.peft_task_type, init_r=s.init_r, target_r=s.target_r, tinit=s.tinit,
            tfinal=s.tfinal, deltaT=s.deltaT, beta1=s.beta1, beta2=s.beta2, orth_reg_weight=s.orth_reg_weight,
            lora_alpha=s.alpha, lora_dropout=s.dropout,
            target_modules=targets,
            # peft wants the step count now; the trainer knows it only at fit start, where
            # RankAllocation sets the real one. This placeholder only passes peft's check.
            total_step=s.tinit + s.tfinal + 1,
        )
        model = wrap(model, config)
        mask_svd_updates(model)
        return model

    def callbacks(self, ctx):
        return [RankAllocation(ctx.model, self.settings, ctx.reports)]

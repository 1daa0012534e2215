"""Movement pruning during fine-tuning (Sanh et al. 2020), hard variant.

Each targeted weight accumulates the score S = -sum_t W_t * dL/dW'_t over the optimiser steps t, where
W' = W * M is the weight the forward pass uses and dL/dW' its whole gradient (all accumulated
micro-batches, added once per step): weights moving away from zero score high, weights shrinking towards
zero score low. This is the paper's straight-through estimator: a pruned weight still gets dL/dW' (what
restoring it would do to the loss) with its value from when it was pruned, so its score keeps moving.
On Zhu & Gupta's cubic schedule, every `frequency` steps, the lowest-scoring weights of each layer at
the scheduled sparsity are pruned and the rest kept, pruned ones included: a weight whose score has
risen comes back (Sanh et al. take the top-k of S at every step). Pruned weights do not train. From
`end_step` the mask is fixed.

Sanh et al. fine-tune for 10 epochs of MNLI. At a few hundred steps it collapses to a constant prediction
(experiments/pruning_finetune): the lowest scores still belong to weights about as large as the kept
ones, and a cut of them costs far more than a random cut of the same size. The first cut's size ratio is
reported (`removed_to_kept_magnitude_first_cut`) and warned about.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from llmk_lab.compression import COMPRESSION, CompressionMethod
from llmk_lab.compression.gradual import GradualConfig, ScheduledPruning, trainable_targets
from llmk_lab.errors import check

log = logging.getLogger(__name__)


@dataclass
class MovementConfig(GradualConfig):
    method: str = "movement"
    # How each step's score gradient g = dL/dW' * W moves the scores: "adam" (the reference
    # implementation's: the scores are trained by Adam, betas 0.9 / 0.999, so each weight's score counts how
    # consistently it moves away from zero, whatever its size) or "sum" (S = -sum_t g_t, the paper's SGD
    # reading, in which the largest weights have the largest scores of either sign).
    score_update: str = "adam"

    def __post_init__(self):
        super().__post_init__()
        check(self.score_update in SCORE_UPDATES, "score_update", self.score_update, " or ".join(SCORE_UPDATES))


SCORE_UPDATES = ("adam", "sum")
# Adam's constants for the scores (the ranking does not depend on a learning rate: every score starts at 0).
BETAS, EPS = (0.9, 0.999), 1e-12
# A first cut removing weights over half the kept weights' mean size: the weights moving towards zero are
# still far from it (a magnitude cut's ratio is a small fraction; a random cut's is 1).
LARGE_FIRST_CUT = 0.5


class MovementScores(ScheduledPruning):
    regrows = True

    def __init__(self, layers, settings, report):
        super().__init__(layers, settings, report)
        self.movement = {name: torch.zeros_like(layer.weight, dtype=torch.float32)
                         for name, layer in layers.items()}
        # Adam's moments of the score gradients and its step count (score_update=adam)
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.score_steps = 0

    def scores(self, name, layer):
        return self.movement[name]

    def state_dict(self) -> dict:  # the scores too: a resumed job ranks by the whole movement
        return {**super().state_dict(), "movement": self.movement, "moments": self.moments,
                "score_steps": self.score_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.movement, self.moments = dict(state_dict["movement"]), dict(state_dict.get("moments", {}))
        self.score_steps = state_dict.get("score_steps", 0)
        super().load_state_dict(state_dict)  # places the state, the scores included

    def place_state(self) -> None:
        super().place_state()
        device = {name: layer.weight.device for name, layer in self.layers.items()}
        self.movement = {name: score.to(device[name]) for name, score in self.movement.items()}
        self.moments = {name: (m.to(device[name]), v.to(device[name])) for name, (m, v) in self.moments.items()}

    def prune(self, step: int) -> None:
        super().prune(step)
        if len(self.cut_magnitudes) == 1 and self.cut_magnitudes[0][0] == step and self.cut_magnitudes[0][1] > LARGE_FIRST_CUT:
            log.warning(
                "compression.method=movement: the first cut (step %d) removed weights %.2fx the mean size of those it "
                "kept: the scores rank by the direction weights move in, and after compression.start_step=%d steps "
                "the weights moving towards zero are still far from it. Such cuts ended every run of "
                "experiments/pruning_finetune (376 to 1,880 steps, 30 to 90 %%) at one class for every input; "
                "Sanh et al. prune over ~86,000 steps",
                step, self.cut_magnitudes[0][1], self.settings.start_step)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Once per optimiser step, on the gradient of the whole step: with gradient accumulation
        # `on_after_backward` runs after every micro-batch on the running sum, and adding it there would
        # count the earlier micro-batches again. Lightning calls this before gradient clipping. The scores
        # read the unmasked gradient; the parent then zeroes the pruned weights' gradients.
        self.score_steps += 1
        for name, layer in self.layers.items():
            if layer.weight.grad is None:
                continue
            gradient = (layer.weight.grad * self.dense_weight(name, layer)).float()  # dL/dS through the mask
            if self.settings.score_update == "sum":
                self.movement[name] -= gradient
                continue
            m, v = self.moments.setdefault(name, (torch.zeros_like(gradient), torch.zeros_like(gradient)))
            m.mul_(BETAS[0]).add_(gradient, alpha=1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(gradient, gradient, value=1 - BETAS[1])
            m_hat = m / (1 - BETAS[0] ** self.score_steps)
            v_hat = v / (1 - BETAS[1] ** self.score_steps)
            self.movement[name] -= m_hat / (v_hat.sqrt() + EPS)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


@COMPRESSION.register("movement", config=MovementConfig)
class MovementPruning(CompressionMethod):
    prunes_while_training = True

    @property
    def requested_sparsity(self) -> Optional[float]:
        return self.settings.sparsity

    @property
    def target_modules(self) -> Optional[Any]:
        return self.settings.target_modules

    def callbacks(self, ctx) -> list:
        return [MovementScores(trainable_targets(ctx, self.settings, "compression"), self.settings, self.report)]

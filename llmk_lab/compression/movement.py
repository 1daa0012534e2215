"""Movement pruning during fine-tuning (Sanh et al. 2020), hard variant.

Each targeted weight accumulates the score S = -sum_t W_t * dL/dW_t over the
optimiser steps t (dL/dW_t the step's whole gradient, all accumulated
micro-batches, added once per step): weights moving away from zero score high, weights shrinking
towards zero score low. On Zhu & Gupta's cubic schedule the lowest-scoring
weights of each layer are pruned (Sanh et al. rank by top-k of S at the
scheduled sparsity). Unlike the paper's straight-through estimator, pruned
weights do not come back: they are zeroed and their scores frozen, so masks only
grow (the same keeping rules as every other pruning method here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmk_lab.compression import COMPRESSION, CompressionMethod
from llmk_lab.compression.gradual import GradualConfig, ScheduledPruning, trainable_targets


@dataclass
class MovementConfig(GradualConfig):
    method: str = "movement"


class MovementScores(ScheduledPruning):
    def __init__(self, layers, settings, report):
        super().__init__(layers, settings, report)
        self.movement = {name: torch.zeros_like(layer.weight, dtype=torch.float32)
                         for name, layer in layers.items()}

    def scores(self, name, layer):
        return self.movement[name]

    def state_dict(self) -> dict:  # the accumulated scores too: a resumed job ranks by the whole movement
        return {**super().state_dict(), "movement": self.movement}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.movement = {name: score.to(self.layers[name].weight.device)
                         for name, score in state_dict["movement"].items()}

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        for name, layer in self.layers.items():
            self.movement[name] = self.movement[name].to(layer.weight.device)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Once per optimiser step, on the gradient of the whole step: with gradient accumulation
        # `on_after_backward` runs after every micro-batch on the running sum, and adding it there would
        # count the earlier micro-batches again. Lightning calls this before gradient clipping.
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:
                self.movement[name] -= (layer.weight.grad * layer.weight).float()


@COMPRESSION.register("movement", config=MovementConfig)
class MovementPruning(CompressionMethod):
    prunes_while_training = True

    def callbacks(self, ctx) -> list:
        return [MovementScores(trainable_targets(ctx, self.settings, "compression"), self.settings, self.report)]

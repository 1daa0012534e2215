"""Random pruning: the baseline every importance score must beat.

Each targeted layer loses a random `sparsity` fraction of its weights (or a
random N of every M in N:M groups), drawn from a generator seeded by `seed`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmk_lab.architectures import to_weight_layout, weight_matrix
from llmk_lab.compression import COMPRESSION
from llmk_lab.masks import set_mask
from llmk_lab.compression.one_shot import OneShotConfig, OneShotPruning, keep_mask


@dataclass
class RandomPruningConfig(OneShotConfig):
    method: str = "random"
    # Seed of the pruning draw, independent of the run's seed so the same mask can be reused.
    seed: int = 0


@COMPRESSION.register("random", config=RandomPruningConfig)
class RandomPruning(OneShotPruning):
    @torch.no_grad()
    def prune(self, model: nn.Module, layers: dict[str, nn.Module], ctx=None) -> None:
        generator = torch.Generator().manual_seed(self.settings.seed)
        for layer in layers.values():
            scores = torch.rand(weight_matrix(layer).shape, generator=generator)
            set_mask(layer, to_weight_layout(layer, keep_mask(scores, self.settings, per_row=False)))
        self.record(model, layers, seed=self.settings.seed)

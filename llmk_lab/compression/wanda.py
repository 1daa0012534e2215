"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score of weight W_ij: |W_ij| * ||X_j||_2, where X_j is the j-th input feature
over every calibration token reaching the layer. Scores are compared within
each output row (per-output sparsity), or within N:M groups of a row. No
weight update; calibration is block-sequential (llmk_lab/compression/calibration.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmk_lab.architectures import to_weight_layout, weight_matrix
from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.calibration import InputStatistics
from llmk_lab.masks import set_mask
from llmk_lab.compression.one_shot import CalibratedConfig, CalibratedPruning, keep_mask


@dataclass
class WandaConfig(CalibratedConfig):
    method: str = "wanda"


def wanda_scores(weight: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2."""
    return weight.abs() * column_norms.to(weight.dtype).reshape(1, -1)


@COMPRESSION.register("wanda", config=WandaConfig)
class WandaPruning(CalibratedPruning):
    @torch.no_grad()
    def prune_layer(self, name: str, layer: nn.Module, stats: InputStatistics) -> None:
        scores = wanda_scores(weight_matrix(layer), stats.column_norms.to(layer.weight.device))
        set_mask(layer, to_weight_layout(layer, keep_mask(scores, self.settings, per_row=True, sparsity=self.sparsity_of(name))))

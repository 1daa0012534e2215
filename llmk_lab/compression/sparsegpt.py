"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Per linear layer, with X its calibration inputs and H = 2 X X^T (+ `percdamp`
times the mean diagonal on the diagonal), columns are visited left to right
in blocks of `blocksize`. At the start of each block the mask is chosen
adaptively from w^2 / [H^-1]_jj^2 (lowest pruned); N:M chooses it per group
of M columns as they are reached. Each pruned weight's error is spread over
the not-yet-visited columns through the upper Cholesky factor of H^-1 (the
OBS update), so the layer's output on the calibration data changes as little
as possible (the sweep is `llmk_lab/compression/obs.py`, shared with GPTQ). Follows the authors'
reference implementation (`fasterprune`);
the only change is that an unstructured layer gets exactly
round(sparsity * numel) zeros (per-block counts by cumulative rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmk_lab.architectures import to_weight_layout, weight_matrix
from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.calibration import InputStatistics
from llmk_lab.masks import set_mask
from llmk_lab.compression.obs import damped_inverse_factor, obs_sweep, one_thread_on_cpu
from llmk_lab.compression.one_shot import CalibratedConfig, CalibratedPruning
from llmk_lab.errors import check


@dataclass
class SparseGPTConfig(CalibratedConfig):
    method: str = "sparsegpt"
    # Columns per lazy-update block (the paper's 128).
    blocksize: int = 128
    # Dampening added to H's diagonal, as a fraction of its mean diagonal (the paper's 1 %).
    percdamp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        check(self.blocksize >= 1, "blocksize", self.blocksize, "a number of columns >= 1")
        check(0 <= self.percdamp < 1, "percdamp", self.percdamp, "a fraction in [0, 1)")
        if self.n_m:
            check(self.blocksize % self.prune_m == 0, "blocksize", self.blocksize,
                  f"a multiple of prune_m={self.prune_m}, so N:M groups do not straddle blocks")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, prune_n: int = 0,
                    prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01,
                    name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight, keep mask) for one layer; `prune_m > 0` selects the N:M pattern."""
    W = weight.detach().clone().float()
    Hinv = damped_inverse_factor(W, hessian, percdamp, name, "SparseGPT")
    with one_thread_on_cpu(W.device):
        pruned = obs_sweep(W, Hinv, blocksize, sparsity, prune_n, prune_m)
    return W.to(weight.dtype), ~pruned


@COMPRESSION.register("sparsegpt", config=SparseGPTConfig)
class SparseGPTPruning(CalibratedPruning):
    needs_gram = True

    @torch.no_grad()
    def prune_layer(self, name: str, layer: nn.Module, stats: InputStatistics) -> None:
        s = self.settings
        weight, keep = sparsegpt_prune(weight_matrix(layer), stats.hessian(), self.sparsity_of(name), s.prune_n, s.prune_m,
                                       s.blocksize, s.percdamp, name)
        layer.weight.copy_(to_weight_layout(layer, weight))
        set_mask(layer, to_weight_layout(layer, keep))

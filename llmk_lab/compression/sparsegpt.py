"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Per linear layer, with X its calibration inputs and H = 2 X X^T (+ `percdamp`
times the mean diagonal on the diagonal), columns are visited left to right
in blocks of `blocksize`. At the start of each block the mask is chosen
adaptively from w^2 / [H^-1]_jj^2 (lowest pruned); N:M chooses it per group
of M columns as they are reached. Each pruned weight's error is spread over
the not-yet-visited columns through the upper Cholesky factor of H^-1 (the
OBS update), so the layer's output on the calibration data changes as little
as possible. Follows the authors' reference implementation (`fasterprune`);
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
from llmk_lab.compression.masks import set_mask
from llmk_lab.compression.one_shot import CalibratedConfig, CalibratedPruning, n_m_keep_mask
from llmk_lab.errors import UserError, check


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
    H = hessian.detach().clone().float()
    # Inputs that were always zero: their weights do not matter; keep H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise UserError(f"SparseGPT: the Hessian of {name} is not positive definite with "
                        f"compression.percdamp={percdamp}; raise percdamp (the paper uses 0.01)") from None

    pruned = torch.zeros_like(W, dtype=torch.bool)
    # The column loop is thousands of tiny operations: on CPU, thread hand-offs
    # cost more than the arithmetic (measured 60x slower with 2 threads on a busy machine).
    threads = torch.get_num_threads()
    if W.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        _prune_columns(W, Hinv, pruned, sparsity, prune_n, prune_m, blocksize)
    finally:
        torch.set_num_threads(threads)
    return W.to(weight.dtype), ~pruned


def _prune_columns(W: torch.Tensor, Hinv: torch.Tensor, pruned: torch.Tensor, sparsity: float, prune_n: int,
                   prune_m: int, blocksize: int) -> None:
    """The reference `fasterprune` loop: updates `W` and fills `pruned` in place."""
    rows, columns = W.shape
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if prune_m == 0:
            # Adaptive mask selection: this block's lowest w^2 / [H^-1]_jj^2.
            n_block = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            scores = W1 ** 2 / d.reshape(1, -1) ** 2
            mask1 = torch.zeros(scores.numel(), dtype=torch.bool, device=W.device)
            if n_block:
                mask1[torch.topk(scores.flatten(), n_block, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if prune_m and i % prune_m == 0:
                group = W1[:, i:i + prune_m] ** 2 / d[i:i + prune_m].reshape(1, -1) ** 2
                mask1[:, i:i + prune_m] = ~n_m_keep_mask(group, prune_n, prune_m)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])


@COMPRESSION.register("sparsegpt", config=SparseGPTConfig)
class SparseGPTPruning(CalibratedPruning):
    needs_gram = True

    @torch.no_grad()
    def prune_layer(self, name: str, layer: nn.Module, stats: InputStatistics) -> None:
        s = self.settings
        weight, keep = sparsegpt_prune(weight_matrix(layer), stats.hessian(), s.sparsity, s.prune_n, s.prune_m,
                                       s.blocksize, s.percdamp, name)
        layer.weight.copy_(to_weight_layout(layer, weight))
        set_mask(layer, to_weight_layout(layer, keep))

"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), and SparseGPT's joint prune-and-quantise mode.

Per linear layer, on its block-sequential calibration inputs (each block's inputs are the outputs of
the already quantised blocks below it): H = 2 X X^T + `percdamp` x mean(diag H), then the OBS column
sweep of `llmk_lab/compression/obs.py`, the one SparseGPT uses, with each column rounded to the grid
and its rounding error spread over the columns not yet quantised. As the reference `fasterquant`:

- `group_size`: a group's (scale, zero) is fitted when the sweep reaches its first column, on its
  columns' values updated by the blocks before (not yet by the current block's earlier columns, as in
  the reference); per channel (-1), once on the whole matrix before the sweep;
- `act_order`: columns visited in order of decreasing diag(H) (the inputs with the most energy
  first, while the most columns remain to absorb their error); with groups it needs
  `static_groups` (every group's parameters fitted on the original weights before the sweep), so
  groups stay runs of consecutive input weights, which is what the packed format stores;
- `blocksize`: columns per lazy update (128).

With `sparsity` (or `prune_n`/`prune_m`) > 0 it is SparseGPT's joint mode: the mask is chosen in the
same sweep (adaptively per block, as SparseGPT does) and the kept weights quantised, in one pass. A
layer pruned earlier in a chain (`compression=chain`, e.g. Wanda then GPTQ) keeps its zeros: they
stay zero, and their error is compensated like a pruned weight's.

Why the framework's own implementation: it is the same sweep (one function) as SparseGPT, on the same
calibration engine and data protocol, so a GPTQ and a SparseGPT result differ only by the method. The
maintained libraries do not fit here: llm-compressor pins an older transformers than this project's,
and torchao's GPTQ needs its own model code. `tests/test_low_bit.py` checks the update against a
from-scratch OBS step and the layer error against RTN's.
"""
from __future__ import annotations

from typing import Optional

from dataclasses import dataclass

import torch
from torch import nn

from llmk_lab.architectures import weight_matrix
from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.calibration import InputStatistics, prune_block_sequentially
from llmk_lab.compression.low_bit import (PER_CHANNEL, CalibratedLowBitConfig, Grid, LowBitQuantization,
                                          existing_keep_mask, grouped, pack_layer)
from llmk_lab.compression.obs import damped_inverse_factor, obs_sweep, one_thread_on_cpu
from llmk_lab.errors import check


@dataclass
class GPTQConfig(CalibratedLowBitConfig):
    method: str = "gptq"
    # Columns per lazy-update block (the paper's 128).
    blocksize: int = 128
    # Dampening added to H's diagonal, as a fraction of its mean diagonal (the paper's 1 %).
    percdamp: float = 0.01
    # Quantise columns in order of decreasing diag(H) (the reference's --act-order).
    act_order: bool = False
    # Fit every group's scale on the original weights before the sweep (the reference's --static-groups).
    static_groups: bool = False
    # SparseGPT's joint mode: also prune this fraction of each layer in the same sweep (0: quantise only).
    sparsity: float = 0.0
    # ... or N:M: keep `prune_n` of every `prune_m` consecutive input weights (0, 0: unstructured).
    prune_n: int = 0
    prune_m: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.blocksize >= 1, "blocksize", self.blocksize, "a number of columns >= 1")
        check(0 <= self.percdamp < 1, "percdamp", self.percdamp, "a fraction in [0, 1)")
        check(0 <= self.sparsity < 1, "sparsity", self.sparsity, "a number in [0, 1) (0: quantise only)")
        if self.prune_m:
            check(0 < self.prune_n < self.prune_m, "prune_n", self.prune_n,
                  f"a number of kept weights N with 0 < N < prune_m={self.prune_m}")
            implied = 1 - self.prune_n / self.prune_m
            check(abs(self.sparsity - implied) < 1e-9, "sparsity", self.sparsity,
                  f"{implied:g}, the sparsity {self.prune_n}:{self.prune_m} implies (or set prune_n=0, prune_m=0)")
            check(self.blocksize % self.prune_m == 0, "blocksize", self.blocksize,
                  f"a multiple of prune_m={self.prune_m}, so N:M groups do not straddle blocks")
        else:
            check(self.prune_n == 0, "prune_n", self.prune_n, "0 when prune_m is 0 (unstructured)")
        if self.act_order:
            check(self.group_size == PER_CHANNEL or self.static_groups, "static_groups", self.static_groups,
                  "true when act_order=true and group_size is not -1 (the packed format stores groups of "
                  "consecutive input weights, with no per-column group index)")
            check(self.sparsity == 0, "act_order", self.act_order,
                  "false with sparsity > 0 (the joint mode sweeps columns in their own order, as SparseGPT)")


class GroupedColumnQuantizer:
    """The sweep's `quantize_column`: rounds each column onto the grid with its group's (scale, zero) and
    keeps the integer codes, in the original column order, for packing."""

    def __init__(self, grid: Grid, group_size: int, W: torch.Tensor, order: torch.Tensor | None, static: bool):
        rows, columns = W.shape
        self.grid, self.order = grid, order
        self.size = columns if group_size == PER_CHANNEL else group_size
        groups = columns // self.size
        self.codes = torch.zeros_like(W)
        self.scale = torch.zeros(rows, groups, dtype=W.dtype, device=W.device)
        self.zero = torch.zeros_like(self.scale)
        # Per channel or static: every group fitted up front on the weights before the sweep (W is in
        # sweep order; `order` maps back to the original columns).
        self.fitted = group_size == PER_CHANNEL or static
        if self.fitted:
            original = W if order is None else W[:, torch.argsort(order)]
            self.scale[:], self.zero[:] = grid.fit(grouped(original, group_size))

    def __call__(self, position: int, column: torch.Tensor, upcoming) -> torch.Tensor:
        original = position if self.order is None else int(self.order[position])
        group = original // self.size
        if not self.fitted and position % self.size == 0:  # without act order, position == original
            self.scale[:, group], self.zero[:, group] = self.grid.fit(upcoming(self.size))
        scale, zero = self.scale[:, group:group + 1], self.zero[:, group:group + 1]
        codes = self.grid.codes(column.unsqueeze(1), scale.squeeze(1), zero.squeeze(1)).squeeze(1)
        self.codes[:, original] = codes
        return self.grid.dequantize(codes.unsqueeze(1), scale.squeeze(1), zero.squeeze(1)).squeeze(1)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, group_size: int, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  sparsity: float = 0.0, prune_n: int = 0, prune_m: int = 0, keep: torch.Tensor | None = None,
                  name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer: (dequantised weight, codes, scale, zero), all in the original column order; `weight` and
    `keep` are (out, in)."""
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    order = None
    if act_order:
        order = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, order], H[order][:, order]
        keep = keep[:, order] if keep is not None else None
    quantizer = GroupedColumnQuantizer(grid, group_size, W, order, static_groups)
    Hinv = damped_inverse_factor(W, H, percdamp, name, "GPTQ")
    with one_thread_on_cpu(W.device):
        obs_sweep(W, Hinv, blocksize, sparsity, prune_n, prune_m, keep, quantize_column=quantizer)
    if order is not None:
        W = W[:, torch.argsort(order)]
    return W, quantizer.codes, quantizer.scale, quantizer.zero


@COMPRESSION.register("gptq", config=GPTQConfig)
class GPTQ(LowBitQuantization):
    calibrated = True

    @property
    def requested_sparsity(self) -> Optional[float]:
        return self.settings.sparsity  # joint pruning (SparseGPT's mode of the same pass); 0: none

    def quantize(self, model, layers, ctx):
        s = self.settings

        def quantize_layer(name: str, layer: nn.Module, stats: InputStatistics) -> None:
            _, codes, scale, zero = gptq_quantize(
                weight_matrix(layer), stats.hessian(), self.grid, s.group_size, s.blocksize, s.percdamp,
                s.act_order, s.static_groups, s.sparsity, s.prune_n, s.prune_m, existing_keep_mask(layer), name)
            pack_layer(model, name, layer, codes, scale, zero, self.grid, s.group_size)

        result = prune_block_sequentially(model, layers, self.calibration(ctx), quantize_layer, gram=True)
        self.report.update(calibration_sequences=result.sequences, calibration_tokens=result.tokens,
                           act_order=s.act_order, static_groups=s.static_groups,
                           joint_sparsity=s.sparsity)

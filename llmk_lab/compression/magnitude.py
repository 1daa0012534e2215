"""One-shot magnitude pruning: zero the weights of smallest |W|.

`scope: layer` uses one threshold per weight matrix (each layer gets exactly the
requested sparsity, the protocol of Wanda/SparseGPT's magnitude baseline);
`scope: global` ranks all targeted weights together (Han et al. 2015).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from llmk_lab.compression import COMPRESSION, CompressionMethod, target_linears
from llmk_lab.compression.masks import set_mask, sparsity_report
from llmk_lab.errors import check


@dataclass
class MagnitudeConfig:
    method: str = "magnitude"
    # Fraction of the targeted weights set to zero, in [0, 1).
    sparsity: float = 0.5
    # layer: one threshold per matrix; global: one threshold over all targeted matrices.
    scope: str = "layer"
    # Regex over module names or a list of name suffixes (null: every linear
    # layer inside the transformer blocks).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check(0 <= self.sparsity < 1, "sparsity", self.sparsity, "a number in [0, 1)")
        check(self.scope in ("layer", "global"), "scope", self.scope, "one of ['layer', 'global']")


def lowest_k_mask(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """True where kept: all but the `n_pruned` lowest scores (ties broken by position)."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_pruned > 0:
        mask[torch.topk(scores.flatten(), n_pruned, largest=False).indices] = False
    return mask.view_as(scores)


@COMPRESSION.register("magnitude", config=MagnitudeConfig)
class MagnitudePruning(CompressionMethod):
    acts = ("before_fit",)

    @torch.no_grad()
    def before_fit(self, ctx) -> None:
        s = self.settings
        layers = target_linears(ctx.model, s.target_modules, "compression.target_modules")
        if s.scope == "layer":
            for layer in layers.values():
                scores = layer.weight.abs()
                set_mask(layer, lowest_k_mask(scores, round(s.sparsity * scores.numel())))
        else:
            scores = torch.cat([layer.weight.abs().flatten() for layer in layers.values()])
            keep = lowest_k_mask(scores, round(s.sparsity * scores.numel()))
            offset = 0
            for layer in layers.values():
                n = layer.weight.numel()
                set_mask(layer, keep[offset: offset + n].view_as(layer.weight))
                offset += n
        self.report = {"requested_sparsity": s.sparsity, "achieved_sparsity": sparsity_report(ctx.model, layers)["overall"],
                       "pruned_layers": len(layers)}

"""One-shot magnitude pruning: zero the weights of smallest |W|.

`scope: layer` uses one threshold per weight matrix (each layer gets exactly the
requested sparsity, the protocol of Wanda/SparseGPT's magnitude baseline);
`scope: global` ranks all targeted weights together (Han et al. 2015).
With `prune_n`/`prune_m` the N largest |W| of every M consecutive input
weights of a row are kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmk_lab.architectures import to_weight_layout, weight_matrix
from llmk_lab.compression import COMPRESSION
from llmk_lab.masks import set_mask
from llmk_lab.compression.one_shot import OneShotConfig, OneShotPruning, keep_mask, layer_keep_mask
from llmk_lab.errors import check


@dataclass
class MagnitudeConfig(OneShotConfig):
    method: str = "magnitude"
    # The default run's 30 % (the papers' 50 % costs a small encoder too much accuracy for a default).
    sparsity: float = 0.3
    # layer: one threshold per matrix; global: one threshold over all targeted matrices.
    scope: str = "layer"

    def __post_init__(self):
        super().__post_init__()
        check(self.scope in ("layer", "global"), "scope", self.scope, "one of ['layer', 'global']")
        check(not (self.n_m and self.scope == "global"), "scope", self.scope,
              "'layer' with an N:M pattern (its groups are within a row; there is no global threshold)")


@COMPRESSION.register("magnitude", config=MagnitudeConfig)
class MagnitudePruning(OneShotPruning):
    @torch.no_grad()
    def prune(self, model: nn.Module, layers: dict[str, nn.Module], ctx=None) -> None:
        s = self.settings
        if s.scope == "layer":
            for layer in layers.values():
                keep = keep_mask(weight_matrix(layer).abs(), s, per_row=False)
                set_mask(layer, to_weight_layout(layer, keep))
        else:
            scores = torch.cat([layer.weight.abs().flatten() for layer in layers.values()])
            keep = layer_keep_mask(scores, s.sparsity)
            offset = 0
            for layer in layers.values():
                n = layer.weight.numel()
                set_mask(layer, keep[offset: offset + n].view_as(layer.weight))
                offset += n
        self.record(model, layers, per_layer_target=s.scope == "layer", scope=s.scope)

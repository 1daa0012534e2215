"""SVD low-rank factorisation of linear layers.

W (out x in) ~ U_r S_r V_r^T is replaced by two linears, in -> r (weight
sqrt(S_r) V_r^T, no bias) and r -> out (weight U_r sqrt(S_r), the original
bias), splitting the singular values evenly so both factors train alike.
The rank is `rank`, or per layer the smallest r whose singular values keep
`energy` of sum(s^2). A layer is left dense when the factorised pair would not
have fewer parameters than the original (r >= in * out / (in + out)).
The result is no longer a stock transformers architecture: it is saved as a
state dict / checkpoint, not reloadable with `from_pretrained`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from llmk_lab.compression import COMPRESSION, CompressionMethod, target_linears
from llmk_lab.errors import UserError, check


@dataclass
class LowRankConfig:
    method: str = "low_rank"
    # Fixed rank of every factorised layer (null: choose by `energy`).
    rank: Optional[int] = None
    # Fraction of the squared singular values each layer keeps, in (0, 1] (used when rank is null).
    energy: float = 0.9
    # Regex over module names or a list of name suffixes (null: the transformer blocks' linear layers).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check(self.rank is None or self.rank >= 1, "rank", self.rank, "null or an integer >= 1")
        check(0 < self.energy <= 1, "energy", self.energy, "a number in (0, 1]")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2)."""
    cumulative = torch.cumsum(singular_values.double() ** 2, 0)
    r = int(torch.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12)).item()) + 1
    return min(r, singular_values.numel())


@torch.no_grad()
def factorize(linear: nn.Linear, rank: int) -> nn.Sequential:
    weight = linear.weight.detach().float()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(linear.in_features, rank, bias=False, device=weight.device, dtype=linear.weight.dtype)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, device=weight.device,
                       dtype=linear.weight.dtype)
    first.weight.copy_(root[:, None] * vh[:rank])
    second.weight.copy_(u[:, :rank] * root[None, :])
    if linear.bias is not None:
        second.bias.copy_(linear.bias)
    for layer in (first, second):
        layer.requires_grad_(linear.weight.requires_grad)
    return nn.Sequential(first, second)


@COMPRESSION.register("low_rank", config=LowRankConfig)
class LowRank(CompressionMethod):
    merged_export_refusal = ("each factorised layer is two linears, which no transformers architecture has, so "
                             "from_pretrained would rebuild dense random layers in their place; use "
                             "export.checkpoint=true")
    adapter_export_refusal = ("it replaces block linears with pairs of factors, which the base from_pretrained "
                              "loads does not have")

    def refusal_with(self, strategy):
        # With explicit peft.target_modules (e.g. the factors, `...query.0`) the strategy does not look for roles.
        if strategy.finds_layers_by_role and strategy.target_modules is None:
            return ("it replaces the block linears that this strategy finds by their roles (to adapt them, or to "
                    "find the blocks) with pairs of factors; set peft.target_modules to the factor layers, use "
                    "peft=full, bitfit, prompt or prefix, or compress with another method")
        return None

    @torch.no_grad()
    def before_fit(self, ctx) -> None:
        s = self.settings
        layers = target_linears(ctx.model, s.target_modules, "compression.target_modules")
        ranks, kept_dense, before, after = {}, [], 0, 0
        for name, linear in layers.items():
            if s.rank is not None:
                rank = min(s.rank, min(linear.weight.shape))
            else:
                rank = energy_rank(torch.linalg.svdvals(linear.weight.detach().float()), s.energy)
            dense = linear.weight.numel()
            before += dense
            if rank * (linear.in_features + linear.out_features) >= dense:
                kept_dense.append(name)
                after += dense
                continue
            parent_name, _, leaf = name.rpartition(".")
            setattr(ctx.model.get_submodule(parent_name), leaf, factorize(linear, rank))
            ranks[name] = rank
            after += rank * (linear.in_features + linear.out_features)
        if not ranks:
            raise UserError(f"compression.rank={s.rank} / compression.energy={s.energy} factorises no layer: every "
                            "targeted layer would get more parameters; allowed: a smaller rank or energy")
        self.report = {"ranks": ranks, "factorized_layers": len(ranks), "kept_dense": kept_dense,
                       "weights_before": before, "weights_after": after}

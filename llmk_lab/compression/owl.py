"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A
Missing Secret Sauce for Pruning LLMs to High Sparsity").

Uniform sparsity treats every block alike, but blocks differ in how many outlier activations their
weights meet. OWL gives blocks with more outliers a lower sparsity, keeping the mean at the target:

1. Per block l, on the calibration data flowing through the *dense* model, the Wanda score
   A_ij = |W_ij| * ||X_j||_2 of every weight of the block's targeted linear layers, pooled.
2. Layer outlier distribution D_l = percentage of the pooled scores larger than M x their mean
   (M: `owl_threshold`, the paper's 5).
3. D is rescaled to [0, 2 lambda] (lambda: `owl_lambda`, the paper's 0.08), centred on its mean, and block
   l's sparsity is S - (D_l' - mean(D')): the spread is at most 2 lambda and the mean over blocks is
   exactly S (with equal-sized blocks, as in Llama-style models, the overall sparsity too).

The pruning method (Wanda, SparseGPT) then prunes each block at its own sparsity, as usual.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from llmk_lab.architectures import weight_matrix
from llmk_lab.compression.calibration import InputStatistics, find_blocks, prune_block_sequentially
from llmk_lab.errors import UserError


def outlier_percentage(scores: torch.Tensor, threshold: float) -> float:
    """Percentage of `scores` above `threshold` x their mean (the paper's layer outlier distribution)."""
    return float((scores > scores.mean() * threshold).sum()) / scores.numel() * 100


def owl_sparsities(outlier_percentages: list[float], sparsity: float, spread: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier percentages: more outliers, lower sparsity; mean = `sparsity`."""
    ratios = torch.tensor(outlier_percentages, dtype=torch.float64)
    span = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / span * 2 * spread if span > 0 else torch.zeros_like(ratios)
    density = scaled - scaled.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]


def block_prefixes(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """The name prefix of every block holding targeted layers, e.g. 'model.layers.3.', bottom to top."""
    blocks_path, blocks = find_blocks(model, layers)
    prefixes = [f"{blocks_path}.{i}." if blocks_path else f"{i}." for i in range(len(blocks))]
    return [p for p in prefixes if any(name.startswith(p) for name in layers)]


@torch.no_grad()
def block_outlier_percentages(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[dict],
                              threshold: float) -> dict[str, float]:
    """{block prefix: outlier percentage} on calibration data through the dense model (nothing is changed)."""
    prefixes = block_prefixes(model, layers)
    found: dict[str, float] = {}

    def score_block(block, in_block: dict[str, nn.Module], stats: dict[str, InputStatistics], inputs) -> None:
        if not in_block:
            return
        pooled = torch.cat([(weight_matrix(layer).abs().float()
                             * stats[name].column_norms.to(layer.weight.device).reshape(1, -1)).flatten()
                            for name, layer in in_block.items()])
        prefix = next(p for p in prefixes if next(iter(in_block)).startswith(p))
        found[prefix] = outlier_percentage(pooled, threshold)

    prune_block_sequentially(model, layers, batches, None, process_block=score_block)
    return found


def owl_allocation(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict], sparsity: float,
                   threshold: float, spread: float) -> tuple[dict[str, float], dict[str, float]]:
    """({block prefix: sparsity}, {block prefix: outlier percentage}) for the targeted layers' blocks."""
    percentages = block_outlier_percentages(model, layers, batches, threshold)
    prefixes = list(percentages)
    allocated = dict(zip(prefixes, owl_sparsities([percentages[p] for p in prefixes], sparsity, spread)))
    worst = min(allocated.values()), max(allocated.values())
    if worst[0] < 0 or worst[1] >= 1:
        raise UserError(f"compression.owl_lambda={spread} is not allowed with sparsity={sparsity}: OWL would give "
                        f"blocks sparsities from {worst[0]:.3f} to {worst[1]:.3f}; choose owl_lambda so that "
                        "sparsity +/- 2 x owl_lambda stays in [0, 1)")
    return allocated, percentages

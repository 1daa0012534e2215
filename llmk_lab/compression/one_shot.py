"""What the one-shot pruning methods share: their knobs, the N:M pattern, masks from scores, the report.

Sparsity patterns:

- unstructured: a fraction `sparsity` of each layer's weights is zeroed;
- N:M (`prune_n: 2, prune_m: 4`): in every group of M consecutive input
  weights of an output row the N highest-scoring are kept (2:4 is what sparse
  tensor cores accelerate); it implies sparsity 1 - N/M.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from llmk_lab.architectures import LINEAR_TYPES, has_decoder_blocks, in_features
from llmk_lab.compression import CompressionMethod, target_linears
from llmk_lab.compression.calibration import InputStatistics, prune_block_sequentially
from llmk_lab.masks import sparsity_report
from llmk_lab.compression.owl import owl_allocation
from llmk_lab.errors import UserError, check

log = logging.getLogger(__name__)


@dataclass
class OneShotConfig:
    method: str = "magnitude"
    # Fraction of each targeted layer's weights set to zero, in [0, 1).
    sparsity: float = 0.5
    # N:M pattern: keep `prune_n` of every `prune_m` consecutive input weights (0, 0: unstructured).
    prune_n: int = 0
    prune_m: int = 0
    # Regex over module names or a list of name suffixes (null: every linear
    # layer inside the transformer blocks).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check(self.prune_m >= 0, "prune_m", self.prune_m, "0 (unstructured) or a group size M >= 2")
        if self.prune_m == 0:
            check(self.prune_n == 0, "prune_n", self.prune_n, "0 when prune_m is 0 (unstructured)")
        else:
            check(self.prune_m >= 2, "prune_m", self.prune_m, "0 (unstructured) or a group size M >= 2")
            check(0 < self.prune_n < self.prune_m, "prune_n", self.prune_n,
                  f"a number of kept weights N with 0 < N < prune_m={self.prune_m}")
            implied = 1 - self.prune_n / self.prune_m
            check(abs(self.sparsity - implied) < 1e-9, "sparsity", self.sparsity,
                  f"{implied:g}, the sparsity {self.prune_n}:{self.prune_m} implies (or set prune_n=0, prune_m=0)")

    @property
    def n_m(self) -> bool:
        return self.prune_m > 0

    @property
    def pattern(self) -> str:
        return f"{self.prune_n}:{self.prune_m}" if self.n_m else "unstructured"


@dataclass
class CalibratedConfig(OneShotConfig):
    # Calibration sequences from the training split (their length is the data's max length).
    calibration_examples: int = 128
    # Sequences per forward pass during calibration (null: the evaluation batch size).
    calibration_batch_size: Optional[int] = None
    # How `sparsity` is spread over the blocks: uniform (every layer the same) | owl (outlier-weighted
    # layer-wise sparsity, llmk_lab/compression/owl.py: blocks with more activation outliers keep more
    # weights, the mean over blocks stays `sparsity`).
    allocation: str = "uniform"
    # OWL's outlier threshold M (a score is an outlier above M x the block's mean score) and spread lambda
    # (block sparsities lie within sparsity +/- 2 lambda); the paper's 5 and 0.08.
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self):
        super().__post_init__()
        check(self.calibration_examples >= 1, "calibration_examples", self.calibration_examples,
              "a number of sequences >= 1")
        check(self.calibration_batch_size is None or self.calibration_batch_size >= 1, "calibration_batch_size",
              self.calibration_batch_size, "null or a batch size >= 1")
        check(self.allocation in ALLOCATIONS, "allocation", self.allocation, " | ".join(ALLOCATIONS))
        check(self.owl_threshold > 0, "owl_threshold", self.owl_threshold, "a number > 0 (the paper's 5)")
        check(0 <= self.owl_lambda < 0.5, "owl_lambda", self.owl_lambda, "a number in [0, 0.5) (the paper's 0.08)")
        if self.allocation == "owl":
            check(not self.n_m, "allocation", self.allocation,
                  f"uniform with prune_n:prune_m={self.pattern} (N:M fixes every layer's sparsity at 1 - N/M)")


ALLOCATIONS = ("uniform", "owl")


def check_n_m_fits(layers: dict[str, nn.Module], settings: OneShotConfig) -> None:
    """N:M groups run along each row's inputs: every layer's input dimension must be a multiple of M."""
    if not settings.n_m:
        return
    for name, layer in layers.items():
        if in_features(layer) % settings.prune_m:
            raise UserError(f"compression.prune_m={settings.prune_m} is not allowed: layer {name} has "
                            f"{in_features(layer)} input features, not divisible by {settings.prune_m}; "
                            "N:M needs every pruned layer's input dimension divisible by M")


def n_m_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where kept: the `n` highest scores of every `m` consecutive entries of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where kept: the lowest `sparsity` fraction of each row is pruned (per-output comparison)."""
    rows, cols = scores.shape
    pruned = round(sparsity * cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pruned:
        keep.scatter_(1, torch.topk(scores, pruned, dim=1, largest=False).indices, False)
    return keep


def layer_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where kept: the lowest `sparsity` fraction of the whole matrix is pruned (one threshold; ties broken
    by position). Gradual and movement pruning cut each step's target fraction with it too."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    pruned = round(sparsity * scores.numel())
    if pruned:
        keep[torch.topk(scores.flatten(), pruned, largest=False).indices] = False
    return keep.view_as(scores)


def check_sparsity(sparsity: float) -> None:
    """The fraction of the targeted weights a pruning method removes: [0, 1) (all of them is not a model)."""
    check(0 <= sparsity < 1, "sparsity", sparsity, "a number in [0, 1)")


class OneShotPruning(CompressionMethod):
    """Prunes the targeted linear layers once, before fine-tuning, and reports the sparsity achieved."""

    @property
    def requested_sparsity(self) -> Optional[float]:
        return self.settings.sparsity

    @property
    def target_modules(self) -> Optional[Any]:
        return self.settings.target_modules

    def before_fit(self, ctx) -> None:
        layers = self.layers(ctx.model)
        self.prune(ctx.model, layers, ctx)

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        # Scores and masks are computed on (out, in) matrices, so GPT-2's Conv1D is pruned like a Linear.
        layers = target_linears(model, self.settings.target_modules, "compression.target_modules",
                                kinds=LINEAR_TYPES)
        check_n_m_fits(layers, self.settings)
        return layers

    def prune(self, model: nn.Module, layers: dict[str, nn.Module], ctx=None) -> None:
        raise NotImplementedError

    def record(self, model: nn.Module, layers: dict[str, nn.Module], per_layer_target: bool = True, **extra) -> None:
        """Requested vs achieved sparsity, overall and per layer (a global threshold sets no per-layer target)."""
        achieved = sparsity_report(model, layers)
        requested = self.settings.sparsity
        self.report = {"requested_sparsity": requested, "achieved_sparsity": achieved["overall"],
                       "pattern": self.settings.pattern, "pruned_layers": len(layers),
                       "per_layer": {name: {"requested": requested if per_layer_target else None, "achieved": value}
                                     for name, value in achieved["per_layer"].items()}, **extra}


class CalibratedPruning(OneShotPruning):
    """A method whose scores need the layers' inputs: pruned block by block on calibration data."""

    # Whether the statistics must include X^T X (SparseGPT's Hessian).
    needs_gram = False

    def __init__(self, settings):
        super().__init__(settings)
        # {block prefix: sparsity} when the allocation is not uniform (OWL), else empty.
        self.block_sparsity: dict[str, float] = {}

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.settings.allocation == "owl" and not has_decoder_blocks(model):
            raise UserError(f"compression.allocation=owl needs decoder blocks (a causal LM such as Llama); "
                            f"{type(model).__name__} has an encoder stack; allowed there: allocation=uniform")

    def prune(self, model: nn.Module, layers: dict[str, nn.Module], ctx=None) -> None:
        s = self.settings
        batches = ctx.datamodule.calibration_batches(s.calibration_examples, s.calibration_batch_size)
        self.prune_with_batches(model, layers, batches)

    def prune_with_batches(self, model: nn.Module, layers: dict[str, nn.Module], batches) -> None:
        s, extra = self.settings, {}
        if s.allocation == "owl":  # one pass through the dense model first, as the paper does
            self.block_sparsity, outliers = owl_allocation(model, layers, batches, s.sparsity, s.owl_threshold,
                                                           s.owl_lambda)
            extra = {"allocation": "owl", "block_sparsity": self.block_sparsity, "block_outlier_percent": outliers}
        result = prune_block_sequentially(model, layers, batches, self.prune_layer, gram=self.needs_gram)
        if result.sequences < s.calibration_examples:
            log.warning("calibration used %d sequences, fewer than calibration_examples=%d (all the data offered)",
                        result.sequences, s.calibration_examples)
        self.record(model, layers, calibration_sequences=result.sequences, calibration_tokens=result.tokens, **extra)

    def sparsity_of(self, layer_name: str) -> float:
        """The sparsity layer `layer_name` is pruned to: its block's under OWL, else `sparsity`."""
        for prefix, sparsity in self.block_sparsity.items():
            if layer_name.startswith(prefix):
                return sparsity
        return self.settings.sparsity

    def record(self, model: nn.Module, layers: dict[str, nn.Module], per_layer_target: bool = True, **extra) -> None:
        super().record(model, layers, per_layer_target, **extra)
        for name, entry in self.report["per_layer"].items():
            entry["requested"] = self.sparsity_of(name)

    def prune_layer(self, name: str, layer: nn.Module, stats: InputStatistics) -> None:
        raise NotImplementedError


def keep_mask(scores: torch.Tensor, settings: OneShotConfig, per_row: bool,
              sparsity: Optional[float] = None) -> torch.Tensor:
    """True where kept, by the configured pattern: N:M, per output row, or one threshold per layer;
    `sparsity` (the layer's own, e.g. OWL's) replaces the configured one."""
    if settings.n_m:
        return n_m_keep_mask(scores, settings.prune_n, settings.prune_m)
    sparsity = settings.sparsity if sparsity is None else sparsity
    return row_keep_mask(scores, sparsity) if per_row else layer_keep_mask(scores, sparsity)

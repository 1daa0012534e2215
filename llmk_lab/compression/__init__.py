"""Compression methods: one file each, registered with their config schema.

A method implements the hooks it needs; the others do nothing. `run` calls
every hook of every configured method, in order: `check_model(model)` (settings the
loaded model cannot take, refused before anything runs), `before_fit(ctx)` (one-shot,
on weights and calibration data), `callbacks(ctx)` (Lightning callbacks during
fit), `loss_term(ctx)` (a term the training step adds to the task loss),
`after_fit(ctx)` (post-training). What a method needs from the run it declares
as class attributes (`dense_reference`, ...); `run` never looks at names, so
adding a method is one Python file here and one YAML in `conf/compression/`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from torch import nn

from llmk_lab.architectures import LINEAR_TYPES, architecture, matching_modules
from llmk_lab.errors import UserError
from llmk_lab.registry import Registry, import_submodules


# The uncompressed models a method's result can be measured against (size, latency, fidelity); the value is
# what metrics.json records as `measure/reference`.
AS_LOADED = "model as loaded"
FINE_TUNED = "fine-tuned model before compression"

# (batch, model outputs, loss so far) -> loss: a term of the training loss.
LossTerm = Callable[[dict, Any, torch.Tensor], torch.Tensor]


class CompressionMethod:
    # Which uncompressed model the result is compared with: AS_LOADED (copied before any `before_fit`),
    # FINE_TUNED (the trained model just before `after_fit`: for methods that compress only after training, a
    # fairer reference, its task head trained), or None (the method compresses nothing; no copy is kept).
    dense_reference: Optional[str] = AS_LOADED
    # Why the result cannot be exported as a plain transformers model (`export.merged=true`), or None when it
    # can; plan() refuses the combination with this reason before anything runs.
    merged_export_refusal: Optional[str] = None
    # Whether the method changes weights while they train (it needs a PEFT strategy that trains them).
    prunes_while_training: bool = False
    # Why an adapter trained on this method's model, loaded onto the base `from_pretrained` gives (with the
    # pruned layers saved beside it), would not be the run's model, or None when it would: the adapter export
    # is then left out with this reason before anything is written (`export.export_adapter`).
    adapter_export_refusal: Optional[str] = None
    # Whether the method puts the weights into a quantised form (int8, low-bit): a run quantises once.
    quantizes_weights: bool = False
    # Whether `before_fit` starts from the model as loaded (`ctx.dense_model`) rather than from the model the
    # earlier steps compressed (a distillation teacher fine-tuned from the dense model, after a pruning step).
    # Otherwise the uncompressed copy is kept only when a figure compares with it: it costs 1x the weights.
    reads_uncompressed_model: bool = False
    # Whether `after_fit` compresses the trained model before it is evaluated (post-training quantisation):
    # FSDP's shards never hold the whole trained model before the end, so plan() refuses the two together.
    compresses_after_fit: bool = False

    def __init__(self, settings: Any):
        self.settings = settings
        # What the method did, e.g. the layers it pruned: recorded in metrics.json.
        self.report: dict[str, Any] = {}

    def steps(self) -> list["CompressionMethod"]:
        """The methods a run applies for this one, in order: itself (a chain: its steps)."""
        return [self]

    @property
    def requested_sparsity(self) -> Optional[float]:
        """The fraction of the targeted weights the method sets to zero, or None where it sets no such ratio."""
        return None

    @property
    def target_modules(self) -> Optional[Any]:
        """The layers the user pointed the method at (`compression.target_modules`), or None: its default."""
        return None

    def refusal_with(self, strategy) -> Optional[str]:
        """Why this method (with its settings) cannot be combined with PEFT `strategy`, or None."""
        return None

    def check_model(self, model) -> None:
        """Refuse (UserError) settings the loaded model cannot take. Called for every method before any method's
        `before_fit`, so a later step of a chain is refused before an earlier one trains (a distillation teacher)."""

    def before_fit(self, ctx) -> None:
        pass

    def callbacks(self, ctx) -> list:
        return []

    def loss_term(self, ctx) -> Optional[LossTerm]:
        """A term of the training loss, applied to the task loss at every training step, or None."""
        return None

    def after_fit(self, ctx) -> None:
        pass


COMPRESSION: Registry[CompressionMethod] = Registry("compression")


def build_methods(node, path: str = "compression") -> list[CompressionMethod]:
    """The configured method as a list (a chain yields its steps, in order)."""
    if node is None:
        return []
    return COMPRESSION.build(node, path).steps()


def target_linears(model: nn.Module, target_modules: Optional[Any], key: str,
                   kinds: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Module]:
    """Linear layers to compress: the model's transformer-block linears by default.

    `target_modules` follows the one matching rule of `architectures.name_matcher`
    (a regex over module names, or a list of names / dotted suffixes), the same as
    the PEFT strategies'. `kinds` are the layer types the method handles: pruning
    also handles transformers' `Conv1D` (GPT-2); a targeted layer of another linear
    type is refused in one line rather than silently skipped.
    """
    value = architecture(model).block_linears() if target_modules is None else target_modules
    if not isinstance(value, str) and not list(value):
        raise UserError(f"{key}=[] is not allowed: give a regex over module names or a list of name suffixes")
    found = matching_modules(model, value, LINEAR_TYPES)
    if not found:
        raise UserError(f"{key}={target_modules!r} matches no linear layer of the model; give a regex over "
                        "module names or a list of names / dotted suffixes")
    unsupported = {name: m for name, m in found.items() if not isinstance(m, kinds)}
    if unsupported:
        name, layer = next(iter(unsupported.items()))
        raise UserError(f"{key}={target_modules!r}: this method handles {'/'.join(k.__name__ for k in kinds)} "
                        f"layers, and {name} is a {type(layer).__name__}; target other layers or use a "
                        "method that supports it (magnitude, wanda, sparsegpt, random)")
    return found


# Every module of this package registers its compression entries when imported.
import_submodules(__name__, __path__)

"""Block-sequential calibration, the protocol of SparseGPT and Wanda.

Calibration batches run through the model once, up to the first transformer
block, whose inputs are kept. Then, block after block:

1. forward hooks on the block's linear layers collect statistics of their
   inputs (padding tokens excluded through the attention mask);
2. the block's linear layers are pruned from those statistics;
3. the block runs again, now with its pruned weights, and its outputs become
   the next block's inputs.

So each block is calibrated on what the already-pruned model below it really
produces, and pruning errors do not compound unseen.

The arguments each block receives besides the hidden states (attention mask,
rotary position embeddings of Llama, ...) are captured at the first block with
a forward pre-hook and reused for every block: every block of these models is
called with the same ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from llmk_lab.architectures import architecture, in_features
from llmk_lab.errors import UserError

log = logging.getLogger(__name__)


class InputStatistics:
    """What one linear layer's calibration inputs say: token count, column norms and mean |x| per input
    feature, and optionally X^T X."""

    def __init__(self, in_features: int, device: torch.device, gram: bool = False):
        self.tokens = 0
        self.squared_column_norms = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.absolute_sums = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:
        """`x`: (tokens, in_features), padding already removed."""
        x = x.detach().float()
        self.tokens += x.shape[0]
        self.squared_column_norms += x.double().pow(2).sum(0)
        self.absolute_sums += x.double().abs().sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)

    @property
    def mean_absolute(self) -> torch.Tensor:
        """Mean |x_j| over every calibration token: AWQ's activation salience."""
        return (self.absolute_sums / max(self.tokens, 1)).float()

    @property
    def column_norms(self) -> torch.Tensor:
        """||X_j||_2 over every calibration token: Wanda's activation factor."""
        return self.squared_column_norms.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """H = 2 X X^T / tokens: the Hessian of the layer-wise squared reconstruction error (SparseGPT)."""
        if self.gram is None:
            raise RuntimeError("statistics were collected without the Gram matrix")
        return 2 * self.gram / max(self.tokens, 1)


@dataclass
class CalibrationResult:
    blocks: int
    sequences: int
    tokens: int  # non-padding tokens per linear layer input
    blocks_path: str  # where the blocks sit, e.g. "model.layers"


class _StopForward(Exception):
    """Raised by the first block's pre-hook: nothing above it needs to run while capturing."""


def find_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, list[nn.Module]]:
    """The transformer blocks (`llmk_lab.architectures`) and a check that they hold every target layer:
    (the block list's name, its blocks)."""
    arch = architecture(model)
    prefixes = tuple(arch.block_prefix(i) for i in range(len(arch.blocks)))
    outside = [layer for layer in layers if not layer.startswith(prefixes)]
    if outside:
        raise UserError(f"compression.target_modules: {len(outside)} of the {len(layers)} targeted layers lie outside "
                        f"the transformer blocks (e.g. {outside[0]}) at {arch.blocks_path!r}; calibrated pruning "
                        "goes block by block, so target only linear layers inside the blocks (the default)")
    return arch.blocks_path, list(arch.blocks)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def model_inputs(batch: dict) -> dict:
    """A batch without its labels: calibration needs the forward pass only."""
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[dict],
                         device: torch.device) -> list[tuple[tuple, dict, torch.Tensor]]:
    """(args, kwargs, token mask) with which the first block is called, per calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        # No key/value cache: rerunning a block must not append to one.
        kwargs = {k: (None if k in ("past_key_values", "past_key_value") else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _StopForward

    config = getattr(model, "config", None)
    saved_use_cache = getattr(config, "use_cache", None)
    if saved_use_cache is not None:
        config.use_cache = False
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    records = []
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
            try:
                model(**batch)
            except _StopForward:
                pass
            if len(captured) != len(records) + 1:
                raise RuntimeError("the model's forward never reached its first transformer block")
            args, kwargs = captured[-1]
            hidden = _hidden_states(args, kwargs)
            mask = batch.get("attention_mask")
            tokens = (mask.bool() if mask is not None and mask.dim() == 2
                      else torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device))
            records.append((args, kwargs, tokens))
    finally:
        handle.remove()
        if saved_use_cache is not None:
            config.use_cache = saved_use_cache
    return records


@torch.no_grad()
def prune_block_sequentially(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[dict],
    prune_layer: Optional[Callable[[str, nn.Module, InputStatistics], None]],
    gram: bool = False,
    process_block: Optional[Callable[[nn.Module, dict, dict, list], None]] = None,
) -> CalibrationResult:
    """Prune (or quantise) `layers` block by block, each block calibrated on the outputs of the already
    compressed blocks below it.

    `prune_layer(name, linear, statistics)` is called once per target layer, after the statistics of
    every target layer of the same block are complete. A method that treats a block as a whole (AWQ folds
    scales between its layers) gives `process_block(block, layers, statistics, inputs)` instead, with the
    block's calibration inputs as (args, kwargs, token mask) per batch. Either may replace a layer of the
    block by another module; the block's outputs are computed after it.
    """
    blocks_path, blocks = find_blocks(model, layers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        records = capture_block_inputs(model, blocks[0], batches, device)
        if not records:
            raise UserError("calibration produced no batches: the data module's training split is empty")
        total_tokens = int(sum(int(tokens.sum()) for _, _, tokens in records))
        prefixes = [f"{blocks_path}.{i}." if blocks_path else f"{i}." for i in range(len(blocks))]
        # Blocks above the last targeted one need not run.
        last = max(i for i, p in enumerate(prefixes) if any(name.startswith(p) for name in layers))
        for index, block in enumerate(blocks[: last + 1]):
            in_block = {name: layer for name, layer in layers.items() if name.startswith(prefixes[index])}
            stats = {name: InputStatistics(in_features(layer), layer.weight.device, gram)
                     for name, layer in in_block.items()}
            current_tokens: list[torch.Tensor] = []

            def make_hook(statistics: InputStatistics):
                def hook(module, inputs, output):
                    x, tokens = inputs[0], current_tokens[0]
                    if x.shape[:-1] == tokens.shape:
                        x = x[tokens]
                    statistics.add(x.reshape(-1, x.shape[-1]))
                return hook

            handles = [layer.register_forward_hook(make_hook(stats[name])) for name, layer in in_block.items()]
            try:
                for args, kwargs, tokens in records:
                    current_tokens[:] = [tokens]
                    block(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            if process_block is not None:
                process_block(block, in_block, stats, records)
            else:
                for name, layer in in_block.items():
                    prune_layer(name, layer, stats[name])
            # The pruned block's outputs are what the next block sees.
            for i, (args, kwargs, tokens) in enumerate(records):
                hidden = _block_output(block(*args, **kwargs))
                records[i] = (*_with_hidden_states(args, kwargs, hidden), tokens)
            log.debug("calibrated pruning: block %d/%d done", index + 1, len(blocks))
    finally:
        model.train(was_training)
    return CalibrationResult(blocks=len(blocks), sequences=sum(len(t) for _, _, t in records), tokens=total_tokens,
                             blocks_path=blocks_path)

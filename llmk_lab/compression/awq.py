"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest, and the weights that read them
matter most. AWQ scales those weights up before rounding, W' = W diag(s), and the inputs down by the
same factor, X' = X diag(s)^-1, so the layer computes the same function while its salient weights
are rounded with a relatively smaller error. The scale is folded into the operation that produces the
input (a norm's weight and bias, or the rows of a linear layer), so nothing is added at run time.

Per block (block-sequential: the inputs are the outputs of the already quantised blocks below):

1. **Where scales can fold.** For each norm or linear layer P of the block, scaling P's output
   channels by c and the columns of the targeted layers that read it by 1/c must leave the block's
   output unchanged: tested by doing it (random c on one calibration batch), not assumed from a
   family's code. Llama: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up,
   up -> down (and v -> o where keys and values have as many heads as queries); BERT: value ->
   attention output. Layers with no such producer (BERT's post-norm blocks' q/k/v and FFN layers,
   whose norms also feed the residual) are quantised with s = 1 (and clipping).
2. **Scale search** (the paper's grid): s = mean|x|^alpha, normalised by sqrt(max s * min s), for alpha
   in {0, 1/n, ..., (n-1)/n} (`n_grid`, 20); the alpha whose quantised layers reproduce their float
   outputs best is kept. The error of the layers reading one input is computed exactly from the Gram
   matrix X^T X of their calibration inputs, sum_layers ||(Q(W diag s) diag(s)^-1 - W) X^T||^2,
   where the reference measures the output of the parent module (attention or MLP) on a sample.
   alpha = 0 is plain RTN, so the search never does worse than RTN on this objective.
3. **Clipping search** (`clip`, the reference's auto-clip): per output row and group, the range
   max|w| x (1 - i/n) for i < n x `max_shrink` that minimises the group's output error (again from
   the Gram matrix, on the scaled inputs). Skipped for attention queries and keys, as the reference
   does (their errors pass through the softmax).
4. RTN of the scaled, clipped weights onto the grid, packed.

Why the framework's own implementation: AutoAWQ is archived and llm-compressor pins an older
transformers than this project's; here AWQ shares the calibration engine, data and packed format
with GPTQ and RTN, and its folding is found by testing, so a new model family needs no code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmk_lab.architectures import weight_matrix
from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.calibration import (InputStatistics, _block_output, _hidden_states,
                                              prune_block_sequentially)
from llmk_lab.compression.low_bit import (CalibratedLowBitConfig, Grid, LowBitQuantization, grouped, pack_layer,
                                          rtn)
from llmk_lab.errors import check

# Name endings of the attention queries and keys, whose clipping the reference avoids.
NO_CLIP = ("q_proj", "k_proj", "query", "key", "q", "k", "Wqkv", "qkv_proj", "c_attn")


@dataclass
class AWQConfig(CalibratedLowBitConfig):
    method: str = "awq"
    # Points of the scale-exponent grid alpha in [0, 1) (the paper's 20).
    n_grid: int = 20
    # Search each group's clipping range too (the reference's auto-clip).
    clip: bool = True
    # Smallest clipping range tried, as a fraction of the group's largest |w| shrunk away (the reference's 0.5).
    max_shrink: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check(self.n_grid >= 1, "n_grid", self.n_grid, "a number of grid points >= 1")
        check(0 <= self.max_shrink < 1, "max_shrink", self.max_shrink, "a fraction in [0, 1)")


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||delta X^T||_F^2 = trace(delta G delta^T), G = X^T X: the squared output error on every calibration token."""
    return ((delta @ gram) * delta).sum()


def fake_quantized(w: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    codes, scale, zero = rtn(w, grid, group_size)
    return grid.dequantize(grouped(codes, group_size), scale, zero).reshape(w.shape)


def candidate_scales(mean_abs: torch.Tensor, n_grid: int):
    for i in range(n_grid):
        alpha = i / n_grid
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], mean_abs: torch.Tensor, gram: torch.Tensor, grid: Grid,
                 group_size: int, n_grid: int) -> tuple[float, torch.Tensor, float, float]:
    """(alpha, s, error at alpha, error at alpha=0) for the layers `weights` (out, in) reading one input."""
    best = (None, None, float("inf"))
    plain = None
    for alpha, s in candidate_scales(mean_abs, n_grid):
        error = sum(float(output_error(fake_quantized(w * s, grid, group_size) / s - w, gram)) for w in weights)
        if plain is None:
            plain = error
        if error < best[2]:
            best = (alpha, s, error)
    return best[0], best[1], best[2], plain


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, grid: Grid, group_size: int, n_grid: int,
                max_shrink: float) -> torch.Tensor:
    """`w` (out, in) clipped per row and group to the range that minimises that group's output error."""
    g = grouped(w, group_size)  # (out, groups, size)
    rows, groups, size = g.shape
    blocks = torch.stack([gram[k * size:(k + 1) * size, k * size:(k + 1) * size] for k in range(groups)])
    high, low = g.amax(-1), g.amin(-1)
    best_error = torch.full((rows, groups), float("inf"), device=w.device)
    best_high, best_low = high.clone(), low.clone()
    for i in range(int(max_shrink * n_grid)):
        factor = 1 - i / n_grid
        h, lo = high * factor, low * factor
        clipped = torch.maximum(torch.minimum(g, h.unsqueeze(-1)), lo.unsqueeze(-1))
        scale, zero = grid.fit(clipped, lo, h)
        delta = grid.round_trip(clipped, scale, zero) - g  # error against the unclipped weights
        error = torch.einsum("rgi,gij,rgj->rg", delta, blocks, delta)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_high, best_low = torch.where(better, h, best_high), torch.where(better, lo, best_low)
    return torch.maximum(torch.minimum(g, best_high.unsqueeze(-1)), best_low.unsqueeze(-1)).reshape(w.shape)


def _output_channels(module: nn.Module) -> Optional[int]:
    """How many output channels scaling `module`'s parameters can scale: a linear layer's rows, a norm's
    weight; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1 and not list(module.children()):
        return weight.numel()
    return None


@torch.no_grad()
def _scale_outputs(module: nn.Module, c: torch.Tensor) -> None:
    """Multiply `module`'s output channels by `c` through its parameters (rows and bias, or norm weight and bias)."""
    weight = module.weight
    weight.mul_(c.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.mul_(c.to(bias.dtype))


@torch.no_grad()
def foldable_groups(block: nn.Module, layers: dict[str, nn.Module], record) -> list[tuple[nn.Module, list[str]]]:
    """(producer, the targeted layers reading its output) where the scale can fold: scaling the producer's
    outputs by c and those layers' columns by 1/c leaves the block's output unchanged (checked, on one batch)."""
    args, kwargs, _ = record
    inputs: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, args_):
            inputs[name] = args_[0].detach().clone()
        return hook

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs.clear()
        handles = [layer.register_forward_pre_hook(capture(name)) for name, layer in layers.items()]
        try:
            out = _block_output(block(*args, **kwargs)).detach().clone()
        finally:
            for h in handles:
                h.remove()
        return out, dict(inputs)

    reference, seen = run()
    scale_of = float(_hidden_states(args, kwargs).abs().max()) + 1.0
    by_id = {id(layer): name for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(0)
    groups = []
    for module in block.modules():
        channels = _output_channels(module)
        if channels is None:
            continue
        c = (0.5 + 1.5 * torch.rand(channels, generator=generator)).to(next(module.parameters()).device)
        _scale_outputs(module, c)
        try:
            _, scaled_inputs = run()
            readers = [name for name, x in seen.items() if x.shape[-1] == channels and by_id.get(id(module)) != name
                       and torch.allclose(scaled_inputs[name], x * c, rtol=1e-3, atol=1e-5 * scale_of)
                       and not torch.allclose(scaled_inputs[name], x, rtol=1e-3, atol=1e-5 * scale_of)]
            valid = False
            if readers:
                for name in readers:
                    weight_matrix(layers[name]).div_(c.reshape(1, -1))
                try:
                    out, _ = run()
                    valid = torch.allclose(out, reference, rtol=1e-3, atol=1e-4 * (1 + float(reference.abs().max())))
                finally:
                    for name in readers:
                        weight_matrix(layers[name]).mul_(c.reshape(1, -1))
        finally:
            _scale_outputs(module, 1 / c)
        if valid:
            groups.append((module, readers))
    return groups


@COMPRESSION.register("awq", config=AWQConfig)
class AWQ(LowBitQuantization):
    calibrated = True

    def quantize(self, model, layers, ctx):
        s = self.settings
        self.report["scaled_layers"] = {}
        names = {id(layer): name for name, layer in layers.items()}

        # Where scales fold is found on the first block and reused: the engine already relies on every block
        # being called the same way, and testing each block would cost 30 extra block passes on a 30-block model.
        fold_plan: list[tuple[str, list[str]]] = []
        discovered = []

        def process_block(block, in_block, stats: dict[str, InputStatistics], records) -> None:
            grams = {name: stats[name].gram for name in in_block}
            relative = {id(m): n for n, m in block.named_modules()}
            by_relative = {relative[id(m)]: name for name, m in in_block.items()}
            if not discovered:
                discovered.append(True)
                fold_plan.extend((relative[id(p)], [relative[id(in_block[r])] for r in readers])
                                 for p, readers in foldable_groups(block, in_block, records[0]))
                self.report["scale_folds"] = {p: readers for p, readers in fold_plan}
            groups = [(block.get_submodule(p), [by_relative[r] for r in readers]) for p, readers in fold_plan
                      if all(r in by_relative for r in readers)]
            scaled = set()
            for producer, readers in groups:
                weights = [weight_matrix(in_block[n]).float() for n in readers]
                first = stats[readers[0]]
                alpha, scale, error, plain = search_scale(weights, first.mean_absolute.to(weights[0].device),
                                                          first.gram, self.grid, s.group_size, s.n_grid)
                _scale_outputs(producer, 1 / scale)
                for n in readers:
                    weight_matrix(in_block[n]).mul_(scale.reshape(1, -1).to(in_block[n].weight.dtype))
                    # The layer now reads x / s: its Gram matrix is diag(1/s) G diag(1/s).
                    grams[n] = grams[n] / scale.reshape(-1, 1) / scale.reshape(1, -1)
                    scaled.add(n)
                self.report["scaled_layers"][names[id(in_block[readers[0]])]] = {
                    "readers": len(readers), "alpha": alpha, "error": error, "rtn_error": plain}
            for name, layer in in_block.items():
                w = weight_matrix(layer).float()
                if s.clip and name.split(".")[-1] not in NO_CLIP:
                    w = search_clip(w, grams[name], self.grid, s.group_size, s.n_grid, s.max_shrink)
                codes, scale_, zero = rtn(w, self.grid, s.group_size)
                pack_layer(model, name, layer, codes, scale_, zero, self.grid, s.group_size)

        result = prune_block_sequentially(model, layers, self.calibration(ctx), None, gram=True,
                                          process_block=process_block)
        scaled = sum(entry["readers"] for entry in self.report["scaled_layers"].values())
        self.report.update(calibration_sequences=result.sequences, calibration_tokens=result.tokens,
                           layers_with_scales=scaled, layers_without_scales=len(layers) - scaled, clip=s.clip)

"""Low-bit weight-only quantisation: the grid, the packed layer, and round-to-nearest (RTN).

What every low-bit method here shares (`rtn`, `gptq`, `awq`):

- **The grid.** `bits` (2, 3, 4 or 8) signed integer codes per weight, q in [-2^(b-1), 2^(b-1) - 1],
  dequantised as (q - zero) * scale. One (scale, zero) per output row and group of `group_size`
  consecutive input weights, or per output row (`group_size: -1`, "per channel"). Symmetric grids
  have zero = 0 and scale = 2 max|w| / (2^b - 1) (the GPTQ reference's grid); asymmetric ones map
  [min(w, 0), max(w, 0)] onto the codes with an integer zero point. Either way 0.0 is a grid point,
  so a pruned weight stays exactly zero.
- **The stored form.** `PackedLinear` keeps the codes packed densely into int32 words (32 codes in
  `bits` words: 4-bit is two codes a byte) with their scales and zero points, the layout of
  compressed-tensors' `pack-quantized` format (its own packing functions are used), so a symmetric
  model saves as a folder that `transformers.from_pretrained` reloads without llmk_lab. The forward
  pass dequantises the weight on the fly and runs a float matmul: no low-bit kernel runs on the CPU
  this is tested on (the latency figure says what that costs), while the weights in memory and on
  disk are the packed ones.
- **When.** After fit, like the int8 methods: on a model that trained (or `train.max_steps=0`) in
  float, its adapter folded in; the reference for the figures is that fine-tuned float model.

Memory: a 4-bit layer holds out x in / 2 bytes of codes plus out x in / group_size scales; the forward
pass materialises one float copy of one layer's weight at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmk_lab.architectures import in_features, weight_matrix
from llmk_lab.compression import COMPRESSION, FINE_TUNED, CompressionMethod, target_linears
from llmk_lab.masks import MASK
from llmk_lab.errors import UserError, check

# Bit widths the packed format stores and the reload path runs (compressed-tensors packs 1-8 bits;
# 1 bit is a sign, not a grid, and 5-7 are not what anyone deploys).
BITS = (2, 3, 4, 8)
PER_CHANNEL = -1


@dataclass
class LowBitConfig:
    method: str = "rtn"
    # Bits per weight: 2, 3, 4 or 8.
    bits: int = 4
    # Input weights sharing one scale: a positive size dividing every targeted layer's input width
    # (32, 64, 128 are the usual), or -1 for one scale per output row (per channel).
    group_size: int = 128
    # Symmetric grid (zero point 0; reloads with transformers) or asymmetric (integer zero point per group).
    symmetric: bool = True
    # Regex over module names or a list of name suffixes (null: every linear layer inside the transformer
    # blocks; embeddings, the LM head and task heads stay float, as in the GPTQ and AWQ papers).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check(self.bits in BITS, "bits", self.bits, f"one of {list(BITS)} (the bit widths the packed format stores)")
        check(self.group_size == PER_CHANNEL or self.group_size >= 2, "group_size", self.group_size,
              "-1 (one scale per output row) or a group of >= 2 input weights, e.g. 32, 64 or 128")


@dataclass
class CalibratedLowBitConfig(LowBitConfig):
    # Calibration sequences from the training split (their length is the data's max length).
    calibration_examples: int = 128
    # Sequences per forward pass during calibration (null: the evaluation batch size).
    calibration_batch_size: Optional[int] = None
    # Seed of the calibration draw where it is random (causal LM: the windows' offsets; the papers use 0).
    calibration_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.calibration_examples >= 1, "calibration_examples", self.calibration_examples,
              "a number of sequences >= 1")
        check(self.calibration_batch_size is None or self.calibration_batch_size >= 1, "calibration_batch_size",
              self.calibration_batch_size, "null or a batch size >= 1")


# ----------------------------------------------------------------------------- the grid

@dataclass(frozen=True)
class Grid:
    bits: int
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def fit(self, w: torch.Tensor, low: Optional[torch.Tensor] = None,
            high: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per row of `w` (rows, group), from its range or from a given [low, high] (clipping)."""
        low = w.amin(dim=-1) if low is None else low
        high = w.amax(dim=-1) if high is None else high
        low, high = low.clamp(max=0), high.clamp(min=0)
        levels = (1 << self.bits) - 1
        if self.symmetric:
            high = torch.maximum(low.abs(), high)
            low = -high
        empty = (low == 0) & (high == 0)  # an all-zero group: any scale represents it; the reference's choice
        low, high = torch.where(empty, -torch.ones_like(low), low), torch.where(empty, torch.ones_like(high), high)
        scale = (high - low) / levels
        if self.symmetric:
            zero = torch.zeros_like(scale)
        else:
            zero = torch.round(-low / scale) + self.qmin
        return scale, zero

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) of `w` (..., group) with per-row `scale`, `zero` (...,)."""
        return torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), self.qmin, self.qmax)

    @staticmethod
    def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)

    def round_trip(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.codes(w, scale, zero), scale, zero)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group_size); per channel is one group of every column."""
    rows, cols = w.shape
    size = cols if group_size == PER_CHANNEL else group_size
    return w.reshape(rows, cols // size, size)


def rtn(w: torch.Tensor, grid: Grid, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of an (out, in) matrix: (codes (out, in), scale (out, groups), zero (out, groups))."""
    g = grouped(w.float(), group_size)
    scale, zero = grid.fit(g)
    return grid.codes(g, scale, zero).reshape(w.shape), scale, zero


# ----------------------------------------------------------------------------- the packed layer

class PackedLinear(nn.Module):
    """A linear layer whose weight is stored as packed low-bit codes with per-group scales.

    Buffer names and layouts are compressed-tensors' (`weight_packed` int32, `weight_scale`,
    `weight_zero_point`, `weight_shape`); the zero point is kept unpacked (int8) in memory."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = 1 if group_size == PER_CHANNEL else in_features // group_size
        words = math.ceil(in_features * bits / 32)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8,
                                                                  device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features]))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.symmetric)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid, group_size: int,
                   bias: Optional[torch.Tensor], dtype: torch.dtype) -> "PackedLinear":
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        out, inp = codes.shape
        layer = cls(inp, out, grid.bits, group_size, grid.symmetric, bias is not None, dtype, codes.device)
        layer.weight_packed.copy_(pack_to_int32(codes.to(torch.int8), grid.bits))
        layer.weight_scale.copy_(scale.reshape(out, -1).to(dtype))
        if not grid.symmetric:
            layer.weight_zero_point.copy_(zero.reshape(out, -1).to(torch.int8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer

    def codes(self) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        return unpack_from_int32(self.weight_packed, self.bits, torch.Size([self.out_features, self.in_features]))

    def zero_point(self) -> torch.Tensor:
        return torch.zeros_like(self.weight_scale) if self.symmetric else self.weight_zero_point

    def dequantized_weight(self) -> torch.Tensor:
        # The order of operations of compressed-tensors' `dequantize` (codes to the scale's dtype, minus the
        # zero point, times the scale), so a reloaded folder computes the same weights to the bit.
        scale = self.weight_scale
        g = grouped(self.codes().to(scale.dtype), self.group_size)
        return self.grid.dequantize(g, scale, self.zero_point().to(scale.dtype)).reshape(self.out_features,
                                                                                         self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def pack_layer(model: nn.Module, name: str, layer: nn.Module, codes: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor, grid: Grid, group_size: int) -> PackedLinear:
    """Replace `layer` (at `name` in `model`) by its packed form; codes are (out, in)."""
    packed = PackedLinear.from_codes(codes, scale, zero, grid, group_size, layer.bias, layer.weight.dtype)
    replace_module(model, name, packed)
    return packed


# ----------------------------------------------------------------------------- the method base

class LowBitQuantization(CompressionMethod):
    """Replaces the targeted linear layers by `PackedLinear` after fit; subclasses choose the codes."""

    dense_reference = FINE_TUNED
    compresses_after_fit = True
    merged_export_refusal = ("merged/ is a float checkpoint and the run's model is low-bit; model/ "
                             "(export.model=true, the default) holds the packed model")
    adapter_export_refusal = ("it quantises the model after fit: the run measured the low-bit model, and an "
                              "adapter on the float base is the float model before that (model/ holds the "
                              "low-bit model)")
    # Whether the method reads calibration data (GPTQ, AWQ).
    calibrated = False
    quantizes_weights = True

    @property
    def grid(self) -> Grid:
        return Grid(self.settings.bits, self.settings.symmetric)

    def refusal_with(self, strategy) -> Optional[str]:
        if strategy.wraps_model:
            return ("it replaces the base linear layers by packed low-bit ones after fit, and this strategy's "
                    "adapter modules wrap those layers; train with peft=full, top_layers, bitfit or linear_probe, or "
                    "export the adapter merged (export.merged=true) and quantise that folder in a second run "
                    "(model.name_or_path=RUN_DIR/merged peft=full train.max_steps=0)")
        return None

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return target_linears(model, self.settings.target_modules, "compression.target_modules")

    def check_model(self, model) -> None:
        layers = self.layers(model)
        size = self.settings.group_size
        if size != PER_CHANNEL:
            for name, layer in layers.items():
                if in_features(layer) % size:
                    raise UserError(f"compression.group_size={size} is not allowed: layer {name} has "
                                    f"{in_features(layer)} input features, not divisible by {size}; use a "
                                    "divisor of every targeted layer's input width or -1 (per channel)")

    def before_fit(self, ctx) -> None:
        # Checked before training so a doomed run costs nothing.
        previous = ctx.quantized_by
        if previous is not None or bool(packed_layers(ctx.model)):
            raise UserError(f"compression.method={self.settings.method!r}: the model is already quantised"
                            f"{f' by {previous!r}' if previous else ''}; quantise once (allowed: one "
                            "quantisation step per run, on a float model)")
        ctx.quantized_by = self.settings.method

    @torch.no_grad()
    def after_fit(self, ctx) -> None:
        model = ctx.model
        model.eval()
        layers = self.layers(model)
        zeros = sum(int((weight_matrix(layer) == 0).sum()) for layer in layers.values())
        total = sum(layer.weight.numel() for layer in layers.values())
        float_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers.values())
        self.quantize(model, layers, ctx)
        packed = packed_layers(model)
        stored = sum(p.stored_bytes() for p in packed.values())
        dequantized_zeros = sum(int((p.dequantized_weight() == 0).sum()) for p in packed.values())
        s = self.settings
        self.report.update({
            "bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric, "quantized_layers": len(packed),
            "zero_fraction_before": zeros / total, "zero_fraction_quantized": dequantized_zeros / total,
            # What the packed weights cost per weight, scales and zero points included.
            "bits_per_weight": 8 * stored / total, "packed_bytes": stored, "float_bytes": float_bytes,
            "kernel": "dequantised on the fly, float matmul",
        })

    def quantize(self, model: nn.Module, layers: dict[str, nn.Module], ctx) -> None:
        raise NotImplementedError

    def calibration(self, ctx) -> list[dict]:
        s = self.settings
        return ctx.datamodule.calibration_batches(s.calibration_examples, s.calibration_batch_size,
                                                  seed=s.calibration_seed)


def existing_keep_mask(layer: nn.Module) -> Optional[torch.Tensor]:
    """The pruning mask of `layer` as (out, in), True where kept, or None."""
    mask = getattr(layer, MASK, None)
    if mask is None:
        return None
    return mask.t() if mask.shape != weight_matrix(layer).shape else mask


@COMPRESSION.register("rtn", config=LowBitConfig)
class RoundToNearest(LowBitQuantization):
    """Each group's scale from its own range, every weight rounded to the nearest grid point: the baseline
    the GPTQ and AWQ papers compare with."""

    def quantize(self, model, layers, ctx):
        for name, layer in layers.items():
            w = weight_matrix(layer).float()
            codes, scale, zero = rtn(w, self.grid, self.settings.group_size)
            pack_layer(model, name, layer, codes, scale, zero, self.grid, self.settings.group_size)

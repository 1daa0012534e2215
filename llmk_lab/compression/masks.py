"""Pruning masks that survive fine-tuning, adapters and merging.

A pruned linear layer carries a boolean buffer `llmk_mask` (not saved in
state dicts, so exported models stay plain Hugging Face models). Three things
keep the pruned weights at zero afterwards:

- `MaskKeeper` zeroes their gradients and re-applies the masks after every
  optimiser step (full fine-tuning, top layers, BitFit...);
- `mask_lora_updates` makes LoRA's update obey the mask, (W + BA) * M, so the
  model trained is exactly the model obtained after merging;
- the same masked update in peft's merge (`mask_merged_updates`), so the merged
  model has its zeros without re-masking: sparsity after merging is measured,
  not imposed.
"""
from __future__ import annotations

import types
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from llmk_lab.errors import UserError

MASK = "llmk_mask"


def set_mask(linear: nn.Module, mask: torch.Tensor) -> None:
    mask = mask.to(device=linear.weight.device, dtype=torch.bool)
    with torch.no_grad():
        linear.weight.mul_(mask)
    if hasattr(linear, MASK):
        setattr(linear, MASK, getattr(linear, MASK) & mask)
    else:
        linear.register_buffer(MASK, mask, persistent=False)


def masked_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, MASK, None), torch.Tensor)}


@torch.no_grad()
def reapply_masks(model: nn.Module) -> None:
    for module in masked_linears(model).values():
        module.weight.mul_(getattr(module, MASK))


class MaskKeeper(pl.Callback):
    """Keeps pruned weights at zero through training."""

    def __init__(self, model: nn.Module):
        self.modules = list(masked_linears(model).values())

    def on_after_backward(self, trainer, pl_module):
        for module in self.modules:
            if module.weight.grad is not None:
                module.weight.grad.mul_(getattr(module, MASK))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for module in self.modules:
            with torch.no_grad():
                module.weight.mul_(getattr(module, MASK))


def masked_update_forward(update_weight: Callable[[nn.Module, str], torch.Tensor]):
    """A forward for a peft low-rank layer whose update obeys the base layer's pruning mask:
    x @ ((W + dW) * M)^T, so the model trained is the model that merging (then re-masking) exports.
    `update_weight(layer, adapter_name)` returns dW as a full matrix."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        mask = getattr(self.base_layer, MASK)
        if self.fan_in_fan_out:  # transformers' Conv1D (GPT-2) stores W^T; dW is (out, in)
            mask = mask.t()
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            delta = update_weight(self, name)
            x_in = self.lora_dropout[name](x).to(delta.dtype)
            result = result + F.linear(x_in, delta * mask).to(result.dtype)
        return result

    return forward


_masked_lora_forward = masked_update_forward(
    lambda layer, name: (layer.lora_B[name].weight @ layer.lora_A[name].weight) * layer.scaling[name])


def _masked_delta_weight(self, adapter: str) -> torch.Tensor:
    """peft's merge adds `get_delta_weight(adapter)` to W; masked, W + dW * M = (W + dW) * M because the
    pruned W is already zero there, so the merged model is the one trained, with no re-masking after it."""
    delta = type(self).get_delta_weight(self, adapter)
    return delta * getattr(self.base_layer, MASK).to(delta.dtype)


def mask_merged_updates(module: nn.Module) -> None:
    """Make peft's merge of this low-rank layer obey its base layer's pruning mask."""
    module.get_delta_weight = types.MethodType(_masked_delta_weight, module)


def mask_lora_updates(model: nn.Module) -> int:
    """Route LoRA layers over pruned weights through the masked forward and the masked merge; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    patched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and hasattr(module.base_layer, MASK):
            if any(module.use_dora.values()):
                raise UserError("peft.use_dora=true cannot keep pruning masks; use plain LoRA on a pruned model")
            module.forward = types.MethodType(_masked_lora_forward, module)
            mask_merged_updates(module)
            patched += 1
    return patched


def sparsity_report(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict:
    """Fraction of zero weights per layer and over all the given (default: masked) layers."""
    modules = masked_linears(model) if modules is None else modules
    from llmk_lab.measure import stored_values

    per_layer, zeros, total = {}, 0, 0
    for name, module in modules.items():
        weight = stored_values(module.weight() if callable(module.weight) else module.weight)
        z = int((weight == 0).sum())
        per_layer[name] = z / weight.numel()
        zeros, total = zeros + z, total + weight.numel()
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer, "layers": len(modules)}

"""Pruning masks that survive fine-tuning, adapters and merging.

A pruned linear layer carries a boolean buffer `llmk_mask` (not saved in
state dicts, so exported models stay plain Hugging Face models). Three things
keep the pruned weights at zero afterwards:

- `MaskKeeper` zeroes their gradients and re-applies the masks after every
  optimiser step (full fine-tuning, top layers, BitFit...);
- `masked_update_forward` makes a low-rank update obey the mask, (W + BA) * M,
  so the model trained is exactly the model obtained after merging; each
  strategy applies it to its own layers (`peft/lora.py`, `peft/adalora.py`);
- the same masked update in peft's merge (`mask_merged_updates`), so the merged
  model has its zeros without re-masking: sparsity after merging is measured,
  not imposed.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from llmk_lab.errors import UserError
from llmk_lab.quantized_base import dequantized, dequantized_weight, is_4bit, is_4bit_weight

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
        self.model = model
        self.modules = list(masked_linears(model).values())

    def on_train_start(self, trainer, pl_module):
        # Only weights the optimiser can move need re-masking: with LoRA the pruned base is frozen, and
        # re-masking it every step would be a pass over every pruned matrix for nothing.
        self.modules = [m for m in masked_linears(self.model).values() if m.weight.requires_grad]

    def on_after_backward(self, trainer, pl_module):
        for module in self.modules:
            if module.weight.grad is not None:
                module.weight.grad.mul_(getattr(module, MASK))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for module in self.modules:
            with torch.no_grad():
                module.weight.mul_(getattr(module, MASK))


def _weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), the layout F.linear takes (transformers' Conv1D stores it as (in, out))."""
    base = layer.base_layer
    weight = dequantized_weight(base) if is_4bit(base) else base.weight  # QLoRA: the NF4 base, dequantised
    return weight.t() if layer.fan_in_fan_out else weight


def _dropout_active(layer: nn.Module, name: str) -> bool:
    dropout = layer.lora_dropout[name]
    return layer.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) > 0


def _factors(update_factors, layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    left, right, scale = update_factors(layer, name)
    if isinstance(scale, torch.Tensor):  # AdaLoRA divides by its rank, a tensor: fold it into R
        return left, right * scale, 1.0
    return left, right, scale


def masked_update_forward(update_factors: Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor, Any]]):
    """A forward for a peft low-rank layer whose update obeys the base layer's pruning mask, so the model
    trained is exactly the model that peft's (masked) merge exports.

    `update_factors(layer, adapter)` returns (L, R, s) with the update s L R, L (out, r), R (r, in).

    Cost per layer, in units of d_out x d_in x tokens multiply-adds: plain LoRA needs 2 (forward and
    the input gradient through the frozen W; its factors' products are r/d of that). Masking the update
    makes its gradient a full matrix, (G^T X) * M, before it is projected on the factors, so any exact
    formulation needs that third product. Without active dropout (evaluation, `dropout=0`) the layer
    is one matmul with W_eff = (W + s L R) * M, formed once per step (r/tokens of a unit) and reused by
    autograd for the input gradient: 3 units. peft's dropout applies to the update's input only,
    y = x W^T + dropout(x) ((s L R) * M)^T, which needs a second matmul each way: 5 units, exactly
    peft's training semantics. DoRA scales the rows of W_eff by m / ||W_eff|| (norm detached, as in
    peft and the paper), which is one more elementwise pass.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.lora_A]
        mask = getattr(self.base_layer, MASK)
        if self.fan_in_fan_out:
            mask = mask.t()
        magnitudes = getattr(self, "lora_magnitude_vector", None) or {}
        fusable = (len(names) == 1 and not _dropout_active(self, names[0]) and not args and not kwargs
                   and isinstance(getattr(self.base_layer, "weight", None), torch.Tensor))
        if fusable:
            name = names[0]
            left, right, scale = _factors(update_factors, self, name)
            weight = torch.addmm(_weight_out_in(self), left, right, alpha=scale) * mask
            bias = getattr(self.base_layer, "bias", None)
            if name not in magnitudes:
                return F.linear(x.to(weight.dtype), weight, bias)
            # DoRA: rows of W_eff rescaled to the learnt magnitudes m, ||W_eff|| held constant in backward.
            row_scale = magnitudes[name].weight / torch.linalg.norm(weight, dim=1).detach()
            out = F.linear(x.to(weight.dtype), weight) * row_scale
            return out + bias if bias is not None else out
        # Dropout on the update's input (peft's training semantics) or several adapters: base + updates.
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            left, right, scale = _factors(update_factors, self, name)
            update = (torch.mm(left, right) * scale) * mask
            if name in magnitudes:  # DoRA: diag(m / ||W + dW||) (W + dW) - W on the dropped-out input
                weight = _weight_out_in(self)
                effective = weight + update
                row_scale = magnitudes[name].weight / torch.linalg.norm(effective, dim=1).detach()
                update = effective * row_scale[:, None] - weight
            x_in = self.lora_dropout[name](x).to(update.dtype)
            result = result + F.linear(x_in, update).to(result.dtype)
        return result

    return forward


def _masked_delta_weight(self, adapter: str) -> torch.Tensor:
    """peft's merge adds `get_delta_weight(adapter)` to W; masked, W + dW * M = (W + dW) * M because the
    pruned W is already zero there, so the merged model is the one trained, with no re-masking after it."""
    delta = type(self).get_delta_weight(self, adapter)
    return delta * getattr(self.base_layer, MASK).to(delta.dtype)


def mask_merged_updates(module: nn.Module) -> None:
    """Make peft's merge of this low-rank layer obey its base layer's pruning mask."""
    module.get_delta_weight = types.MethodType(_masked_delta_weight, module)


def route_masked_updates(model: nn.Module, layer_type: type, masked_forward: Callable) -> int:
    """Route every `layer_type` adapter layer over a pruned base through `masked_forward` (from
    `masked_update_forward`) and the masked merge; returns how many layers. LoRA and AdaLoRA call it with
    their own layer type and update."""
    patched = 0
    for module in model.modules():
        if isinstance(module, layer_type) and hasattr(module.base_layer, MASK):
            module.forward = types.MethodType(masked_forward, module)
            mask_merged_updates(module)
            patched += 1
    return patched


# Next to a pruned run's adapter: the pruned base layers (weights as compressed, zeros included) and their masks.
PRUNED_BASE = "pruned_base.safetensors"


def _plain_name(name: str) -> str:
    """A module's name in the plain base model, without peft's wrapping (`base_model.model.`, `.base_layer`)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def save_pruned_base(model: nn.Module, directory) -> bool:
    """Write the pruned layers of `model`'s base (weights and masks) next to its adapter.

    The adapter was trained over the pruned base, not over the base anyone can download; with these layers
    (plain `load_state_dict` of the weights, or `load_pruned_base` with the masks) the base is that one
    again, and the adapter on it reproduces the run (`export.export_adapter` checks it; LoRA's masked update
    is no plain peft adapter, so a pruned LoRA run ships none). SparseGPT also changes the weights it keeps,
    so the masks alone would not do. Names are those of the plain model when `model` is (a PeftModel's
    `get_base_model()`). False when the model has no pruned layer."""
    from pathlib import Path

    from safetensors.torch import save_file

    # Quantised layers (int8 after fit) hold no float weight to save; the int8 model is not an adapter's base.
    masked = {n: m for n, m in masked_linears(model).items()
              if type(m.weight) in (torch.Tensor, nn.Parameter) and type(m.weight.data) is torch.Tensor}
    if not masked:
        return False
    tensors = {}
    for name, module in masked.items():
        plain = _plain_name(name)
        tensors[f"{plain}.weight"] = module.weight.detach().cpu().contiguous()
        tensors[f"{plain}.{MASK}"] = getattr(module, MASK).cpu().contiguous()
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(directory) / PRUNED_BASE))
    return True


@torch.no_grad()
def load_pruned_base(base_model: nn.Module, directory) -> nn.Module:
    """Put the pruned layers saved by `save_pruned_base` into a plain base model (the one the run loaded),
    masks included (so training on with llmk_lab keeps the zeros); then load the adapter onto it (peft:
    `PeftModel.from_pretrained`)."""
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / PRUNED_BASE))
    for key, weight in tensors.items():
        if not key.endswith(".weight"):
            continue
        name = key.removesuffix(".weight")
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{directory}: pruned layer {name!r} is not in {type(base_model).__name__}; load the "
                            "base model the run started from") from None
        module.weight.copy_(weight.to(module.weight.device, module.weight.dtype))
        set_mask(module, tensors[f"{name}.{MASK}"])
    return base_model


def is_packed_int8_linear(module: nn.Module) -> bool:
    """torch.ao's dynamic int8 Linear: it keeps its weight packed (`_packed_params`), outside `parameters()`,
    and hands it out through a `weight()` method."""
    return hasattr(module, "_packed_params") and callable(getattr(module, "weight", None))


def stored_values(tensor: torch.Tensor) -> torch.Tensor:
    """The values a (possibly quantised) weight stores, as a plain tensor: the int8 data of torchao's
    tensor subclasses (`qdata`) and of torch.ao quantised tensors (`int_repr`), the tensor itself otherwise.
    Quantisation is symmetric, so a pruned (zero) weight is a zero here too."""
    if getattr(tensor, "is_quantized", False):
        return tensor.int_repr()
    if is_4bit_weight(tensor):  # a QLoRA base: the NF4 values (NF4 has an exact zero)
        return dequantized(tensor)
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "qdata"):
        return tensor.qdata
    return tensor.detach()


def sparsity_report(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict:
    """Fraction of zero weights per layer and over all the given (default: masked) layers."""
    modules = masked_linears(model) if modules is None else modules

    per_layer, zeros, total = {}, 0, 0
    for name, module in modules.items():
        weight = stored_values(module.weight() if callable(module.weight) else module.weight)
        z = int((weight == 0).sum())
        per_layer[name] = z / weight.numel()
        zeros, total = zeros + z, total + weight.numel()
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer, "layers": len(modules)}

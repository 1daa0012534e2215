"""QLoRA's base (Dettmers et al. 2023): the frozen block linears stored in 4-bit NormalFloat with double
quantisation, computing in float; LoRA trains over it (`model.quantize_base=nf4`).

Through bitsandbytes (`bnb.nn.Linear4bit`, quant type nf4, blocks of 64 weights, the blocks' absmax
scales quantised again in blocks of 256: "double quantisation"), which runs on CPU and CUDA and which peft's
LoRA wraps natively. The conversion happens after the one-shot compression steps (they prune or drop float
weights; NF4 has an exact zero, so pruned weights stay zero in the 4-bit base) and before the PEFT strategy
wraps the model. Embeddings, norms and the LM head stay float, as in the paper.

Memory: the quantised linears take 4 bits a weight plus 8-bit scales per 64 weights plus one fp32 scale per
256 scales: 4 + 8/64 + 32/(64 x 256) = 4.127 bits, against 32 in fp32 (0.129x). `base_bytes` counts it.

The merged export of a QLoRA run is float: each LoRA layer's NF4 base dequantised plus its (masked) update,
what the run computed (`float_merge`); the adapter export names the NF4 base it was trained over.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llmk_lab.architectures import architecture, matching_modules
from llmk_lab.errors import UserError

NF4 = "nf4"
QUANTIZED_BASES = (NF4,)
BLOCK_SIZE = 64  # bitsandbytes' default for nf4, the paper's


def _bnb():
    import bitsandbytes  # heavy (CUDA probing): only runs that quantise their base import it

    return bitsandbytes


def is_4bit(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear (not peft's LoRA layer around one, which shares its class name)."""
    return type(layer).__module__.startswith("bitsandbytes") and type(layer).__name__ == "Linear4bit"


def check_device(accelerator: str) -> None:
    """bitsandbytes computes 4-bit layers on CPU and CUDA; refuse other devices before anything runs."""
    if accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise UserError(f"model.quantize_base=nf4 is not possible with hardware.accelerator={accelerator!r}: "
                        "bitsandbytes' 4-bit layers compute on cpu and cuda only")


def quantize_base(model: nn.Module, kind: str) -> dict:
    """Replace every linear layer of the transformer blocks by a frozen NF4 (double-quantised) layer, on the
    layer's device; returns what was done and the stored bytes of the base."""
    bnb = _bnb()
    layers = matching_modules(model, architecture(model).block_linears(), (nn.Linear,))
    narrow = [name for name, layer in layers.items() if layer.in_features < BLOCK_SIZE]
    if narrow:
        # bitsandbytes (0.50, CPU) scales a row shorter than a block with the wrong absmax: refuse, not misquantise.
        raise UserError(f"model.quantize_base={kind} needs block linears at least {BLOCK_SIZE} inputs wide (NF4 blocks "
                        f"are {BLOCK_SIZE} weights of a row); {narrow[0]} has {layers[narrow[0]].in_features}")
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, layer in layers.items():
        device = layer.weight.device
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=layer.weight.dtype, compress_statistics=True, quant_type=kind,
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(layer.weight.data.detach().to("cpu").contiguous(), requires_grad=False,
                                             blocksize=BLOCK_SIZE, compress_statistics=True, quant_type=kind,
                                             module=quantized).to(device)
        if layer.bias is not None:
            quantized.bias = nn.Parameter(layer.bias.data.detach().clone(), requires_grad=False)
        _carry_buffers(layer, quantized)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, quantized)
    return {"quantize_base": kind, "quantized_layers": len(layers), "block_size": BLOCK_SIZE,
            "double_quantization": True, "base_bytes": base_bytes(model), "base_bytes_float": float_bytes}


def quant_state_bytes(weight) -> int:
    """Bytes of a Params4bit: the packed codes, the (double-quantised) scales and their scales."""
    state = weight.quant_state
    total = weight.numel() * weight.element_size() + state.absmax.numel() * state.absmax.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += nested.absmax.numel() * nested.absmax.element_size() + nested.code.numel() * 4
    return total + state.code.numel() * state.code.element_size()


def base_bytes(model: nn.Module) -> int:
    """Stored bytes of the model's own weights (adapter weights excluded, tied weights once): 4-bit layers as
    packed codes and scales, the rest at their dtype."""
    total, seen = 0, set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or "lora_" in f"{module_name}.{name}":
                continue
            seen.add(id(param))
            total += (quant_state_bytes(param) if is_4bit(module) and name == "weight"
                      else param.numel() * param.element_size())
    return total


def is_4bit_weight(tensor) -> bool:
    return type(tensor).__name__ == "Params4bit" and getattr(tensor, "quant_state", None) is not None


def dequantized(weight) -> torch.Tensor:
    """The float (out, in) values a bitsandbytes 4-bit weight stands for."""
    return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state).to(weight.quant_state.dtype)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float (out, in) weight a 4-bit layer computes with."""
    return dequantized(layer.weight).to(layer.compute_dtype or torch.float32)


def float_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    _carry_buffers(layer, plain)
    return plain


def _carry_buffers(source: nn.Module, target: nn.Module) -> None:
    """A layer's own buffers (a pruning mask) go with it to its replacement."""
    for name, buffer in source.named_buffers(recurse=False):
        target.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)


@torch.no_grad()
def float_merge(model: nn.Module) -> nn.Module:
    """A plain float model from a (peft-wrapped) model over a 4-bit base: each LoRA layer becomes a float
    linear with its dequantised base plus its update (the masked one over pruned weights), every other 4-bit
    layer its dequantised weights. In place; returns the unwrapped model."""
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and is_4bit(base) and hasattr(module, "get_delta_weight"):
            weight = dequantized_weight(base)
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            _replace(model, name, float_linear(base, weight))
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            _replace(model, name, float_linear(module, dequantized_weight(module)))
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def has_4bit_base(model: nn.Module) -> bool:
    return any(is_4bit(m) for m in model.modules())


def quantize_base_refusal(kind: Optional[str], strategy, methods) -> Optional[str]:
    """Why a 4-bit base cannot go with this PEFT strategy or these compression methods, or None."""
    if kind is None:
        return None
    if not strategy.trains_over_4bit_base:
        return (f"model.quantize_base={kind} is not possible with peft.method={strategy.registered_name!r}: the "
                "4-bit base is frozen and only LoRA's update trains over it (QLoRA); use peft=lora")
    for method in methods:
        if method.quantizes_weights or method.prunes_while_training:
            return (f"model.quantize_base={kind} is not possible with compression.method={method.registered_name!r}: "
                    "it changes the base's weights after the base is stored in 4 bits; prune one-shot "
                    "(magnitude, wanda, sparsegpt, layer_drop) or quantise without a 4-bit base")
    return None

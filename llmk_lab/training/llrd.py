"""Layer-wise learning-rate decay (Howard & Ruder 2018, ULMFiT's discriminative fine-tuning; the
ELECTRA / BEiT recipe): the head trains at the base rate, block i of L (0 = nearest the input) at
base * decay^(L - i), and the embeddings, below every block, at base * decay^(L + 1).

A parameter's depth is the block whose module tree holds it, so whatever a PEFT strategy injects
into block i (LoRA matrices, adapters, IA3 vectors) gets block i's rate; trainable tensors outside
the blocks are input-side (embeddings, virtual prompt tokens) or head-side (pooler, classifier,
pooling weights, final norm)."""
from __future__ import annotations

from typing import Any

from torch import nn

from llmk_lab.architectures import transformer_blocks

# Parameter names below the blocks: the embeddings, and prompt/prefix tuning's virtual tokens (input-side).
INPUT_SIDE = ("embed", "prompt_encoder", "wte", "wpe")


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return transformer_blocks(model)


def parameter_depths(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> depth: 0 embeddings, 1..L blocks from the input up, L + 1 the head."""
    blocks = blocks_of(model)
    depth_of: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for param in block.parameters():
            depth_of[id(param)] = index + 1
    top = len(blocks) + 1
    for name, param in model.named_parameters():
        if id(param) not in depth_of:
            depth_of[id(param)] = 0 if any(key in name for key in INPUT_SIDE) else top
    return depth_of


def split_by_depth(model: nn.Module, groups: list[dict[str, Any]], base_lr: float, decay: float) -> list[dict[str, Any]]:
    """Each optimiser group split into one group per depth, with `lr` = base * decay^(L + 1 - depth)
    (the other keys, e.g. weight_decay, kept). Schedulers scale every group's own initial rate."""
    depth_of = parameter_depths(model)
    top = max(depth_of.values(), default=0)
    result: list[dict[str, Any]] = []
    for group in groups:
        by_depth: dict[int, list] = {}
        for param in group["params"]:
            by_depth.setdefault(depth_of[id(param)], []).append(param)
        for depth in sorted(by_depth):
            result.append({**group, "params": by_depth[depth], "lr": base_lr * decay ** (top - depth),
                           "depth": depth})
    return result

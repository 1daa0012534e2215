"""Model surgery: cut heads, feed-forward neurons and whole blocks out of a transformer for good.

These edits change shapes, not values, and keep a model its config describes, so `from_pretrained` reloads
the result: structured pruning and layer dropping call them after choosing what goes, and the pruned-BERT
model type calls `remove_heads` to rebuild its shapes before a checkpoint is loaded into it. Where a
family's projections and head attributes are comes from `llmk_lab.architectures`. `key` names the setting
that asked for the cut, for refusals.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmk_lab.architectures import Architecture


def drop_blocks(model: nn.Module, blocks: nn.ModuleList, drop: set[int]) -> None:
    """Remove the blocks at indices `drop` for good: the list renumbers (saved keys stay contiguous), the
    attention modules' cache positions follow, and the config describes the shorter stack, so
    `from_pretrained` reloads it."""
    for index in sorted(drop, reverse=True):
        del blocks[index]
    for index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index  # caches are indexed by position
    model.config.num_hidden_layers = len(blocks)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]


def sliced(linear: nn.Module, index: torch.Tensor, dim: int) -> nn.Module:
    """A smaller Linear (or transformers Conv1D) keeping `index` of its outputs (dim 0) or inputs (dim 1)."""
    conv1d = isinstance(linear, Conv1D)  # stores W^T: outputs are its columns
    weight = linear.weight.detach()
    weight = weight.index_select(1 - dim if conv1d else dim, index.to(weight.device)).clone()
    if conv1d:
        new = Conv1D(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    else:
        out_features, in_features = weight.shape
        new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                        device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.data.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _head_rows(heads: list[int], size: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])


def remove_heads(block: nn.Module, keep: list[int], arch: Architecture, key: str) -> None:
    """Keep only the query heads `keep` of a block's attention, and the key/value heads serving them."""
    attention = arch.attention(block, key)
    keep = sorted(keep)
    group = attention.heads // attention.kv_heads
    kv_keep = sorted({h // group for h in keep})
    rows, kv_rows = _head_rows(keep, attention.size), _head_rows(kv_keep, attention.size)
    for (parent, name), index in ((attention.q, rows), (attention.k, kv_rows), (attention.v, kv_rows)):
        setattr(parent, name, sliced(getattr(parent, name), index, 0))
    parent, name = attention.o
    setattr(parent, name, sliced(getattr(parent, name), rows, 1))
    layout = attention.layout
    for attr in layout.count:
        setattr(attention.module, attr, len(keep))
    for attr in layout.width:
        setattr(attention.module, attr, len(keep) * attention.size)
    if layout.groups:
        setattr(attention.module, layout.groups, len(keep) // len(kv_keep))


def remove_neurons(block: nn.Module, keep: torch.Tensor, arch: Architecture, key: str) -> None:
    ins, (out_parent, out_name) = arch.ffn(block, key)
    keep = keep.sort().values
    for parent, name in ins:
        setattr(parent, name, sliced(getattr(parent, name), keep, 0))
    setattr(out_parent, out_name, sliced(getattr(out_parent, out_name), keep, 1))

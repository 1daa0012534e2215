"""A BERT with fewer attention heads per layer: the model type structured head pruning saves.

Every layer keeps `attention_heads_kept` heads of `hidden_size /
num_attention_heads` each, so the shrunk model is described by its config. It
is saved as model type `llmk_pruned_bert`; `register()` (called by
`llmk_lab.models` before loading) tells transformers' Auto classes about it, so
`AutoModelFor*.from_pretrained` reloads it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, BertConfig, BertForMaskedLM, BertForSequenceClassification,
                          BertForTokenClassification, BertModel)
from transformers.pytorch_utils import Conv1D

PRUNED_BERT = "llmk_pruned_bert"


class PrunedBertConfig(BertConfig):
    """A BERT whose layers keep `attention_heads_kept` heads of `hidden_size / num_attention_heads` each."""
    model_type = PRUNED_BERT

    def __init__(self, attention_heads_kept: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.attention_heads_kept = attention_heads_kept


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


def remove_heads(block: nn.Module, keep: list[int]) -> None:
    """Keep only the heads `keep` of a BERT block's self-attention."""
    attention = block.attention.self
    size = attention.attention_head_size
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in sorted(keep)])
    for name in ("query", "key", "value"):
        setattr(attention, name, sliced(getattr(attention, name), index, 0))
    block.attention.output.dense = sliced(block.attention.output.dense, index, 1)
    attention.num_attention_heads = len(keep)
    attention.all_head_size = len(keep) * size


def _pruned_class(base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        if config.attention_heads_kept is not None:
            for block in self.base_model.encoder.layer:
                keep = list(range(config.attention_heads_kept))
                remove_heads(block, keep)  # shapes only: the checkpoint's weights are loaded afterwards

    return type(f"Pruned{base.__name__}", (base,), {"config_class": PrunedBertConfig, "__init__": __init__})


_registered = False


def register() -> None:
    """Make `llmk_pruned_bert` checkpoints loadable with transformers' Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(PRUNED_BERT, PrunedBertConfig, exist_ok=True)
    for auto, base in ((AutoModel, BertModel), (AutoModelForSequenceClassification, BertForSequenceClassification),
                       (AutoModelForTokenClassification, BertForTokenClassification),
                       (AutoModelForMaskedLM, BertForMaskedLM)):
        auto.register(PrunedBertConfig, _pruned_class(base), exist_ok=True)
    _registered = True


def pruned_config(config, heads_kept: int) -> PrunedBertConfig:
    """`config` (a BERT's) as a pruned BERT keeping `heads_kept` heads per layer."""
    register()
    fields = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    pruned = PrunedBertConfig(attention_heads_kept=heads_kept, **fields)
    pruned._attn_implementation = config._attn_implementation
    return pruned

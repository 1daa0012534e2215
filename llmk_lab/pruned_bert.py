"""A BERT with fewer attention heads per layer: the model type structured head pruning saves.

Every layer keeps `attention_heads_kept` heads of `hidden_size /
num_attention_heads` each, so the shrunk model is described by its config. It
is saved as model type `llmk_pruned_bert`; `register()` (called by
`llmk_lab.models` before loading) tells transformers' Auto classes about it, so
`AutoModelFor*.from_pretrained` reloads it.
"""
from __future__ import annotations

from typing import Optional

from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, BertConfig, BertForMaskedLM, BertForSequenceClassification,
                          BertForTokenClassification, BertModel)

from llmk_lab.architectures import architecture
from llmk_lab.surgery import remove_heads

PRUNED_BERT = "llmk_pruned_bert"


class PrunedBertConfig(BertConfig):
    """A BERT whose layers keep `attention_heads_kept` heads of `hidden_size / num_attention_heads` each."""
    model_type = PRUNED_BERT

    def __init__(self, attention_heads_kept: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.attention_heads_kept = attention_heads_kept


def _pruned_class(base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        if config.attention_heads_kept is not None:
            arch = architecture(self)
            keep = list(range(config.attention_heads_kept))
            for block in arch.blocks:
                remove_heads(block, keep, arch, PRUNED_BERT)  # shapes only: the checkpoint's weights are loaded afterwards

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

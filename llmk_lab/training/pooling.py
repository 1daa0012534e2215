"""Cross-layer pooling for the task head.

Two axes, each off by default (the model's own head):

- `train.layer_mix`: which layers feed the head. `last`; `last_k`, the last k layers' hidden states
  concatenated per token (BERT's feature-based recipe, Devlin et al. 2019, concatenated the last
  four); `scalar_mix`, ELMo's learned mix of every layer including the embeddings (Peters et al.
  2018, eq. 1): gamma * sum_j softmax(w)_j h_j.
- `train.pooling` (sequence tasks): how tokens become one vector: `cls` (the first real token's
  state, without BERT's pooler), `mean` / `max` over the non-padding tokens, `last_token` (the last
  non-padding token: decoders' convention).

The new head (mix weights, dropout, a linear classifier) is attached to the model after the PEFT
strategy, as the submodule `cross_layer_head`, so it trains under every strategy and lives in the
Lightning checkpoint. Forward hooks ask the model for its hidden states and replace `logits` and
`loss` with the new head's; the model's own classifier (and pooler), now unused, are frozen. A
pooled head is not part of any transformers class, so `export.merged` is refused and `model/` is
not written (its reload cannot reproduce the run); the adapter folder holds it only for strategies
that save every trained tensor.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from llmk_lab.errors import UserError

POOLINGS = ("model", "cls", "mean", "max", "last_token")
LAYER_MIXES = ("last", "last_k", "scalar_mix")
HEAD_NAME = "cross_layer_head"
# The model's own head modules, bypassed by the new head (BERT: pooler + classifier; decoders: score).
REPLACED = re.compile(r"(^|\.)(classifier|score|pooler|pre_classifier)(\.|$)")
ADAPTER_PARAM = re.compile(r"\.lora_(A|B|E|embedding_A|embedding_B|magnitude_vector)\.")


def enabled(train_cfg) -> bool:
    return train_cfg.pooling != "model" or train_cfg.layer_mix != "last"


class ScalarMix(nn.Module):
    """ELMo's task-specific weighting of layers: gamma * sum_j softmax(w)_j h_j (w = 0: the mean)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.scalars = nn.Parameter(torch.zeros(num_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.scalars, dim=0)

    def forward(self, layers: tuple[torch.Tensor, ...]) -> torch.Tensor:
        stacked = torch.stack(layers, dim=0)  # (layers, batch, tokens, hidden)
        return self.gamma * torch.einsum("l,lbth->bth", self.weights.to(stacked.dtype), stacked)


class CrossLayerHead(nn.Module):
    def __init__(self, hidden: int, num_layers: int, num_labels: int, pooling: str, layer_mix: str, k: int,
                 dropout: float, token_level: bool):
        super().__init__()
        self.pooling, self.layer_mix, self.k, self.token_level = pooling, layer_mix, k, token_level
        self.mix = ScalarMix(num_layers) if layer_mix == "scalar_mix" else None
        width = hidden * (k if layer_mix == "last_k" else 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_labels)

    def combine(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.layer_mix == "scalar_mix":
            return self.mix(hidden_states)
        if self.layer_mix == "last_k":
            return torch.cat(hidden_states[-self.k:], dim=-1)
        return hidden_states[-1]

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, width) -> (batch, width) over the tokens where mask is 1."""
        if self.pooling == "cls":
            return states[torch.arange(len(states)), mask.argmax(1)]  # first real token (after virtual ones)
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(states.dtype)
            return (states * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.pooling == "max":
            return states.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(states.dtype).min).max(1).values
        positions = torch.arange(states.shape[1], device=states.device)
        return states[torch.arange(len(states)), (mask * positions).argmax(1)]  # last_token

    def forward(self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.combine(hidden_states)
        if self.token_level:
            return self.classifier(self.dropout(states))
        return self.classifier(self.dropout(self.pool(states, attention_mask)))


def _mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The attention mask over the hidden states' positions, and how many leading positions are virtual
    tokens that a PEFT strategy (prompt tuning) put before the input."""
    batch, length = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=hidden.device), 0
    virtual = length - attention_mask.shape[1]
    if virtual:
        attention_mask = torch.cat([attention_mask.new_zeros(batch, virtual), attention_mask], dim=1)
    return attention_mask, virtual


def _ask_for_hidden_states(module, args, kwargs):
    kwargs["output_hidden_states"] = True
    return args, kwargs


def _replace_head_outputs(module, args, kwargs, output):
    head: CrossLayerHead = getattr(module, HEAD_NAME)
    hidden_states = output.hidden_states
    mask, virtual = _mask(hidden_states[-1], kwargs.get("attention_mask"))
    if head.token_level and virtual:  # score the real tokens only, aligned with the labels
        hidden_states, mask = tuple(h[:, virtual:] for h in hidden_states), mask[:, virtual:]
    # The model's own head stays in the graph with weight 0, so that whatever loss is computed from the
    # logits (smoothed, distilled) gives adapter matrices on it (LoRA on BERT's pooler) zero gradients
    # rather than none, which AdaLoRA's importance scores require.
    logits = head(hidden_states, mask) + 0.0 * output["logits"].sum()
    output["logits"] = logits
    labels = kwargs.get("labels")
    if labels is not None:
        output["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                         ignore_index=-100)
    return output


def attach(model: nn.Module, task, train_cfg) -> CrossLayerHead:
    """Give `model` (after its PEFT strategy) the cross-layer head the config asks for."""
    name = task.registered_name
    # The new head scores classes per sequence or per token with a cross-entropy loss of its own.
    if task.scores not in ("sequence", "token") or not task.loss_is_label_cross_entropy:
        raise UserError(f"train.pooling={train_cfg.pooling!r} / train.layer_mix={train_cfg.layer_mix!r} is for a "
                        "classification head (a class per sequence or per token, cross-entropy loss); task "
                        f"{name!r} has none (allowed: the defaults, model/last)")
    token_level = task.scores == "token"
    if token_level and train_cfg.pooling != "model":
        raise UserError(f"train.pooling={train_cfg.pooling!r} pools a sequence into one vector; token_classification "
                        "scores every token: leave train.pooling=model and choose the layers with train.layer_mix")
    if not token_level and train_cfg.pooling == "model":
        raise UserError(f"train.layer_mix={train_cfg.layer_mix!r} needs a token pooling for the new head: set "
                        f"train.pooling to one of {list(POOLINGS[1:])}")
    config = model.config
    layers = config.num_hidden_layers + 1  # the embeddings' output and every block's
    check_k = train_cfg.layer_mix != "last_k" or train_cfg.layer_mix_k <= layers
    if not check_k:
        raise UserError(f"train.layer_mix_k={train_cfg.layer_mix_k} is more than the model's {layers} hidden "
                        f"states; allowed: 1..{layers}")
    dropout = next((getattr(config, key) for key in ("classifier_dropout", "hidden_dropout_prob", "dropout")
                    if getattr(config, key, None) is not None), 0.1)
    reference = next(p for p in model.parameters())
    head = CrossLayerHead(config.hidden_size, layers, config.num_labels, train_cfg.pooling, train_cfg.layer_mix,
                          train_cfg.layer_mix_k, dropout, token_level).to(reference.device)
    for param_name, param in model.named_parameters():
        # Bypassed, its output replaced by the new head's (adapter matrices on it stay as the strategy set them).
        if REPLACED.search(param_name) and not ADAPTER_PARAM.search(param_name):
            param.requires_grad_(False)
    model.add_module(HEAD_NAME, head)
    model.register_forward_pre_hook(_ask_for_hidden_states, with_kwargs=True)
    model.register_forward_hook(_replace_head_outputs, with_kwargs=True)
    return head


def refusal(train_cfg, export_cfg) -> str | None:
    if enabled(train_cfg) and export_cfg.merged:
        return ("export.merged=true is not possible with a cross-layer head (train.pooling / train.layer_mix): "
                "transformers' classes have no such head, so a plain model would predict differently; the "
                "Lightning checkpoint holds it")
    return None

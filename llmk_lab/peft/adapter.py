"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-efficient transfer learning for NLP").

After the output projection of the attention block and of the feed-forward
block of every transformer layer, before the block's residual sum, an adapter
h -> h + W_up f(W_down h + b_down) + b_up is inserted. Both projections start
near zero (truncated normal, std 1e-2, as in the paper), so the adapted model
starts as the pretrained one. As in the paper, the layer norms of the blocks
train too (`train_layer_norms`).

Trainable parameters per adapter of width d and bottleneck b: 2 d b + b + d;
two adapters per layer; plus 2 d per trained LayerNorm (d for RMSNorm); plus
the task head.

Placement comes from the architecture map (`llmk_lab.architectures`): the
attention output and feed-forward output projections, e.g. BERT
`attention.output.dense` and `output.dense` (their outputs go through dropout,
the residual sum and LayerNorm), Llama `self_attn.o_proj` and `mlp.down_proj`
(their outputs are added to the residual stream). Not mergeable: f is nonlinear, so the adapter cannot be folded into W.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from llmk_lab.errors import UserError, check
from llmk_lab.architectures import LINEAR_TYPES, architecture, matching_modules, out_features
from llmk_lab.peft import (PEFT, PeftStrategy, head_parameter_names, load_trained_tensors, resolve_targets,
                           save_trained_tensors, train_only)

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}
ADAPTER = "bottleneck_adapter"


@dataclass
class AdapterConfig:
    method: str = "adapter"
    # Width of the bottleneck (the paper sweeps 8, 64, 256).
    bottleneck: int = 64
    # Nonlinearity between the projections: gelu | relu | tanh | silu.
    activation: str = "gelu"
    # Train the layer norms of the adapted blocks, as Houlsby et al. do.
    train_layer_norms: bool = True
    # Std of the truncated-normal initialisation of both projections ("near identity").
    init_std: float = 1e-2
    # Linears after which an adapter is placed: regex over module names or a list of name
    # suffixes (null: attention output and feed-forward output projection of every block).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check(self.bottleneck >= 1, "bottleneck", self.bottleneck, "an integer >= 1")
        # Names spelled out here: the light value check (before torch is imported) runs this method
        # without the module's globals, so it cannot read ACTIVATIONS.
        allowed = ("gelu", "relu", "silu", "tanh")
        check(self.activation in allowed, "activation", self.activation, f"one of {list(allowed)}")
        check(self.init_std > 0, "init_std", self.init_std, "a positive number")


class BottleneckAdapter(nn.Module):
    def __init__(self, width: int, bottleneck: int, activation: str, init_std: float):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, width)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


def _apply_adapter(module: nn.Module, inputs, output):
    # A forward hook rather than a wrapper module keeps the pretrained weights' names
    # (and the pruning masks on them) where they were; a module-level function keeps
    # deepcopy (used when exporting) pointing each copy at its own adapter.
    return getattr(module, ADAPTER)(output)


def insert_adapters(model: nn.Module, settings: AdapterConfig) -> list[str]:
    # Attention output and feed-forward output projection of every block, from the architecture map.
    default = architecture(model).adapter_sites() if settings.target_modules is None else None
    targets = resolve_targets(model, settings.target_modules, default=default, kinds=LINEAR_TYPES)
    sites = list(matching_modules(model, targets, LINEAR_TYPES).items())
    for _, linear in sites:
        if hasattr(linear, ADAPTER):
            raise UserError("peft=adapter: the model already has bottleneck adapters")
        adapter = BottleneckAdapter(out_features(linear), settings.bottleneck, settings.activation,
                                    settings.init_std).to(linear.weight.device, linear.weight.dtype)
        linear.add_module(ADAPTER, adapter)
        linear.register_forward_hook(_apply_adapter)
    return [name for name, _ in sites]


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the blocks' norms (BERT: post-sublayer LayerNorms; pre-norm decoders: the blocks' norms)."""
    norms = set(architecture(model).block_norm_names(model))
    return [f"{module_name}.{p}" for module_name, module in model.named_modules() if module_name in norms
            for p, _ in module.named_parameters(recurse=False)]


@PEFT.register("adapter", config=AdapterConfig)
class BottleneckAdapters(PeftStrategy):
    mergeable = False
    wraps_model = True
    finds_layers_by_role = True


    @property
    def target_modules(self) -> Optional[Any]:
        return self.settings.target_modules

    def apply(self, model, ctx):
        sites = insert_adapters(model, self.settings)
        trainable = {n for n, _ in model.named_parameters() if f".{ADAPTER}." in n}
        trainable |= set(head_parameter_names(model, ctx.task))
        if self.settings.train_layer_norms:
            trainable |= set(norm_parameter_names(model))
        train_only(model, trainable)
        ctx.reports["peft/adapter_sites"] = len(sites)
        return model

    def save_adapter(self, model, directory):
        return save_trained_tensors(model, directory, {"peft_type": "BOTTLENECK_ADAPTER",
                                                       **vars(self.settings)})

    def adapter_refusal(self, model):
        # The tensors reload only into a model that `load_adapter` has given the adapters first.
        return ("bottleneck adapters are llmk_lab modules (forward hooks on the output projections) that neither "
                "peft nor transformers rebuild; the Lightning checkpoint (export.checkpoint=true) holds them")


def load_adapter(model: nn.Module, directory, settings: AdapterConfig) -> nn.Module:
    """Rebuild a model exported by `peft=adapter`: the base model, adapters inserted, trained tensors loaded."""
    insert_adapters(model, settings)
    return load_trained_tensors(model, directory)

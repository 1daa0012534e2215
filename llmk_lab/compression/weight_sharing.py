"""Cross-layer parameter sharing (ALBERT, Lan et al. 2020), applied to a pretrained model.

The transformer blocks are split into sharing groups; every block of a group
uses the parameters of the group's first block (the same `nn.Parameter`
objects, so they are stored and trained once). `groups` lists the groups
explicitly (e.g. [[0, 1, 2], [3, 4, 5]]), or `group_size` makes consecutive
groups of that many blocks. ALBERT trains shared weights from scratch; starting
from a pretrained model, `init: mean` sets each shared weight to the mean of the
group's weights, `init: first` keeps the first block's. Blocks stay distinct
modules (only their parameters are shared), so per-layer state such as a
decoder's cache index is kept.

A shared weight trains once, but a per-block update on top of it (LoRA,
AdaLoRA, IA3) is different in every block: merging folds each block's update
into its own copy of the weight (`untie_shared_weights` first), never all of
them into the one shared tensor. A merged export therefore stores every block's
weights (transformers' format has no cross-layer sharing). No `adapter/` is
written: the base anyone loads with `from_pretrained` shares nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmk_lab.compression import COMPRESSION, CompressionMethod
from llmk_lab.compression.structured import transformer_blocks
from llmk_lab.errors import UserError, check


@dataclass
class WeightSharingConfig:
    method: str = "weight_sharing"
    # Blocks per sharing group, consecutive (ignored when `groups` is given); 0: all blocks share one set.
    group_size: int = 2
    # Explicit groups of block indices, e.g. [[0, 1, 2], [3, 4, 5]]; blocks in no group keep their own weights.
    groups: list[list[int]] = field(default_factory=list)
    # mean: shared weight = mean of the group's weights; first: the first block's weights.
    init: str = "mean"

    def __post_init__(self):
        check(self.group_size >= 0, "group_size", self.group_size, "an integer >= 0")
        check(self.init in ("mean", "first"), "init", self.init, "one of ['mean', 'first']")
        flat = [i for g in self.groups for i in g]
        check(len(flat) == len(set(flat)) and all(i >= 0 for i in flat), "groups", self.groups,
              "disjoint lists of layer indices >= 0")


def sharing_groups(settings: WeightSharingConfig, n_blocks: int) -> list[list[int]]:
    if settings.groups:
        groups = [sorted(g) for g in settings.groups if len(g) > 1]
        bad = sorted(i for g in groups for i in g if i >= n_blocks)
        if bad:
            raise UserError(f"compression.groups={settings.groups!r} names layers {bad} that do not exist; "
                            f"allowed: indices 0..{n_blocks - 1}")
        return groups
    size = settings.group_size or n_blocks
    return [list(range(i, min(i + size, n_blocks))) for i in range(0, n_blocks, size) if min(i + size, n_blocks) - i > 1]


def _set_parameter(root: nn.Module, name: str, param: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, param)


def untie_shared_weights(model: nn.Module, adapted_only: bool = False) -> int:
    """Give every module that shares a parameter with another module its own copy (the input/output word
    embeddings that transformers ties itself stay tied). With `adapted_only`, only the base layers of peft
    tuner layers, whose per-block updates a merge folds in. Returns how many parameters were copied."""
    tied_embedding = None
    if hasattr(model, "get_input_embeddings"):
        embeddings = model.get_input_embeddings()
        tied_embedding = getattr(embeddings, "weight", None)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for leaf, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, leaf))
    adapted = {id(m.base_layer) for m in model.modules() if isinstance(getattr(m, "base_layer", None), nn.Module)}
    copied = 0
    for places in owners.values():
        if len(places) < 2 or getattr(places[0][0], places[0][1]) is tied_embedding:
            continue
        for module, leaf in places[1:] if not adapted_only else places:
            if adapted_only and id(module) not in adapted:
                continue
            param = getattr(module, leaf)
            setattr(module, leaf, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            copied += 1
    return copied


@COMPRESSION.register("weight_sharing", config=WeightSharingConfig)
class WeightSharing(CompressionMethod):
    adapter_export_refusal = ("its blocks share one set of weights, and in the base from_pretrained loads each "
                              "block has its own (model/ holds the trained model, every block's weights stored)")

    @torch.no_grad()
    def before_fit(self, ctx) -> None:
        blocks = transformer_blocks(ctx.model)
        groups = sharing_groups(self.settings, len(blocks))
        if not groups:
            raise UserError(f"compression.group_size={self.settings.group_size} / compression.groups="
                            f"{self.settings.groups!r} share nothing in a {len(blocks)}-layer model; allowed: "
                            "groups of at least two layers")
        before = sum(p.numel() for p in ctx.model.parameters())
        for group in groups:
            leader = blocks[group[0]]
            for name, param in leader.named_parameters():
                if self.settings.init == "mean":
                    members = [dict(blocks[i].named_parameters())[name] for i in group]
                    param.copy_(torch.stack(members).mean(0))
                for i in group[1:]:
                    _set_parameter(blocks[i], name, param)
        after = sum(p.numel() for p in ctx.model.parameters())  # parameters() yields a shared tensor once
        self.report = {"groups": groups, "params_before": before, "params_after": after}

"""Structured pruning that really shrinks the model: attention heads, feed-forward neurons, whole layers.

- Heads (families whose attention-head layout the architecture map holds:
  BERT, Llama): importance is Michel et al. (2019)'s |dL/d gate| of a gate on
  each head's output (the output projection's input), summed over calibration
  batches (`importance: gradient`), or the L1 norm of the head's weights
  (`importance: l1`). The lowest `head_ratio` of the heads of every layer are
  cut out of the query/key/value rows and the output projection's columns.
  With grouped-query attention the key/value heads stay and each of them
  loses the same number of the query heads it serves (its lowest), so every
  group keeps one size.
- Neurons (feed-forward blocks of every family whose feed-forward input and
  output projections the architecture map knows): first-order Taylor importance
  |activation * gradient| (Molchanov et al. 2017) or the L1 norm of the
  neuron's in and out weights; the lowest `neuron_ratio` of each layer go.
- Layers: `drop_layers` is a list of block indices, or a count of top blocks
  to drop (top-layer dropping, Sajjad et al. 2020, is the strongest simple rule).

Every layer keeps the same number of heads and neurons, so the shrunk model is
described by its config: the feed-forward width (`intermediate_size` and its
per-family names), `num_hidden_layers` and a Llama's head counts are plain
transformers fields; a BERT with fewer heads per layer (head size unchanged) is
saved as model type `llmk_pruned_bert` (`llmk_lab/pruned_bert.py`), so
`AutoModelFor*.from_pretrained` reloads it. Where the blocks, their projections
and the attention modules' head attributes are comes from
`llmk_lab.architectures`: structured support for another family is its entry
there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmk_lab.architectures import (Architecture, architecture, head_parameter_names, out_features,  # noqa: F401
                                    transformer_blocks, weight_matrix)
from llmk_lab.compression import COMPRESSION, CompressionMethod
from llmk_lab.errors import UserError, check
from llmk_lab.pruned_bert import PRUNED_BERT, pruned_config
from llmk_lab.surgery import drop_blocks, remove_heads, remove_neurons

KEY = "compression.method=structured"

# Config builders of the model types named by `Heads.saved_as`: model type -> f(config, query heads kept).
SAVED_AS = {PRUNED_BERT: pruned_config}


@dataclass
class StructuredConfig:
    method: str = "structured"
    # Fraction of the attention heads removed from every layer (BERT, Llama), in [0, 1).
    head_ratio: float = 0.25
    # Fraction of the feed-forward neurons removed from every layer, in [0, 1).
    neuron_ratio: float = 0.25
    # Blocks to remove: a list of indices, or a count of top blocks.
    drop_layers: Any = field(default_factory=list)
    # gradient: Michel et al. head gates / Taylor neuron scores on calibration data; l1: weight norms.
    importance: str = "gradient"
    # Training examples used to score heads and neurons (importance: gradient).
    calibration_examples: int = 128
    calibration_batch_size: int = 16

    def __post_init__(self):
        check(0 <= self.head_ratio < 1, "head_ratio", self.head_ratio, "a number in [0, 1)")
        check(0 <= self.neuron_ratio < 1, "neuron_ratio", self.neuron_ratio, "a number in [0, 1)")
        check(self.importance in ("gradient", "l1"), "importance", self.importance, "one of ['gradient', 'l1']")
        check(self.calibration_examples >= 1, "calibration_examples", self.calibration_examples, "an integer >= 1")
        check(self.calibration_batch_size >= 1, "calibration_batch_size", self.calibration_batch_size,
              "an integer >= 1")
        if isinstance(self.drop_layers, int):
            check(self.drop_layers >= 0, "drop_layers", self.drop_layers, "a count >= 0 or a list of layer indices")
        else:
            check(all(isinstance(i, int) and i >= 0 for i in self.drop_layers), "drop_layers", self.drop_layers,
                  "a count >= 0 or a list of layer indices >= 0")


def head_pools(heads: int, kv_heads: int) -> int:
    """Size of the sets of heads each losing its lowest: the whole layer where every head has its own keys and
    values, the query heads sharing one key/value head under grouped-query attention."""
    return heads if kv_heads == heads else heads // kv_heads


def _ffn(block: nn.Module, arch: Architecture) -> tuple[list[tuple[nn.Module, str]], tuple[nn.Module, str]]:
    """(layers whose outputs are the neurons, layer whose inputs are the neurons) of a block."""
    return arch.ffn(block, KEY)


def head_l1(block: nn.Module, arch: Architecture) -> torch.Tensor:
    """L1 norm of each query head's weights: its query rows and output columns, and its key and value rows where
    it has its own (query heads sharing a key/value head are ranked among themselves: theirs adds the same to each)."""
    attention = arch.attention(block, KEY)
    heads, size = attention.heads, attention.size
    roles = ("q", "k", "v") if attention.kv_heads == heads else ("q",)
    score = sum(weight_matrix(attention.layer(role)).abs().reshape(heads, size, -1).sum((1, 2)) for role in roles)
    return score + weight_matrix(attention.layer("o")).abs().reshape(-1, heads, size).sum((0, 2))


def neuron_l1(block: nn.Module, arch: Architecture) -> torch.Tensor:
    ins, (out_parent, out_name) = _ffn(block, arch)
    score = sum(weight_matrix(getattr(parent, name)).abs().sum(1) for parent, name in ins)
    return score + weight_matrix(getattr(out_parent, out_name)).abs().sum(0)


def gradient_importance(model: nn.Module, blocks: nn.ModuleList, batches: list[dict], heads: bool,
                        neurons: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Michel et al. head importance |dL/dgate| and Taylor neuron importance |a * dL/da|, summed over batches."""
    arch = architecture(model)
    head_scores = [None] * len(blocks)
    neuron_scores = [None] * len(blocks)
    hooks, gates = [], []
    device = next(model.parameters()).device
    for i, block in enumerate(blocks):
        if heads:
            attention = arch.attention(block, KEY)
            gate = torch.ones(attention.heads, device=device, requires_grad=True)
            gates.append(gate)

            # The output projection's input is the heads' outputs side by side: gating it gates each head.
            def gated(module, args, gate=gate):
                context = args[0]
                shape = context.shape
                context = (context.view(*shape[:-1], gate.numel(), -1) * gate[:, None]).view(shape)
                return (context, *args[1:])

            hooks.append(attention.layer("o").register_forward_pre_hook(gated))
        if neurons:
            _, (out_parent, out_name) = _ffn(block, arch)

            def taylor(module, args, i=i):
                activation = args[0]
                activation.retain_grad()
                module._llmk_activation = activation

            hooks.append(getattr(out_parent, out_name).register_forward_pre_hook(taylor))
    was_training = model.training
    model.eval()  # no dropout: importance of the deterministic network
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            for i, block in enumerate(blocks):
                if heads:
                    g = gates[i].grad.abs().detach().clone()
                    head_scores[i] = g if head_scores[i] is None else head_scores[i] + g
                    gates[i].grad = None
                if neurons:
                    _, (out_parent, out_name) = _ffn(block, arch)
                    down = getattr(out_parent, out_name)
                    a = down._llmk_activation
                    s = (a * a.grad).abs().flatten(0, -2).sum(0).detach()
                    neuron_scores[i] = s if neuron_scores[i] is None else neuron_scores[i] + s
                    del down._llmk_activation
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return head_scores, neuron_scores


# L-BFGS iterations fitting the task head before gradient importance is scored, and its L2 penalty (which makes
# a linear head's fit a strictly convex problem: one optimum, whatever the head's random initialisation).
HEAD_FIT_ITERATIONS = 30
HEAD_FIT_L2 = 1e-3


def with_fitted_head(model: nn.Module, task, batches: list[dict]) -> nn.Module:
    """A copy of `model` whose task head is fitted to the calibration batches, the rest frozen.

    Gradient importance is |dL/d gate| of the task loss; with a newly initialised head that loss, and so which
    heads and neurons look important, depends on the head's random seed. Fitting the head first (as a linear
    probe, to its optimum) scores the pretrained body by what it offers the task."""
    import copy

    scorer = copy.deepcopy(model)
    head = set(head_parameter_names(scorer, task))
    params = [p for n, p in scorer.named_parameters() if n in head]
    for name, param in scorer.named_parameters():
        param.requires_grad_(name in head)
    device = next(scorer.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    was_training = scorer.training
    scorer.eval()  # no dropout: a deterministic objective
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=HEAD_FIT_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = sum(scorer(**b).loss for b in batches) / len(batches)
        loss = loss + HEAD_FIT_L2 * sum(p.pow(2).sum() for p in params)
        loss.backward()
        return loss

    optimizer.step(closure)
    for param in scorer.parameters():  # importance needs gradients through the whole body
        param.requires_grad_(True)
    scorer.zero_grad(set_to_none=True)
    scorer.train(was_training)
    return scorer


@COMPRESSION.register("structured", config=StructuredConfig)
class StructuredPruning(CompressionMethod):
    adapter_export_refusal = ("it removes heads, feed-forward neurons or blocks, so the adapter fits a smaller model "
                              "than the base from_pretrained loads (model/ holds the shrunk model)")

    def refusal_with(self, strategy):
        if self.settings.head_ratio > 0 and strategy.shapes_keys_by_head_count:
            return (f"peft.method={strategy.registered_name!r} shapes its virtual keys and values by the model's full "
                    "head count, and "
                    "compression.head_ratio>0 removes heads; use compression.head_ratio=0 or another peft method")
        return None

    def check_model(self, model) -> None:
        arch = architecture(model)
        self._layers_to_drop(len(arch.blocks))
        if self.settings.head_ratio > 0:
            self._heads_to_remove(arch)
        if self.settings.neuron_ratio > 0:
            _ffn(arch.blocks[0], arch)

    def _heads_to_remove(self, arch):
        """(the attention layout, heads per pool of query heads sharing a key/value head, how many to remove)."""
        ratio = self.settings.head_ratio
        attention = arch.attention(arch.blocks[0], f"compression.head_ratio={ratio}")
        heads, kv_heads = attention.heads, attention.kv_heads
        pool = head_pools(heads, kv_heads)
        removed = round(ratio * pool)
        if removed >= pool:
            which = (f"{heads} heads of every layer" if pool == heads else
                     f"{pool} query heads sharing each of the {kv_heads} key/value heads of every layer")
            raise UserError(f"compression.head_ratio={ratio} would remove all {which}; allowed: a ratio "
                            f"below {(pool - 0.5) / pool:.3f}")
        return attention, pool, removed

    def before_fit(self, ctx) -> None:
        s = self.settings
        model = ctx.model
        arch = architecture(model)
        blocks = arch.blocks
        n_blocks = len(blocks)
        drop = self._layers_to_drop(n_blocks)
        report: dict[str, Any] = {"layers_before": n_blocks}
        params_before = sum(p.numel() for p in model.parameters())
        if s.head_ratio > 0:
            attention, pool, removed = self._heads_to_remove(arch)
            heads, kv_heads = attention.heads, attention.kv_heads

        head_scores = neuron_scores = None
        if s.importance == "gradient" and (s.head_ratio > 0 or s.neuron_ratio > 0):
            batches = ctx.datamodule.calibration_batches(s.calibration_examples, s.calibration_batch_size)
            scorer = with_fitted_head(model, ctx.task, batches)
            head_scores, neuron_scores = gradient_importance(scorer, transformer_blocks(scorer), batches,
                                                             s.head_ratio > 0, s.neuron_ratio > 0)
            del scorer
            report["importance_scored_with"] = (f"a copy of the model whose task head was first fitted on the "
                                                     f"calibration batches ({HEAD_FIT_ITERATIONS} L-BFGS "
                                                     "iterations, the rest frozen)")
        with torch.no_grad():
            if s.head_ratio > 0:
                kept = (pool - removed) * (heads // pool)
                report["heads_removed"] = {}
                for i, block in enumerate(blocks):
                    score = head_scores[i] if head_scores is not None else head_l1(block, arch)
                    keep = sorted(start + h for start in range(0, heads, pool)
                                  for h in score[start:start + pool].topk(pool - removed).indices.tolist())
                    report["heads_removed"][str(i)] = sorted(set(range(heads)) - set(keep))
                    remove_heads(block, keep, arch, KEY)
                self._record_heads(model, attention, kept, kv_heads if pool < heads else kept)
            if s.neuron_ratio > 0:
                ins, _ = _ffn(blocks[0], arch)
                width = out_features(getattr(*ins[0]))
                kept_neurons = width - round(s.neuron_ratio * width)
                for i, block in enumerate(blocks):
                    score = neuron_scores[i] if neuron_scores is not None else neuron_l1(block, arch)
                    remove_neurons(block, score.topk(kept_neurons).indices, arch, KEY)
                setattr(model.config, arch.family.ffn_width_key, kept_neurons)
                report["neurons_per_layer"] = [width, kept_neurons]
        if drop:
            drop_blocks(model, blocks, drop)
            report["layers_dropped"] = sorted(drop)
        report["params_before"] = params_before
        report["params_after"] = sum(p.numel() for p in model.parameters())
        self.report = report

    @staticmethod
    def _record_heads(model: nn.Module, attention, kept: int, kv_kept: int) -> None:
        """Describe the heads kept in the config, so the saved model reloads with its smaller attention."""
        layout = attention.layout
        if layout.saved_as:
            config = SAVED_AS[layout.saved_as](model.config, kept)
            model.config = config
            for module in model.modules():
                if getattr(module, "config", None) is not None and module is not model:
                    module.config = config
            return
        setattr(model.config, layout.count_key, kept)
        if layout.kv_count_key:
            setattr(model.config, layout.kv_count_key, kv_kept)
        if layout.size_key:
            setattr(model.config, layout.size_key, attention.size)

    def _layers_to_drop(self, n_blocks: int) -> set[int]:
        value = self.settings.drop_layers
        drop = set(range(n_blocks - value, n_blocks)) if isinstance(value, int) else set(value)
        if isinstance(value, int) and value >= n_blocks or len(drop) >= n_blocks:
            raise UserError(f"compression.drop_layers={value!r} would remove every one of the model's {n_blocks} "
                            "layers; allowed: fewer layers than the model has")
        out_of_range = sorted(i for i in drop if i >= n_blocks)
        if out_of_range:
            raise UserError(f"compression.drop_layers={value!r} names layers {out_of_range} that do not exist; "
                            f"allowed: indices 0..{n_blocks - 1}")
        return drop

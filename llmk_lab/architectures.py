"""Where things are inside a transformers model: the one module that knows model families.

Compression, PEFT, calibration and structured pruning ask this module for a
model's transformer blocks, the roles of the linear layers inside a block
(attention q/k/v/o, feed-forward in/out), the blocks' norms, the layout of
the attention heads, the pooler and extra head modules, and the default sites
of every method. Nothing else in the package names a model type or walks a
family's attribute paths.

Most families need no entry. The block stack is discovered from structure: the
largest `nn.ModuleList` whose items are all of one class and hold linear
layers (`nn.Linear` or transformers' `Conv1D`). Roles are read from the
conventional leaf names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
`up_proj`, `down_proj`: Llama, Mistral, Qwen2, Gemma, ...). `FAMILIES` names
the roles only where those conventions do not apply (BERT's two `dense`
layers, GPT-2's `c_proj` serving attention and feed-forward, fused
projections). When discovery cannot decide, the error names `model.blocks`
and lists the candidates.

Pruning code works on weights as (out_features, in_features) matrices;
`weight_matrix` and `to_weight_layout` hide that transformers' `Conv1D`
(GPT-2) stores the transpose.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from llmk_lab.errors import UserError

# Layer types that compute x W^T + b: what pruning and low-rank updates act on.
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)

# Attribute on a model instance pinning its block list (`model.blocks`), set when it is loaded.
BLOCKS_ATTRIBUTE = "_llmk_blocks"


@dataclass(frozen=True)
class Heads:
    """How a family's attention heads sit in a block, for cutting whole heads out of it.

    Query head h is rows h*size..(h+1)*size-1 of the query projection and the same columns of
    the output projection; key/value head j is those rows of the key and value projections and
    serves query heads j*g..(j+1)*g-1, g = query heads / key-value heads (transformers'
    `repeat_kv`; g = 1 without grouped-query attention). Head counts are read off the
    projections' widths; the attributes named here are the ones the attention module's forward
    reads or reports, rewritten after a cut."""

    # The attention module of a block (relative to the block) holding the attributes below.
    module: str
    # Its attribute holding the size of one head (unchanged by a cut).
    size: str
    # Its attributes holding the number of query heads kept, and that number times the head size.
    count: tuple[str, ...] = ()
    width: tuple[str, ...] = ()
    # Its attribute holding query heads per key/value head (grouped-query attention).
    groups: Optional[str] = None
    # Model type whose config records the heads kept, for a family whose own config cannot (a BERT's
    # head size is hidden_size / num_attention_heads): `llmk_lab.compression.structured.SAVED_AS`
    # builds it. None: the config keys below are rewritten in place.
    saved_as: Optional[str] = None
    count_key: str = "num_attention_heads"
    kv_count_key: Optional[str] = None
    size_key: Optional[str] = None


@dataclass(frozen=True)
class Family:
    """The roles of a family's modules. Block roles are dotted names relative to one block."""

    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    o: Optional[str] = None
    # One projection computing queries, keys and values together (GPT-2 `c_attn`, Phi-3 `qkv_proj`).
    qkv: Optional[str] = None
    # Feed-forward projections whose outputs are the hidden neurons (gate and up, or the one input layer).
    ffn_in: tuple[str, ...] = ()
    # Feed-forward projection reading the hidden neurons (down).
    ffn_out: Optional[str] = None
    # Whether `ffn_in` is one matrix holding gate and up side by side (Phi-3 `gate_up_proj`).
    fused_ffn_in: bool = False
    # Norms inside a block (BERT: post-sublayer LayerNorms; pre-norm decoders: the blocks' own norms).
    norms: tuple[str, ...] = ()
    # Modules between the blocks and the task head (module-name suffixes): BERT's pooler.
    pooler: tuple[str, ...] = ()
    # Top-level modules that are newly initialised with a task head besides the task's own
    # head modules (DistilBERT's `pre_classifier`): trained by every PEFT strategy.
    head: tuple[str, ...] = ()
    # Config key holding the feed-forward width (structured neuron pruning rewrites it).
    ffn_width_key: str = "intermediate_size"
    # The attention-head layout, where heads can be cut out of the block (None: head removal is refused).
    heads: Optional[Heads] = None


BERT = Family(q="attention.self.query", k="attention.self.key", v="attention.self.value",
              o="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
              norms=("attention.output.LayerNorm", "output.LayerNorm"), pooler=("pooler.dense",),
              heads=Heads(module="attention.self", size="attention_head_size", count=("num_attention_heads",),
                          width=("all_head_size",), saved_as="llmk_pruned_bert"))
LLAMA = Family(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
               ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
               norms=("input_layernorm", "post_attention_layernorm"),
               # LlamaConfig takes head_dim apart from hidden_size / num_attention_heads: a plain llama reloads.
               heads=Heads(module="self_attn", size="head_dim", groups="num_key_value_groups",
                           kv_count_key="num_key_value_heads", size_key="head_dim"))

FAMILIES: dict[str, Family] = {
    "bert": BERT,
    # RoBERTa's blocks are BERT's; its classifier has its own dense layer, so no pooler is
    # adapted, and a RoBERTa with fewer heads is not a BERT, so heads are not removed.
    "roberta": replace(BERT, heads=None),
    # A BERT whose attention heads were pruned (llmk_lab.pruned_bert).
    "llmk_pruned_bert": BERT,
    "distilbert": Family(q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin",
                         ffn_in=("ffn.lin1",), ffn_out="ffn.lin2", norms=("sa_layer_norm", "output_layer_norm"),
                         head=("pre_classifier",), ffn_width_key="hidden_dim"),
    "gpt2": Family(qkv="attn.c_attn", o="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj",
                   norms=("ln_1", "ln_2"), ffn_width_key="n_inner"),
    "llama": LLAMA,
    "phi3": Family(qkv="self_attn.qkv_proj", o="self_attn.o_proj", ffn_in=("mlp.gate_up_proj",),
                   ffn_out="mlp.down_proj", fused_ffn_in=True, norms=("input_layernorm", "post_attention_layernorm")),
}

# Leaf names of each role in families without an entry (Llama-style decoders and most others).
CONVENTIONS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "q_lin", "wq"),
    "k": ("k_proj", "key", "k_lin", "wk"),
    "v": ("v_proj", "value", "v_lin", "wv"),
    "o": ("o_proj", "out_proj", "out_lin", "wo"),
    "qkv": ("qkv_proj", "query_key_value", "Wqkv", "c_attn"),
    "ffn_in": ("gate_proj", "up_proj", "w1", "w3", "fc1"),
    "ffn_out": ("down_proj", "w2", "fc2"),
}


@dataclass
class Architecture:
    """One model's layout: its block list and the roles inside a block, as names."""

    model_type: Optional[str]
    blocks_path: str  # name of the block list inside the model given, e.g. "model.layers"
    blocks: nn.ModuleList
    linears: tuple[str, ...]  # every Linear/Conv1D of a block, relative to the block
    family: Family
    known: bool  # the family has an entry in FAMILIES
    above: tuple[str, ...] = field(default=())  # full names of the final norm(s) next to the block list

    # ------------------------------------------------------------------ names

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}." if self.blocks_path else f"{index}."

    def pattern(self, relative: list[str] | tuple[str, ...]) -> str:
        """Regex (peft's and compression's `target_modules` form) matching `relative` in every block,
        also under a wrapper that prefixes the names (peft's `base_model.model.`)."""
        if not relative:
            raise ValueError("no names to match")
        blocks = re.escape(self.blocks_path)
        lead = f"(?:.*\\.)?{blocks}\\." if self.blocks_path else "(?:.*\\.)?"
        return f"{lead}\\d+\\.(?:{'|'.join(re.escape(r) for r in relative)})"

    def role(self, role: str, purpose: str, key: str) -> Any:
        """A block role's name(s); a refusal naming `key` when this family has none."""
        value = getattr(self.family, role)
        if not value:
            where = "" if self.known else " (found by its conventional names; none matched)"
            raise UserError(f"{key}: {purpose} needs the {ROLE_WORDS[role]} of each block, and "
                            f"{self.describe()} has none{where}; set {key} to the block linears to use, "
                            f"among {list(self.linears)}")
        return value

    def describe(self) -> str:
        return f"model type {self.model_type!r}" if self.model_type else "this model"

    # ------------------------------------------------------------------ defaults

    def block_linears(self) -> str:
        """Default of pruning, quantisation and low-rank methods: every linear layer inside the blocks."""
        return self.pattern(self.linears)

    def low_rank_update_targets(self, model: nn.Module) -> str:
        """Default of LoRA and AdaLoRA: the block linears, plus the pooler where the model has one.

        Sequence classifiers read BERT's pooled [CLS] vector, and sentence-embedding checkpoints
        such as all-MiniLM-L6-v2 never trained the pooler on their last objective: on the default
        run adapting it moved test accuracy from 0.805 to 0.820."""
        blocks = self.block_linears()
        poolers = [name for name, _ in model.named_modules()
                   if any(name == p or name.endswith("." + p) for p in self.family.pooler)]
        if not poolers:
            return blocks
        return f"(?:{blocks})|(?:{'|'.join(re.escape(p) for p in poolers)})"

    def ia3_targets(self, key: str = "peft.target_modules") -> tuple[str, str]:
        """(targets, feed-forward subset) of IA3: keys, values and the feed-forward down-projection,
        whose input is scaled (Liu et al. 2022)."""
        if self.family.qkv and not (self.family.k and self.family.v):
            raise UserError(f"{key}: peft=ia3 scales keys and values, and {self.describe()} computes them in one "
                            f"fused projection ({self.family.qkv!r}); set {key} (and peft.feedforward_modules) "
                            f"among {list(self.linears)}")
        k = self.role("k", "peft=ia3", key)
        v = self.role("v", "peft=ia3", key)
        down = self.role("ffn_out", "peft=ia3", key)
        return self.pattern([k, v, down]), self.pattern([down])

    def adapter_sites(self, key: str = "peft.target_modules") -> str:
        """Houlsby adapters: after the attention output and the feed-forward output projections."""
        return self.pattern([self.role("o", "peft=adapter", key), self.role("ffn_out", "peft=adapter", key)])

    def block_norm_names(self, model: nn.Module) -> list[str]:
        """Full names of the norms inside the blocks (trained with Houlsby adapters)."""
        if not self.family.norms:
            return []
        match = name_matcher(self.pattern(self.family.norms))
        return [name for name, _ in model.named_modules() if match(name)]

    def above_blocks(self, model: nn.Module) -> list[str]:
        """Modules between the last block and the head: the final norm next to the block list, the pooler."""
        poolers = [name for name, _ in model.named_modules()
                   if any(name == p or name.endswith("." + p) for p in self.family.pooler)]
        return list(self.above) + poolers

    def ffn(self, block: nn.Module, key: str) -> tuple[list[tuple[nn.Module, str]], tuple[nn.Module, str]]:
        """(layers whose outputs are the neurons, layer whose inputs are they) of one block, as (parent, attr)."""
        ins = self.role("ffn_in", "neuron pruning", key)
        out = self.role("ffn_out", "neuron pruning", key)
        if self.family.fused_ffn_in:
            raise UserError(f"{key}: neuron pruning needs separate feed-forward input projections, and "
                            f"{self.describe()} fuses them ({ins[0]!r}); use drop_layers instead")
        return [_parent_and_attr(block, name) for name in ins], _parent_and_attr(block, out)

    def attention(self, block: nn.Module, key: str) -> "AttentionHeads":
        """One block's attention as head removal sees it; a refusal naming `key` where the family's
        head layout is not in the map or its projections do not allow a cut."""
        layout = self.family.heads
        if layout is None:
            raise UserError(f"{key}: head removal needs the attention-head layout of {self.describe()} (a `heads` "
                            "entry of its family in llmk_lab.architectures.FAMILIES), and it has none; use "
                            "compression.head_ratio=0 (neuron_ratio and drop_layers need no head layout)")
        names = [getattr(self.family, r) for r in ("q", "k", "v", "o")]
        if not all(names):
            raise UserError(f"{key}: head removal needs separate query, key, value and output projections, and "
                            f"{self.describe()} has {dict(zip('qkvo', names))}; use compression.head_ratio=0")
        q, k, v, o = (_parent_and_attr(block, name) for name in names)
        module = block.get_submodule(layout.module)
        size = int(getattr(module, layout.size))
        heads, kv_heads = out_features(getattr(*q)) // size, out_features(getattr(*k)) // size
        if heads < 1 or kv_heads < 1 or heads % kv_heads or out_features(getattr(*v)) != kv_heads * size:
            raise UserError(f"{key}: head removal expects {heads} query heads of size {size} grouped over the "
                            f"key/value heads of {self.describe()}, and its projections are "
                            f"{[out_features(getattr(*p)) for p in (q, k, v)]} wide")
        return AttentionHeads(module=module, layout=layout, q=q, k=k, v=v, o=o, size=size, heads=heads,
                              kv_heads=kv_heads)


@dataclass
class AttentionHeads:
    """One block's attention: its module, its projections as (parent, attribute), the head size and counts."""

    module: nn.Module
    layout: Heads
    q: tuple[nn.Module, str]
    k: tuple[nn.Module, str]
    v: tuple[nn.Module, str]
    o: tuple[nn.Module, str]
    size: int
    heads: int
    kv_heads: int

    def layer(self, role: str) -> nn.Module:
        return getattr(*getattr(self, role))


ROLE_WORDS = {"q": "query projection", "k": "key projection", "v": "value projection",
              "o": "attention output projection", "qkv": "fused query/key/value projection",
              "ffn_in": "feed-forward input projection", "ffn_out": "feed-forward output projection"}


def _parent_and_attr(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *parents, attr = dotted.split(".")
    module = root
    for part in parents:
        module = getattr(module, part)
    return module, attr


def _model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def _linear_names(block: nn.Module) -> tuple[str, ...]:
    """Every Linear/Conv1D of a block; a peft-wrapped layer counts once, by its own name (not its
    `base_layer` nor its adapter's small linears)."""
    names: list[str] = []
    wrapped: list[str] = []
    for name, m in block.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(getattr(m, "base_layer", None), LINEAR_TYPES):
            wrapped.append(name)
            names.append(name)
        elif isinstance(m, LINEAR_TYPES):
            names.append(name)
    return tuple(names)


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList, int]]:
    """Module lists of identical blocks holding linear layers: (name, list, parameter count)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1 or not _linear_names(module[0]):
            continue
        found.append((name, module, sum(p.numel() for p in module.parameters())))
    # A list nested inside another candidate's blocks (mixture-of-experts) is not the stack.
    outer = [c for c in found if not any(c[0].startswith(o[0] + ".") for o in found if o is not c and o[0])]
    return sorted(outer, key=lambda c: -c[2])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    pinned = getattr(model, BLOCKS_ATTRIBUTE, None)
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    if pinned:
        hits = [n for n in lists if n == pinned or n.endswith("." + pinned)]
        if len(hits) != 1:
            raise UserError(f"model.blocks={pinned!r} names no module list of {type(model).__name__}; "
                            f"module lists: {sorted(lists)}")
        return hits[0], lists[hits[0]]
    candidates = _candidates(model)
    if not candidates:
        raise UserError(f"model.blocks: found no list of identical blocks with linear layers in "
                        f"{type(model).__name__}; set model.blocks to the module list of its transformer blocks "
                        f"(module lists: {sorted(lists) or 'none'})")
    # The stack holds most of the weights; two lists of similar size (an encoder and a
    # decoder) cannot be told apart from structure.
    if len(candidates) > 1 and candidates[1][2] * 2 > candidates[0][2]:
        raise UserError(f"model.blocks: cannot tell which module list holds the transformer blocks of "
                        f"{type(model).__name__}; set model.blocks to one of {[c[0] for c in candidates]}")
    return candidates[0][0], candidates[0][1]


def _discover_family(linears: tuple[str, ...], block: nn.Module) -> Family:
    """Roles from conventional leaf names; a role whose names are missing or ambiguous stays empty."""
    by_leaf: dict[str, list[str]] = {}
    for name in linears:
        by_leaf.setdefault(name.split(".")[-1], []).append(name)

    def single(role: str) -> Optional[str]:
        hits = [n for leaf in CONVENTIONS[role] for n in by_leaf.get(leaf, [])]
        return hits[0] if len(hits) == 1 else None

    ffn_in = tuple(n for leaf in CONVENTIONS["ffn_in"] for n in by_leaf.get(leaf, []))
    norms = tuple(name for name, m in block.named_children()
                  if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("Norm", "LayerNorm")))
    return Family(q=single("q"), k=single("k"), v=single("v"), o=single("o"), qkv=single("qkv"),
                  ffn_in=ffn_in, ffn_out=single("ffn_out"), norms=norms)


def architecture(model: nn.Module) -> Architecture:
    """The layout of `model` (a transformers model, possibly wrapped by peft)."""
    model_type = _model_type(model)
    blocks_path, blocks = find_blocks(model)
    block = blocks[0]
    linears = _linear_names(block)
    known = model_type in FAMILIES
    family = FAMILIES[model_type] if known else _discover_family(linears, block)
    if known:
        declared = [n for n in (family.q, family.k, family.v, family.o, family.qkv, family.ffn_out, *family.ffn_in)
                    if n]
        missing = [n for n in declared if n not in linears]
        if missing:
            raise UserError(f"model.blocks: the blocks at {blocks_path!r} of {type(model).__name__} have no "
                            f"{missing[0]!r} (model type {model_type!r} expects it); set model.blocks to the "
                            "module list of its transformer blocks")
    parent_path, _, leaf = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    above = tuple(f"{parent_path}.{n}" if parent_path else n for n, m in parent.named_children()
                  if n != leaf and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("Norm")))
    return Architecture(model_type=model_type, blocks_path=blocks_path, blocks=blocks, linears=linears,
                        family=family, known=known, above=above)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks."""
    return architecture(model).blocks


def pin_blocks(model: nn.Module, blocks: Optional[str]) -> None:
    """Record `model.blocks` on the model instance, for models whose block list discovery cannot find."""
    if blocks:
        object.__setattr__(model, BLOCKS_ATTRIBUTE, blocks)
        find_blocks(model)  # a wrong name is refused at load time, in one line


def has_decoder_blocks(model: nn.Module) -> bool:
    """Whether the block stack is a decoder's (causal self-attention: Llama, GPT-2, Qwen, ...), not an
    encoder's (BERT): transformers maps the model type to a causal LM and not to a masked LM, or the
    config says it is a decoder (a BERT built as one)."""
    config = getattr(model, "config", None)
    model_type = _model_type(model)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return bool(getattr(config, "is_decoder", False)) or (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                                          and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def head_modules(model: nn.Module, task_heads: tuple[str, ...]) -> tuple[str, ...]:
    """Top-level modules forming the task head: the task's own plus the family's extra ones."""
    family = FAMILIES.get(_model_type(model))
    return tuple(task_heads) + (family.head if family else ())


def head_parameter_names(model: nn.Module, task) -> list[str]:
    """Parameters of the task head (always trained): the task's head modules and the family's extra ones.

    A head tied to the input embeddings (causal LMs) shares their tensor, which carries the
    embeddings' name: training that head trains the embeddings, as tying means."""
    heads = head_modules(model, task.head_modules)
    canonical = {id(p): n for n, p in model.named_parameters()}
    names = sorted({canonical[id(p)] for name, module in model.named_children() if name in heads
                    for p in module.parameters()})
    if not names:
        raise UserError(f"model {type(model).__name__} has no task head named one of {heads}")
    return names


# ------------------------------------------------------------------ target matching


def name_matcher(target_modules: Any) -> Callable[[str], bool]:
    """The one rule for `target_modules` (peft's): a regex fully matching the module name, or a list of
    names / dotted suffixes (`value` and `attention.self.value` both match `...attention.self.value`)."""
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    targets = [str(t) for t in target_modules]
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def matching_modules(model: nn.Module, target_modules: Any, kinds: tuple[type, ...]) -> dict[str, nn.Module]:
    """Modules of `kinds` whose names match; under a peft wrapper, `X.base_layer` is found by X's name."""
    match = name_matcher(target_modules)
    wrapped = ".base_layer"
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)
            and (match(name) or name.endswith(wrapped) and match(name[: -len(wrapped)]))}


# ------------------------------------------------------------------ weights as (out, in) matrices


def in_features(layer: nn.Module) -> int:
    return layer.nx if isinstance(layer, Conv1D) else layer.in_features


def out_features(layer: nn.Module) -> int:
    return layer.nf if isinstance(layer, Conv1D) else layer.out_features


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): a view, so in-place writes reach the layer."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def to_weight_layout(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An (out_features, in_features) tensor in the layout of `layer.weight`."""
    return matrix.t() if isinstance(layer, Conv1D) else matrix

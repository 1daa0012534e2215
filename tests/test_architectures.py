"""Any Hugging Face family, not two: tiny random models of nine families through the architecture map.

Each family is built from its transformers config (width 32, 2 blocks) and put through what depends on
the layout: where the blocks and their roles are, the default sites of every method, one-shot pruning
(magnitude, Wanda, SparseGPT, with GPT-2's transposed Conv1D weights), LoRA over a pruned model, and
structured neuron and head removal. Three checkpoints nobody tuned for (Gemma-3, GPT-2, Qwen2) run
`compression=wanda peft=lora` end to end from a folder, with no target_modules given.
"""
from __future__ import annotations

import random
import re

import pytest
import torch
import transformers as hf
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmk_lab.architectures import (FAMILIES, architecture, name_matcher, pin_blocks, to_weight_layout,
                                    transformer_blocks, weight_matrix)
from llmk_lab.compression import COMPRESSION, target_linears
from llmk_lab.masks import MASK
from llmk_lab.compression.structured import StructuredConfig, StructuredPruning
from llmk_lab.errors import UserError
from llmk_lab.peft import resolve_targets
from llmk_lab.peft.lora import mask_lora_updates
from tests.conftest import read_metrics, run_config

VOCAB, D, FF = 128, 32, 64
ENCODERS = ["bert", "roberta", "distilbert"]
DECODERS = ["gpt2", "llama", "qwen2", "mistral", "gemma3_text", "phi3"]
FAMILY_NAMES = ENCODERS + DECODERS


def config_of(family: str, vocab: int = VOCAB, pad: int = 0, bos: int = 1, eos: int = 2):
    ids = dict(pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    if family == "distilbert":
        return hf.DistilBertConfig(vocab_size=vocab, dim=D, hidden_dim=FF, n_layers=2, n_heads=4, pad_token_id=pad)
    if family == "gpt2":
        return hf.GPT2Config(vocab_size=vocab, n_embd=D, n_inner=FF, n_layer=2, n_head=4, n_positions=64, **ids)
    if family in ("bert", "roberta"):
        # RoBERTa's positions start after the padding index.
        return hf.AutoConfig.for_model(family, vocab_size=vocab, hidden_size=D, intermediate_size=FF,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=66,
                                       pad_token_id=pad)
    return hf.AutoConfig.for_model(family, vocab_size=vocab, hidden_size=D, intermediate_size=FF,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, **ids)


def tiny(family: str, classifier: bool | None = None) -> nn.Module:
    classifier = family in ENCODERS if classifier is None else classifier
    auto = hf.AutoModelForSequenceClassification if classifier else hf.AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(config_of(family)).eval()


def batches(n: int = 2, batch: int = 4, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# ------------------------------------------------------------------ the map and discovery


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_blocks_and_roles_are_found_for_every_family(family):
    model = tiny(family)
    arch = architecture(model)
    assert len(arch.blocks) == 2 and arch.blocks is transformer_blocks(model)
    f = arch.family
    # Every role named points at a linear layer of the block.
    for name in [f.q, f.k, f.v, f.o, f.qkv, f.ffn_out, *f.ffn_in]:
        if name:
            assert isinstance(arch.blocks[0].get_submodule(name), (nn.Linear, Conv1D)), name
    assert (f.qkv is not None) == (family in ("gpt2", "phi3"))  # fused projections are named as such
    assert f.ffn_out and f.ffn_in and f.o and f.norms
    if f.heads:  # the head layout names a module of the block and its head-size attribute
        attention = arch.attention(arch.blocks[0], "compression.head_ratio")
        assert (attention.heads, attention.kv_heads, attention.size) == (4, 4 if family in ENCODERS else 2, 8)
    # The default targets of pruning are exactly the linears inside the blocks, nothing outside.
    layers = target_linears(model, None, "compression.target_modules", kinds=(nn.Linear, Conv1D))
    assert len(layers) == 2 * len(arch.linears)
    assert all(name.startswith(arch.blocks_path + ".") for name in layers)


def test_llama_style_families_need_no_entry():
    # Qwen2, Mistral and Gemma-3 are found from structure and conventional names alone.
    for family in ("qwen2", "mistral", "gemma3_text"):
        assert family not in FAMILIES
        arch = architecture(tiny(family))
        assert not arch.known
        assert (arch.family.k, arch.family.v, arch.family.ffn_out) == ("self_attn.k_proj", "self_attn.v_proj",
                                                                       "mlp.down_proj")
        assert arch.family.ffn_in == ("mlp.gate_proj", "mlp.up_proj")


@pytest.mark.parametrize("family,expected", [
    # (IA3 targets, its feed-forward subset) per block.
    ("bert", ({"attention.self.key", "attention.self.value", "output.dense"}, {"output.dense"})),
    ("distilbert", ({"attention.k_lin", "attention.v_lin", "ffn.lin2"}, {"ffn.lin2"})),
    ("gemma3_text", ({"self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"}, {"mlp.down_proj"})),
])
def test_ia3_defaults_come_from_the_map(family, expected):
    model = tiny(family)
    arch = architecture(model)
    targets, feedforward = arch.ia3_targets()
    prefix = arch.block_prefix(0)

    def per_block(pattern):
        match = name_matcher(pattern)
        return {n[len(prefix):] for n, _ in model.named_modules() if n.startswith(prefix) and match(n)}

    assert (per_block(targets), per_block(feedforward)) == expected


def test_fused_qkv_is_refused_for_ia3_in_one_line():
    with pytest.raises(UserError, match=r"^peft.target_modules: peft=ia3 .* fused projection \('attn.c_attn'\)"):
        architecture(tiny("gpt2")).ia3_targets()


def test_lora_defaults_add_the_pooler_only_where_there_is_one():
    bert = tiny("bert")
    pattern = architecture(bert).low_rank_update_targets(bert)
    assert re.fullmatch(pattern, "bert.pooler.dense") and not re.fullmatch(pattern, "classifier")
    llama = tiny("llama")
    assert architecture(llama).low_rank_update_targets(llama) == architecture(llama).block_linears()


class TwoStacks(nn.Module):
    """An encoder-decoder-like model: two module lists of identical blocks of the same size."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))
        self.decoder = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2))


def test_ambiguous_blocks_name_the_key_and_the_candidates_and_model_blocks_resolves_them():
    model = TwoStacks()
    with pytest.raises(UserError, match=r"^model.blocks: cannot tell .* set model.blocks to one of "
                                        r"\['encoder', 'decoder'\]$"):
        architecture(model)
    pin_blocks(model, "decoder")
    assert architecture(model).blocks is model.decoder
    with pytest.raises(UserError, match=r"^model.blocks='nowhere' names no module list"):
        pin_blocks(TwoStacks(), "nowhere")


def test_one_matching_rule_for_compression_and_peft():
    # A dotted suffix used to match in PEFT and be refused by compression.
    model = tiny("bert")
    compressed = set(target_linears(model, ["attention.self.query"], "compression.target_modules"))
    assert compressed == {f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)}
    assert resolve_targets(model, ["attention.self.query"]) == ["attention.self.query"]


# ------------------------------------------------------------------ pruning and LoRA on every family


def prune(model, method, sparsity=0.5, **extra):
    pruner = COMPRESSION.build({"method": method, "sparsity": sparsity, **extra}, "compression")
    layers = pruner.layers(model)
    if hasattr(pruner, "prune_with_batches"):
        pruner.prune_with_batches(model, layers, batches())
    else:
        pruner.prune(model, layers)
    return pruner, layers


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_shot_pruning_reaches_the_sparsity_on_every_family(family, method):
    model = tiny(family)
    pruner, layers = prune(model, method)
    for name, layer in layers.items():
        matrix = weight_matrix(layer)  # (out, in) also for GPT-2's Conv1D
        assert int((matrix == 0).sum()) == round(0.5 * matrix.numel()), name
        assert torch.equal(getattr(layer, MASK), layer.weight != 0)
        if method == "wanda":  # per output row: every row keeps exactly half of its inputs
            assert ((matrix == 0).sum(1) == matrix.shape[1] // 2).all(), name
    assert pruner.report["achieved_sparsity"] == pytest.approx(0.5)
    logits = model(**batches(1)[0]).logits
    assert torch.isfinite(logits).all()


def test_n_m_on_conv1d_groups_run_along_the_inputs():
    model = tiny("gpt2")
    _, layers = prune(model, "wanda", sparsity=0.5, prune_n=2, prune_m=4)
    for name, layer in layers.items():
        kept = (weight_matrix(layer) != 0).reshape(weight_matrix(layer).shape[0], -1, 4).sum(-1)
        assert (kept == 2).all(), name


def test_conv1d_wanda_equals_wanda_on_the_equivalent_linear():
    """A Conv1D pruned by Wanda gets the mask a Linear with the transposed weight gets."""
    torch.manual_seed(0)
    conv = Conv1D(6, 8)
    linear = nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
    from llmk_lab.compression.calibration import InputStatistics

    stats = InputStatistics(8, torch.device("cpu"))
    stats.add(torch.randn(50, 8) * torch.arange(1, 9))
    pruner = COMPRESSION.build({"method": "wanda", "sparsity": 0.5}, "compression")
    pruner.prune_layer("conv", conv, stats)
    pruner.prune_layer("linear", linear, stats)
    assert torch.equal(to_weight_layout(conv, getattr(conv, MASK)), getattr(linear, MASK))
    assert torch.equal(conv.weight.t(), linear.weight)


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "bert"])
def test_lora_over_a_pruned_model_keeps_the_zeros_through_merging(family):
    from peft import LoraConfig, get_peft_model

    model = tiny(family)
    prune(model, "magnitude")
    targets = resolve_targets(model, None, default=architecture(model).low_rank_update_targets(model))
    task = "SEQ_CLS" if family in ENCODERS else "CAUSAL_LM"
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets, task_type=task, init_lora_weights=False))
    assert mask_lora_updates(wrapped) == len(target_linears(model, None, "k", kinds=(nn.Linear, Conv1D)))
    inputs = batches(1)[0]
    adapted = wrapped(**inputs).logits
    merged = wrapped.merge_and_unload()
    for name, layer in target_linears(merged, None, "k", kinds=(nn.Linear, Conv1D)).items():
        matrix = weight_matrix(layer)
        assert int((matrix == 0).sum()) >= round(0.5 * matrix.numel()), name
    assert torch.allclose(merged(**inputs).logits, adapted, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_the_head_modules_a_family_adds_train_with_the_head(method):
    """DistilBERT's newly initialised pre_classifier trains with its classifier (the map's `head`; peft's
    own head list matches it by suffix)."""
    from types import SimpleNamespace

    from llmk_lab.peft import PEFT

    strategy = PEFT.build({"method": method, **({"r": 2} if method == "lora" else {})}, "peft")
    task = SimpleNamespace(peft_task_type="SEQ_CLS", head_modules=("classifier", "score"))
    adapted = strategy.apply(tiny("distilbert"), SimpleNamespace(task=task))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any("pre_classifier." in n for n in trainable) and any(".classifier." in n or n.startswith("classifier.")
                                                                  for n in trainable)
    assert not any("embeddings" in n for n in trainable)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "distilbert"])
def test_adapters_sit_after_the_attention_and_feed_forward_outputs_of_every_family(family):
    from llmk_lab.peft.adapter import ADAPTER, AdapterConfig, insert_adapters, norm_parameter_names

    model = tiny(family)
    arch = architecture(model)
    inputs = batches(1)[0]
    before = model(**inputs).logits
    sites = insert_adapters(model, AdapterConfig(bottleneck=4, init_std=1e-6))
    expected = {arch.block_prefix(i) + name for i in range(2) for name in (arch.family.o, arch.family.ffn_out)}
    assert set(sites) == expected and all(hasattr(model.get_submodule(s), ADAPTER) for s in sites)
    assert torch.allclose(model(**inputs).logits, before, atol=1e-3)  # near-identity at initialisation
    norms = {n.rsplit(".", 1)[0] for n in norm_parameter_names(model)}
    assert norms == {arch.block_prefix(i) + n for i in range(2) for n in arch.family.norms}


# ------------------------------------------------------------------ structured pruning


def structured_context(model):
    from types import SimpleNamespace

    return SimpleNamespace(model=model, datamodule=None)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral",
                                    "gemma3_text"])
def test_neuron_removal_shrinks_the_feed_forward_of_every_family(family, tmp_path):
    model = tiny(family)
    method = StructuredPruning(StructuredConfig(head_ratio=0.0, neuron_ratio=0.25, importance="l1"))
    method.before_fit(structured_context(model))
    arch = architecture(model)
    for block in arch.blocks:
        for name in arch.family.ffn_in:
            assert weight_matrix(block.get_submodule(name)).shape == (48, D), name
        assert weight_matrix(block.get_submodule(arch.family.ffn_out)).shape == (D, 48)
    assert getattr(model.config, arch.family.ffn_width_key) == 48
    inputs = batches(1)[0]
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)  # the config describes the shrunk model: it reloads as it is
    auto = hf.AutoModelForSequenceClassification if family in ENCODERS else hf.AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)


def test_fused_feed_forward_and_heads_outside_the_map_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"fuses them \('mlp.gate_up_proj'\); use drop_layers"):
        StructuredPruning(StructuredConfig(head_ratio=0.0, neuron_ratio=0.25, importance="l1")).before_fit(
            structured_context(tiny("phi3")))
    for family in ("qwen2", "gpt2", "roberta", "distilbert"):
        with pytest.raises(UserError, match=rf"^compression.head_ratio=0.5: head removal needs the attention-head "
                                            rf"layout of model type '{family}' \(a `heads` entry"):
            StructuredPruning(StructuredConfig(head_ratio=0.5, neuron_ratio=0.0, importance="l1")).before_fit(
                structured_context(tiny(family)))
    with pytest.raises(UserError, match=r"would remove all 2 query heads sharing each of the 2 key/value heads"):
        StructuredPruning(StructuredConfig(head_ratio=0.75, neuron_ratio=0.0, importance="l1")).before_fit(
            structured_context(tiny("llama")))
    phi3 = tiny("phi3")  # dropping whole layers needs no roles
    StructuredPruning(StructuredConfig(head_ratio=0.0, neuron_ratio=0.0, drop_layers=1)).before_fit(structured_context(phi3))
    assert len(architecture(phi3).blocks) == 1 and phi3.config.num_hidden_layers == 1


def tiny_decoder(family: str, kv_heads: int) -> nn.Module:
    torch.manual_seed(0)
    config = hf.AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=D, intermediate_size=FF,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                     head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    return hf.AutoModelForCausalLM.from_config(config).eval()


def llama_like_entry(monkeypatch, family: str) -> None:
    """Structured support for a Llama-shaped family is one entry in the map."""
    from llmk_lab.architectures import LLAMA

    if family not in FAMILIES:
        monkeypatch.setitem(FAMILIES, family, LLAMA)


@pytest.mark.parametrize("family, kv_heads", [("llama", 2), ("llama", 4), ("mistral", 2)])
def test_decoder_heads_and_neurons_removed_equal_the_dense_model_with_them_zeroed(family, kv_heads, tmp_path,
                                                                                 monkeypatch):
    """Cutting query heads (grouped-query: the same number from every key/value group) and feed-forward neurons
    computes exactly what the dense model does with those heads' output columns and neurons' down columns zeroed;
    the shrunk config reloads as a plain model of the family."""
    llama_like_entry(monkeypatch, family)
    model, dense = tiny_decoder(family, kv_heads), tiny_decoder(family, kv_heads)
    method = StructuredPruning(StructuredConfig(head_ratio=0.5, neuron_ratio=0.25, importance="l1"))
    method.before_fit(structured_context(model))
    removed = {int(i): heads for i, heads in method.report["heads_removed"].items()}
    arch = architecture(model)
    for i, block in enumerate(arch.blocks):
        assert len(removed[i]) == 2
        if kv_heads == 2:  # one of the two query heads of each key/value head
            assert sorted(h // 2 for h in removed[i]) == [0, 1]
        attention = block.self_attn
        assert attention.q_proj.weight.shape == (16, D) and attention.o_proj.weight.shape == (D, 16)
        # Without grouping, two key/value heads go with their query heads; with two groups both stay, one
        # query head each.
        assert attention.k_proj.weight.shape == (16, D) and attention.num_key_value_groups == 1
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 2, 8)
    with torch.no_grad():
        for i, (pruned_block, block) in enumerate(zip(arch.blocks, architecture(dense).blocks)):
            for h in removed[i]:
                block.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
            kept, full = pruned_block.mlp.down_proj.weight, block.mlp.down_proj.weight
            keep = [j for j in range(FF) if any(torch.equal(full[:, j], kept[:, c]) for c in range(kept.shape[1]))]
            assert len(keep) == 48
            full[:, sorted(set(range(FF)) - set(keep))] = 0
    inputs = batches(1)[0]
    expected = model(**inputs).logits
    assert torch.allclose(expected, dense(**inputs).logits, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(**inputs).logits, expected)


@pytest.mark.parametrize("importance", ["gradient", "l1"])
@pytest.mark.parametrize("kv_heads, ratio", [(2, 0.5), (4, 0.25)])
def test_llama_head_importance_removes_a_head_that_contributes_nothing(importance, kv_heads, ratio):
    from types import SimpleNamespace

    model = tiny_decoder("llama", kv_heads)
    with torch.no_grad():  # head 1 has no weights: zero gate gradient, zero L1 norm
        architecture(model).blocks[0].self_attn.q_proj.weight[8:16] = 0
        architecture(model).blocks[0].self_attn.o_proj.weight[:, 8:16] = 0
    calibration = [{**b, "labels": b["input_ids"]} for b in batches(2)]
    ctx = SimpleNamespace(model=model, datamodule=SimpleNamespace(calibration_batches=lambda n, b: calibration),
                          task=SimpleNamespace(head_modules=("lm_head",)))
    method = StructuredPruning(StructuredConfig(head_ratio=ratio, neuron_ratio=0.0, importance=importance))
    method.before_fit(ctx)
    removed = method.report["heads_removed"]["0"]
    assert 1 in removed and len(removed) == (2 if kv_heads == 2 else 1)


# ------------------------------------------------------------------ end to end from a folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the a river stone light green runs over under bright cold".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(16)))
    return path


def save_checkpoint(family: str, folder):
    from llmk_lab import assets

    tokenizer = hf.AutoTokenizer.from_pretrained(assets.resolve("asset:minilm-l6")[0])
    config = config_of(family, vocab=len(tokenizer), pad=tokenizer.pad_token_id, bos=tokenizer.cls_token_id,
                       eos=tokenizer.sep_token_id)
    torch.manual_seed(0)
    hf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["gemma3_text", "gpt2", "qwen2"])
def test_unseen_checkpoint_runs_wanda_then_lora_with_no_target_modules(family, corpus, tmp_path):
    folder = save_checkpoint(family, tmp_path / family)
    metrics = run_config([
        f"model.name_or_path={folder}", "model.tokenizer=null", "data=local_text", f"data.path={corpus}",
        "data.max_length=16", "data.val_size=2", "data.test_size=2", "data.limit_train=16", "data.limit_eval=4",
        "compression=wanda", "compression.calibration_examples=4", "peft=lora", "peft.r=2", "logger=none",
        "train.max_steps=2", "train.batch_size=4", "train.eval_batch_size=4", "optimized_metric=test/perplexity",
        "export.checkpoint=false", "export.adapter=false", "export.model=false", "measure.latency_batch_sizes=[]",
        "measure.size=false", "measure.fidelity=false",
    ], tmp_path / "run")
    assert metrics["sparsity/requested"] == 0.5
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.5)
    assert 1.0 < metrics["test/perplexity"] < 10 * 30522
    assert 0 < metrics["params/trainable"] < metrics["params/total"] / 4
    assert read_metrics(tmp_path / "run")["test/perplexity"] == metrics["test/perplexity"]

"""One-shot pruning: magnitude, Wanda, SparseGPT, random; unstructured and N:M; block-sequential calibration."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.calibration import InputStatistics, prune_block_sequentially
from llmk_lab.masks import MASK
from llmk_lab.compression.sparsegpt import sparsegpt_prune
from llmk_lab.compression.wanda import wanda_scores
from llmk_lab.errors import UserError
from llmk_lab.plan import plan

from tests.conftest import compose_config, run_cli, run_config

VOCAB = 300
METHODS = ["magnitude", "wanda", "sparsegpt", "random"]


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def tiny_bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=64))


MODELS = {"llama": tiny_llama, "bert": tiny_bert}


def calibration_batches(n_batches: int = 2, batch: int = 4, length: int = 16) -> list[dict]:
    """Random token ids with right padding in some rows (padding must not count in the statistics)."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        mask[1, 3:] = 0
        ids[mask == 0] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return batches


def prune(model: nn.Module, **node):
    method = COMPRESSION.build(node, "compression")
    layers = method.layers(model)
    if hasattr(method, "prune_with_batches"):
        method.prune_with_batches(model, layers, calibration_batches())
    else:
        method.prune(model, layers)
    return method, layers


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,sparsity", [("llama", 0.5), ("bert", 0.5), ("llama", 0.25)])
def test_each_layer_gets_exactly_the_requested_sparsity(arch, method, sparsity):
    model = MODELS[arch]()
    pruner, layers = prune(model, method=method, sparsity=sparsity)
    for name, layer in layers.items():
        zeros = int((layer.weight == 0).sum())
        assert zeros == round(sparsity * layer.weight.numel()), name
        assert torch.equal(getattr(layer, MASK), layer.weight != 0)
    assert pruner.report["achieved_sparsity"] == pytest.approx(sparsity)
    assert pruner.report["per_layer"][next(iter(layers))] == {"requested": sparsity, "achieved": sparsity}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,n,m", [("llama", 2, 4), ("bert", 2, 4), ("llama", 4, 8)])
def test_n_m_pattern_holds_in_every_group(arch, method, n, m):
    model = MODELS[arch]()
    pruner, layers = prune(model, method=method, sparsity=1 - n / m, prune_n=n, prune_m=m)
    for name, layer in layers.items():
        groups = (layer.weight != 0).reshape(layer.out_features, -1, m).sum(-1)
        assert (groups == n).all(), name
    assert pruner.report["pattern"] == f"{n}:{m}"
    assert pruner.report["achieved_sparsity"] == pytest.approx(1 - n / m)


def test_wanda_scores_are_weight_magnitude_times_input_column_norm_on_a_hand_made_example():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                           [-0.5, 0.25, 2.0, 1.0]])
    # Column norms over the tokens: [5, 0, 1, 2] (rows are tokens; padding already removed).
    tokens = torch.tensor([[3.0, 0.0, 1.0, 2.0],
                           [4.0, 0.0, 0.0, 0.0]])
    stats = InputStatistics(4, torch.device("cpu"))
    stats.add(tokens)
    assert torch.allclose(stats.column_norms, torch.tensor([5.0, 0.0, 1.0, 2.0]))
    scores = wanda_scores(weight, stats.column_norms)
    assert torch.allclose(scores, torch.tensor([[5.0, 0.0, 3.0, 8.0],
                                                [2.5, 0.0, 2.0, 2.0]]))
    # Compared within each row: magnitude alone would keep column 1 of row 0 (|-2|) and drop column 0.
    from llmk_lab.compression.one_shot import row_keep_mask
    assert torch.equal(row_keep_mask(scores, 0.5), torch.tensor([[True, False, False, True],
                                                                 [True, False, True, False]]))


def test_wanda_in_a_model_uses_the_norms_of_the_real_non_padding_inputs():
    model = tiny_bert().eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batches = calibration_batches()
    # The first block's query layer sees the embedding output; compute its column norms independently.
    squared = torch.zeros(32)
    for batch in batches:
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states[0]
        squared += hidden[batch["attention_mask"].bool()].pow(2).sum(0)
    query = model.bert.encoder.layer[0].attention.self.query
    expected = wanda_scores(dense["bert.encoder.layer.0.attention.self.query.weight"], squared.sqrt())
    method = COMPRESSION.build({"method": "wanda", "sparsity": 0.5}, "compression")
    method.prune_with_batches(model, method.layers(model), batches)
    from llmk_lab.compression.one_shot import row_keep_mask
    assert torch.equal(getattr(query, MASK), row_keep_mask(expected, 0.5))
    assert method.report["calibration_tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)


def reconstruction_error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    return float((x @ dense.t() - x @ pruned.t()).pow(2).sum())


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude(n, m):
    generator = torch.Generator().manual_seed(0)
    # Correlated inputs with uneven scales, as activations are: where reconstruction matters.
    x = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    x = x * torch.rand(64, generator=generator) * 3
    weight = torch.randn(48, 64, generator=generator)
    stats = InputStatistics(64, torch.device("cpu"), gram=True)
    stats.add(x)
    updated, keep = sparsegpt_prune(weight, stats.hessian(), 0.5, n, m, blocksize=32, percdamp=0.01)
    assert int((~keep).sum()) == weight.numel() // 2 and torch.all(updated[~keep] == 0)
    from llmk_lab.compression.one_shot import layer_keep_mask, n_m_keep_mask
    magnitude = weight * (n_m_keep_mask(weight.abs(), n, m) if m else layer_keep_mask(weight.abs(), 0.5))
    sparsegpt_error = reconstruction_error(x, weight, updated)
    magnitude_error = reconstruction_error(x, weight, magnitude)
    assert sparsegpt_error < 0.7 * magnitude_error


def test_block_sequential_calibration_feeds_the_pruned_outputs_forward():
    """Block 1's statistics must come from block 0 already pruned, not from the dense model."""
    model = tiny_llama().eval()
    dense_model = tiny_llama().eval()
    dense_model.load_state_dict(model.state_dict())
    batches = calibration_batches()
    layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    seen: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def prune_layer(name, layer, stats):
        seen[name], _ = stats.column_norms.clone(), order.append(name)
        scores = wanda_scores(layer.weight, stats.column_norms)
        from llmk_lab.masks import set_mask
        from llmk_lab.compression.one_shot import row_keep_mask
        set_mask(layer, row_keep_mask(scores, 0.5))

    prune_block_sequentially(model, layers, batches, prune_layer)
    assert order == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]

    def input_norms(m: nn.Module, name: str) -> torch.Tensor:
        squared = torch.zeros(m.get_submodule(name).in_features)

        def hook(module, inputs, output):
            squared.add_(inputs[0][current_mask[0]].pow(2).sum(0))

        handle = m.get_submodule(name).register_forward_hook(hook)
        current_mask = [None]
        with torch.no_grad():
            for batch in batches:
                current_mask[0] = batch["attention_mask"].bool()
                m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        return squared.sqrt()

    upper = "model.layers.1.self_attn.q_proj"
    assert torch.allclose(seen[upper], input_norms(model, upper), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen[upper], input_norms(dense_model, upper), rtol=1e-3, atol=1e-4)
    # Block 0's statistics are the dense model's (nothing below it is pruned).
    lower = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(seen[lower], input_norms(dense_model, lower), rtol=1e-4, atol=1e-5)


def test_calibrated_pruning_inside_a_run_keeps_masks_through_lora_and_merging(tmp_path, tiny):
    metrics = run_config(tiny + ["compression=sparsegpt", "compression.calibration_examples=16", "train.max_steps=2"],
                         tmp_path / "run")
    report = metrics["compression"][0]
    assert report["method"] == "sparsegpt" and report["calibration_sequences"] == 16
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert metrics["sparsity/after_merge"] == pytest.approx(0.5)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("override,message", [
    ("compression.sparsity=1.5", "compression.sparsity=1.5 is not allowed: a number in [0, 1)"),
    ("compression.sparsity=-0.1", "compression.sparsity=-0.1 is not allowed: a number in [0, 1)"),
    ("compression.prune_n=4", "compression.prune_n=4 is not allowed: 0 when prune_m is 0"),
    ("compression.prune_m=4", "compression.prune_n=0 is not allowed: a number of kept weights N with 0 < N < prune_m=4"),
    ("compression.calibration_examples=0", "compression.calibration_examples=0 is not allowed"),
])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bad_settings_fail_with_one_line_naming_the_key(method, override, message):
    with pytest.raises(UserError) as err:
        plan(compose_config([f"compression={method}", override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_n_m_sparsity_must_match_the_pattern_and_blocks_must_hold_whole_groups():
    with pytest.raises(UserError, match=r"compression.sparsity=0.5 is not allowed: 0.75, the sparsity 1:4 implies"):
        plan(compose_config(["compression=wanda", "compression.prune_n=1", "compression.prune_m=4"]))
    with pytest.raises(UserError, match=r"compression.blocksize=6 is not allowed: a multiple of prune_m=4"):
        plan(compose_config(["compression=sparsegpt", "compression.prune_n=2", "compression.prune_m=4",
                             "compression.blocksize=6"]))
    with pytest.raises(UserError, match=r"compression.scope='global' is not allowed"):
        plan(compose_config(["compression=magnitude_nm", "compression.scope=global"]))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "random"])
def test_n_m_on_a_dimension_not_divisible_by_m_is_refused_before_pruning(method):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=36, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=3, num_key_value_heads=1))
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    pruner = COMPRESSION.build({"method": method, "sparsity": 0.5, "prune_n": 4, "prune_m": 8}, "compression")
    with pytest.raises(UserError, match=r"compression.prune_m=8 is not allowed: layer model.layers.0.self_attn.q_proj "
                                        r"has 36 input features, not divisible by 8"):
        pruner.layers(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


@pytest.mark.slow  # a fresh interpreter and a full CLI start-up
def test_cli_bad_n_m_is_one_line_exit_2_and_no_result(tmp_path):
    result = run_cli(["model=tiny_bert", "logger=csv", "data.limit_train=16", "data.limit_eval=16",
                      "model.from_config.hidden_size=36", "model.from_config.num_attention_heads=4",
                      "compression=wanda", "compression.prune_n=4", "compression.prune_m=8",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if "not divisible by 8" in line]
    assert len(lines) == 1 and "compression.prune_m=8" in lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_calibration_finds_the_blocks_of_a_peft_wrapped_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    outside = COMPRESSION.build({"method": "wanda", "target_modules": ["dense"]}, "compression")
    with pytest.raises(UserError, match=r"1 of the 7 targeted layers lie outside the transformer blocks "
                                        r"\(e.g. base_model.model.bert.pooler.dense\)"):
        outside.prune_with_batches(model, outside.layers(model), calibration_batches())
    method = COMPRESSION.build({"method": "wanda", "target_modules": r".*\.layer\.\d+\.(intermediate|output)\.dense"},
                               "compression")
    layers = method.layers(model)
    assert any(name.startswith("base_model.model.bert.encoder.layer.1.") for name in layers)
    method.prune_with_batches(model, layers, calibration_batches())
    assert method.report["achieved_sparsity"] == pytest.approx(0.5)


@pytest.mark.slow  # tokenises the whole Shakespeare asset once (cached afterwards)
def test_causal_lm_run_calibrates_on_random_training_windows(tmp_path):
    metrics = run_config(["+experiment=smollm2_perplexity", "model=tiny_llama", "logger=csv", "data.max_length=64",
                          "data.limit_eval=2", "compression=sparsegpt", "compression.prune_n=2",
                          "compression.prune_m=4", "compression.calibration_examples=8"], tmp_path / "run")
    report = metrics["compression"][0]
    assert report["calibration_sequences"] == 8 and report["calibration_tokens"] == 8 * 64
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert metrics["test/perplexity"] > 1

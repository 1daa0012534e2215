"""Compressed language models recovered and judged: OWL allocation, ShortGPT layer dropping, the before-fit
evaluation a recovery run is judged against, and lm-evaluation-harness on the in-memory model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.layer_drop import block_influence
from llmk_lab.compression.owl import outlier_percentage, owl_sparsities
from llmk_lab.errors import UserError
from llmk_lab.models import load_tokenizer
from tests.conftest import run_config

# The tiny causal LM on the Shakespeare windows: seconds per run.
TINY_LM = ["+experiment=smollm2_perplexity", "model=tiny_llama", "logger=csv", "data.max_length=64",
           "data.limit_eval=2", "data.limit_train=64", "train.batch_size=8"]


# --- OWL ------------------------------------------------------------------------------------------------------

def test_outlier_percentage_counts_scores_above_m_times_the_mean():
    scores = torch.tensor([1.0] * 18 + [20.0, 30.0])  # mean 3.4: M=5 -> threshold 17 -> 2 of 20
    assert outlier_percentage(scores, 5.0) == pytest.approx(10.0)
    assert outlier_percentage(scores, 8.0) == pytest.approx(5.0)  # threshold 27.2: only 30
    assert outlier_percentage(scores, 10.0) == 0.0  # threshold 34: none


def test_owl_sparsities_follow_the_paper_formula():
    # D = [1, 2, 3] -> scaled to [0, 2 lambda] = [0, .08, .16], centred: [-.08, 0, .08]; density = that + 0.5.
    assert owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.08) == pytest.approx([0.58, 0.5, 0.42])
    allocated = owl_sparsities([0.3, 4.0, 1.1, 2.2, 0.9], 0.7, 0.08)
    assert sum(allocated) / 5 == pytest.approx(0.7)  # the mean is the requested sparsity
    assert max(allocated) - min(allocated) == pytest.approx(0.16)  # the spread is 2 lambda
    assert allocated.index(min(allocated)) == 1  # most outliers, fewest weights pruned
    assert owl_sparsities([2.0, 2.0], 0.6, 0.08) == pytest.approx([0.6, 0.6])  # no spread: uniform


def test_owl_run_prunes_each_block_at_its_allocation_and_the_mean_is_the_request(tmp_path):
    metrics = run_config(TINY_LM + ["compression=wanda", "compression.allocation=owl", "compression.sparsity=0.6",
                                    "compression.calibration_examples=8", "compression.owl_lambda=0.1"],
                         tmp_path / "run")
    report = metrics["compression"][0]
    blocks, outliers = report["block_sparsity"], report["block_outlier_percent"]
    assert list(blocks) == ["model.layers.0.", "model.layers.1."]
    assert sum(blocks.values()) / 2 == pytest.approx(0.6)
    assert abs(blocks["model.layers.0."] - blocks["model.layers.1."]) == pytest.approx(0.2)  # two blocks: 2 lambda
    more = max(outliers, key=outliers.get)
    assert blocks[more] < 0.6  # the block with more outliers keeps more weights
    for name, entry in report["per_layer"].items():
        block = name[: name.index(".", len("model.layers.")) + 1]
        assert entry["requested"] == blocks[block]
        assert entry["achieved"] == pytest.approx(blocks[block], abs=1 / 32)  # per-row rounding of 32 or 64 inputs
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)


def test_owl_refuses_n_m_and_encoder_models(tmp_path):
    with pytest.raises(UserError, match=r"compression.allocation='owl' is not allowed: uniform with "
                                        r"prune_n:prune_m=2:4"):
        COMPRESSION.build({"method": "wanda", "allocation": "owl", "sparsity": 0.5, "prune_n": 2, "prune_m": 4},
                          "compression")
    with pytest.raises(UserError, match="compression.allocation=owl needs decoder blocks"):
        run_config(["model=tiny_bert", "logger=csv", "compression=wanda", "compression.allocation=owl"],
                   tmp_path / "bert")
    assert not (tmp_path / "bert" / "metrics.json").exists()


# --- ShortGPT layer dropping -------------------------------------------------------------------------------------

def tiny_decoder(layers: int = 4, width: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_block_influence_is_one_minus_the_cosine_of_block_input_and_output():
    model = tiny_decoder()
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # padding is not counted
    influence = block_influence(model, model.model.layers, [{"input_ids": ids, "attention_mask": mask}])
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool()
    for i in range(3):  # hidden_states[i] enters block i; the last entry has the final norm applied, so stop before
        cosine = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)[keep]
        assert influence[i] == pytest.approx(float(1 - cosine.mean()), abs=1e-5)


def test_layer_drop_removes_the_least_influential_block_and_the_export_reloads_without_it(tmp_path):
    metrics = run_config(TINY_LM + ["compression=layer_drop", "compression.count=1",
                                    "compression.calibration_examples=8"], tmp_path / "run")
    report = metrics["compression"][0]
    influence = report["block_influence"]
    assert report["layers_dropped"] == [influence.index(min(influence))]
    assert report["layers_before"] == 2 and report["layers_after"] == 1
    # One block: q and o 32 x 32, k and v 32 x 16 (2 key/value heads of 8), gate/up/down 32 x 64, two norms of 32.
    assert report["params_before"] - report["params_after"] == 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config.num_hidden_layers == 1 and len(reloaded.model.layers) == 1
    assert metrics["export/model_agreement"] == 1.0  # the reloaded model predicts what the run measured


def test_layer_drop_refuses_dropping_every_block_and_encoder_models(tmp_path):
    with pytest.raises(UserError, match=r"compression.count=2 would remove 2 of the model's 2 blocks; "
                                        r"allowed: fewer than 2"):
        run_config(TINY_LM + ["compression=layer_drop", "compression.count=2"], tmp_path / "all")
    with pytest.raises(UserError, match="compression.method='layer_drop' needs decoder blocks"):
        run_config(["model=tiny_bert", "logger=csv", "compression=layer_drop", "compression.count=1"],
                   tmp_path / "bert")
    assert not (tmp_path / "all" / "metrics.json").exists()


# --- recovery: the compressed model's figures before training, in the same run ------------------------------------

def test_recovery_run_records_the_pruned_models_perplexity_before_lora_and_keeps_its_masks(tmp_path):
    pruned_only = run_config(TINY_LM + ["compression=wanda", "compression.calibration_examples=8",
                                        "export.model=false"], tmp_path / "pruned")
    recovered = run_config(TINY_LM + ["compression=wanda", "compression.calibration_examples=8", "peft=lora",
                                      "peft.r=4", "train.max_epochs=4", "train.max_steps=32", "train.lr=3e-2", "measure.before_fit=true",
                                      # validation during training too: the metrics must be usable after the
                                      # before-fit evaluation has reset them
                                      "train.val_every_n_epochs=1", "export.merged=true"], tmp_path / "recovered")
    # Before training, LoRA's update is zero: the figure is the pruned model's, as a run without training gives.
    assert recovered["before_fit/test/perplexity"] == pytest.approx(pruned_only["test/perplexity"], rel=1e-5)
    assert recovered["test/perplexity"] < 0.95 * recovered["before_fit/test/perplexity"]  # recovery works
    # The masks hold through training and the merge: the merged model is exactly as sparse as the pruned one.
    assert recovered["sparsity/after_merge"] == recovered["sparsity/pruned_layers"] == pytest.approx(0.5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered" / "merged")
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert float((q == 0).float().mean()) == pytest.approx(0.5)


def test_pruning_keeps_an_uncompressed_copy_only_when_a_figure_compares_with_it(tmp_path, monkeypatch):
    """The copy costs 1x the weights: a pruning run that measures only perplexity does without it."""
    import copy

    import llmk_lab.run as run_module

    copied: list[str] = []

    def recording_deepcopy(value, *args, **kwargs):
        copied.append(type(value).__name__)
        return copy.deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(run_module, "copy", type("CopyModule", (), {"deepcopy": staticmethod(recording_deepcopy)}))
    base = TINY_LM + ["compression=wanda", "compression.calibration_examples=4", "export.model=false",
                      "measure.size=false", "measure.latency_batch_sizes=[]"]
    run_config(base + ["measure.fidelity=false"], tmp_path / "perplexity_only")
    assert "LlamaForCausalLM" not in copied
    metrics = run_config(base + ["measure.fidelity=true"], tmp_path / "with_fidelity")
    assert copied.count("LlamaForCausalLM") == 1 and "fidelity/agreement" in metrics


# --- lm-evaluation-harness -------------------------------------------------------------------------------------

def continuation_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), the continuation cut off the encoded whole text."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
    log_probs = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
    return sum(float(log_probs[position - 1, token]) for position, token in enumerate(whole)
               if position >= len(prefix))


def test_lm_eval_sentiment_accuracy_equals_the_hand_computed_choice(tmp_path):
    metrics = run_config(TINY_LM + ["compression=none", "eval.lm_eval.tasks=[llmk_movie_sentiment]",
                                    "eval.lm_eval.limit=24"], tmp_path / "run")
    run_dir = tmp_path / "run"
    documents = [json.loads(line) for line in
                 (run_dir / "lm_eval" / "tasks" / "llmk_movie_sentiment.jsonl").read_text().splitlines()][:24]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    from llmk_lab.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name_or_path=None, from_config={}, tokenizer="asset:minilm-l6"))
    correct = 0
    with torch.no_grad():
        for document in documents:
            context = f"Review: {document['text']}\nSentiment:"
            scores = [continuation_log_likelihood(model, tokenizer, context, " " + choice)
                      for choice in ("negative", "positive")]
            correct += int(scores.index(max(scores)) == document["label"])
    assert metrics["lm_eval/llmk_movie_sentiment/documents"] == 24
    assert metrics["lm_eval/llmk_movie_sentiment/acc"] == pytest.approx(correct / 24)
    results = json.loads((run_dir / "lm_eval" / "results.json").read_text())
    assert results["results"]["llmk_movie_sentiment"]["acc,none"] == pytest.approx(correct / 24)


@pytest.mark.slow  # reads lm-eval's index of its ~15,000 tasks (15 s)
def test_lm_eval_unknown_and_unreachable_tasks_are_one_line_before_anything_runs(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"eval.lm_eval.tasks: 'hellaswagg' is not an lm-eval task; close matches: "
                                        r"hellaswag.*local tasks \(offline\): llmk_movie_sentiment"):
        run_config(TINY_LM + ["eval.lm_eval.tasks=[hellaswagg]"], tmp_path / "typo")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError, match=r"'hellaswag' needs the hub dataset 'Rowan/hellaswag', which cannot be "
                                        r"fetched here.*local tasks that run offline"):
        run_config(TINY_LM + ["eval.lm_eval.tasks=[hellaswag]"], tmp_path / "offline")
    assert not (tmp_path / "typo").exists() or not (tmp_path / "typo" / "metrics.json").exists()


def test_lm_eval_is_refused_for_encoders_and_prompt_tuning(tmp_path):
    with pytest.raises(UserError, match=r"eval.lm_eval.tasks=\['llmk_movie_sentiment'\] needs a causal language "
                                        r"model; data.task is 'sequence_classification'"):
        run_config(["model=tiny_bert", "logger=csv", "eval.lm_eval.tasks=[llmk_movie_sentiment]"], tmp_path / "a")
    with pytest.raises(UserError, match="eval.lm_eval.tasks is not possible with peft.method='prompt'"):
        run_config(TINY_LM + ["peft=prompt", "eval.lm_eval.tasks=[llmk_movie_sentiment]"], tmp_path / "b")


# --- QLoRA: LoRA over a 4-bit NormalFloat base ---------------------------------------------------------------------

# NF4 blocks are 64 weights of a row: the tiny Llama at width 64.
WIDE = ["model.from_config.hidden_size=64", "model.from_config.intermediate_size=128"]

def test_nf4_base_holds_16_levels_per_block_keeps_zeros_and_computes_with_its_dequantised_weights():
    from llmk_lab.quantized_base import dequantized_weight, quantize_base

    model = tiny_decoder(layers=1, width=64)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[:, :8] = 0  # pruned columns
    dense = q.weight.detach().clone()
    report = quantize_base(model, "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert report["quantized_layers"] == 7 and not layer.weight.requires_grad
    values = dequantized_weight(layer)
    blocks = values.flatten().reshape(-1, 64)
    assert max(len(torch.unique(block)) for block in blocks) <= 16  # 4 bits: 16 levels, each block its own scale
    assert bool((values[:, :8] == 0).all())  # NF4 has an exact zero: pruned weights stay pruned
    # NF4's widest gap between levels is -1 .. -0.6962 of a block's absmax: no weight moves by more than half of
    # it (plus the 8-bit rounding of the double-quantised scale).
    error, absmax = (values - dense).reshape(-1, 64).abs(), dense.reshape(-1, 64).abs()
    assert bool((error.max(1).values <= 0.16 * absmax.max(1).values).all())
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, values), atol=1e-5)
    # 4 bits a weight, an 8-bit scale per 64 weights, an fp32 scale per 256 of those (and the level tables).
    linear_weights = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    others = sum(p.numel() * 4 for n, p in model.named_parameters() if "layers.0.self_attn" not in n
                 and "layers.0.mlp" not in n)
    packed = report["base_bytes"] - others
    assert linear_weights * (4 + 8 / 64) / 8 <= packed <= linear_weights * (4 + 8 / 64) / 8 + 7 * (16 * 4 + 256 * 4 + 8)
    narrow = tiny_decoder(layers=1, width=32)
    with pytest.raises(UserError, match=r"model.quantize_base=nf4 needs block linears at least 64 inputs wide .*"
                                        r"model.layers.0.self_attn.q_proj has 32"):
        quantize_base(narrow, "nf4")


def test_qlora_run_trains_lora_over_the_4bit_base_and_exports_the_float_merge_it_computed(tmp_path):
    metrics = run_config(TINY_LM + WIDE + ["compression=wanda", "compression.calibration_examples=8", "peft=lora",
                                           "peft.r=4", "model.quantize_base=nf4", "train.max_epochs=2",
                                           "hardware.gradient_checkpointing=true",  # recomputes through 4 bits
                                    "train.max_steps=16", "train.lr=3e-2", "measure.before_fit=true",
                                    "export.merged=true", "export.adapter=true"], tmp_path / "run")
    base = metrics["quantized_base"]
    assert base["quantize_base"] == "nf4" and base["quantized_layers"] == 14 and base["double_quantization"]
    assert base["base_bytes"] < base["base_bytes_float"]
    assert metrics["test/perplexity"] < metrics["before_fit/test/perplexity"]  # LoRA trains over the NF4 base
    # The masked update keeps the pruned zeros through the merge into the dequantised base.
    assert metrics["sparsity/after_merge"] == metrics["sparsity/pruned_layers"] == pytest.approx(0.5)
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/merged_max_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert metrics["export/adapter"].startswith("skipped: ")  # no plain-peft adapter reproduces it


def test_qlora_refusals_are_one_line_before_anything_runs(tmp_path):
    for extra, message in (
            (["peft=ia3"], "model.quantize_base=nf4 is not possible with peft.method='ia3'"),
            (["peft=lora", "compression=dynamic_int8"],
             "model.quantize_base=nf4 is not possible with compression.method='dynamic_int8'"),
            (["peft=lora", "hardware.accelerator=mps"], "not possible with hardware.accelerator='mps'"),
            (["peft=lora", "model.quantize_base=int3"], r"model.quantize_base='int3' is not allowed")):
        with pytest.raises(UserError, match=message):
            run_config(TINY_LM + WIDE + ["model.quantize_base=nf4", *extra], tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.json").exists()

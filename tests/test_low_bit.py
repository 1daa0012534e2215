"""Low-bit weight quantisation (RTN, GPTQ, AWQ): the grid, the packed layer, the algorithms against their
papers' definitions on small layers, and whole runs on tiny models (export reload, sparsity, refusals)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmk_lab.compression.awq import AWQ, AWQConfig, foldable_groups, output_error, search_scale
from llmk_lab.compression.gptq import GPTQ, GPTQConfig, gptq_quantize
from llmk_lab.compression.low_bit import (Grid, LowBitConfig, PackedLinear, RoundToNearest, grouped, packed_layers,
                                          rtn)
from llmk_lab.errors import UserError
from tests.conftest import run_config


def correlated_inputs(tokens: int = 512, features: int = 64, outliers: int = 4, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and a few large-magnitude channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5
    x = torch.randn(tokens, features, generator=g) @ (torch.eye(features) + mix)
    x[:, :outliers] *= 20
    return x


def layer_error(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w_hat - w) @ x.t()).pow(2).sum())


def dequantized(codes, scale, zero, grid: Grid, group_size: int) -> torch.Tensor:
    return grid.dequantize(grouped(codes, group_size), scale, zero).reshape(codes.shape)


# --- the grid and the packed layer ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_codes_in_range_zero_exact_and_error_within_half_a_step(bits, symmetric):
    grid = Grid(bits, symmetric)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    w[0, :5] = 0  # pruned weights
    codes, scale, zero = rtn(w, grid, 32)
    assert codes.min() >= -(1 << (bits - 1)) and codes.max() <= (1 << (bits - 1)) - 1
    assert torch.equal(codes, codes.round())
    w_hat = dequantized(codes, scale, zero, grid, 32)
    assert (w_hat[0, :5] == 0).all()  # 0.0 is a grid point: pruning survives quantisation
    step = scale.repeat_interleave(32, dim=1)
    assert ((w_hat - w).abs() <= step / 2 + 1e-6).all()
    if symmetric:
        assert (zero == 0).all()
    else:
        assert torch.equal(zero, zero.round())


@pytest.mark.parametrize("bits", [3, 4])
def test_packed_linear_stores_bits_per_weight_and_computes_with_the_dequantised_weight(bits):
    grid = Grid(bits, True)
    w = torch.randn(8, 64)
    codes, scale, zero = rtn(w, grid, 32)
    bias = torch.randn(8)
    layer = PackedLinear.from_codes(codes, scale, zero, grid, 32, bias, torch.float32)
    assert torch.equal(layer.codes().float(), codes)
    assert layer.weight_packed.numel() * 32 == 8 * 64 * bits  # dense packing: no padding bits
    x = torch.randn(5, 64)
    expected = x @ dequantized(codes, scale, zero, grid, 32).t() + bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


# --- GPTQ against its definition --------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, -1), (4, 16), (3, 16)])
def test_gptq_error_on_a_layer_is_below_rtn(bits, group_size):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    hessian = 2 * x.t() @ x / len(x)
    grid = Grid(bits, True)
    ours, codes, scale, zero = gptq_quantize(w, hessian, grid, group_size, blocksize=16)
    assert torch.allclose(ours, dequantized(codes, scale, zero, grid, group_size), atol=1e-5)
    baseline = dequantized(*rtn(w, grid, group_size), grid, group_size)
    assert layer_error(ours, w, x) < 0.8 * layer_error(baseline, w, x)


def obs_from_scratch(w: torch.Tensor, hessian: torch.Tensor, quantize, percdamp: float) -> torch.Tensor:
    """Quantise columns left to right; after each, the Optimal Brain Surgeon update of the remaining weights,
    delta = -(w_q - q) / [H^-1]_qq * [H^-1]_{:,q}, with H^-1 recomputed on the remaining columns (float64)."""
    w = w.double().clone()
    h = hessian.double().clone()
    h += percdamp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        hinv = torch.linalg.inv(h[j:, j:])
        q = quantize(w[:, j].float()).double()
        out[:, j] = q
        w[:, j:] -= ((w[:, j] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
    return out.float()


def test_gptq_sweep_equals_column_by_column_optimal_brain_surgeon_steps():
    x = correlated_inputs(tokens=256, features=24)
    w = torch.randn(6, 24, generator=torch.Generator().manual_seed(5))
    hessian = 2 * x.t() @ x / len(x)
    grid = Grid(4, True)
    scale, zero = grid.fit(w)  # per channel: the grid is fixed before the sweep, as in both versions

    def quantize(column):
        return grid.round_trip(column.unsqueeze(1), scale, zero).squeeze(1)

    expected = obs_from_scratch(w, hessian, quantize, 0.01)
    ours, *_ = gptq_quantize(w, hessian, grid, -1, blocksize=8)  # several lazy blocks
    assert torch.allclose(ours, expected, atol=1e-4)


def test_gptq_act_order_permutes_back_and_static_groups_keep_consecutive_groups():
    x = correlated_inputs()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    hessian = 2 * x.t() @ x / len(x)
    grid = Grid(4, True)
    ours, codes, scale, zero = gptq_quantize(w, hessian, grid, 16, blocksize=16, act_order=True, static_groups=True)
    assert torch.allclose(ours, dequantized(codes, scale, zero, grid, 16), atol=1e-5)
    # static groups: each group's scale is the one fitted on the original weights
    assert torch.allclose(scale, grid.fit(grouped(w, 16))[0])
    plain = dequantized(*rtn(w, grid, 16), grid, 16)
    assert layer_error(ours, w, x) < layer_error(plain, w, x)


def test_gptq_joint_mode_prunes_and_quantises_in_one_sweep_and_keeps_earlier_zeros():
    x = correlated_inputs()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    hessian = 2 * x.t() @ x / len(x)
    grid = Grid(4, True)
    joint, *_ = gptq_quantize(w, hessian, grid, 16, sparsity=0.5)
    assert float((joint == 0).float().mean()) >= 0.5
    keep = torch.rand(16, 64, generator=torch.Generator().manual_seed(9)) > 0.3
    kept, *_ = gptq_quantize(w * keep, hessian, grid, 16, keep=keep)
    assert (kept[~keep] == 0).all()


# --- AWQ --------------------------------------------------------------------------------------------------

def test_awq_scale_search_never_does_worse_than_rtn_and_helps_with_outlier_channels():
    x = correlated_inputs(outliers=4)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    grid = Grid(3, True)
    gram = x.t() @ x
    alpha, s, error, plain = search_scale([w], x.abs().mean(0), gram, grid, 32, 20)
    rtn_error = float(output_error(dequantized(*rtn(w, grid, 32), grid, 32) - w, gram))
    assert plain == pytest.approx(rtn_error, rel=1e-5)  # alpha = 0 is plain RTN
    assert alpha > 0 and error < 0.9 * plain
    assert float(output_error(torch.zeros_like(w), gram)) == 0.0


def tiny_llama(kv_heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    return LlamaForCausalLM(config).eval()


def block_record(model):
    from llmk_lab.compression.calibration import capture_block_inputs

    batch = {"input_ids": torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))}
    return capture_block_inputs(model, model.model.layers[0], [batch], torch.device("cpu"))[0]


@pytest.mark.parametrize("kv_heads,expected", [
    (4, {"input_layernorm": ["q_proj", "k_proj", "v_proj"], "post_attention_layernorm": ["gate_proj", "up_proj"],
         "up_proj": ["down_proj"], "v_proj": ["o_proj"]}),
    # grouped-query attention: values are shared by several query heads, so o_proj's input cannot be scaled
    (2, {"input_layernorm": ["q_proj", "k_proj", "v_proj"], "post_attention_layernorm": ["gate_proj", "up_proj"],
         "up_proj": ["down_proj"]}),
])
def test_awq_finds_where_scales_fold_by_testing_the_block(kv_heads, expected):
    model = tiny_llama(kv_heads)
    block = model.model.layers[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    names = {id(m): n.split(".")[-1] for n, m in block.named_modules()}
    found = {names[id(p)]: sorted(r.split(".")[-1] for r in readers)
             for p, readers in foldable_groups(block, layers, block_record(model))}
    assert found == {k: sorted(v) for k, v in expected.items()}
    before = {n: m.weight.clone() for n, m in block.named_modules() if hasattr(m, "weight")}
    assert all(torch.equal(before[n], m.weight) for n, m in block.named_modules() if hasattr(m, "weight"))


def test_awq_does_not_fold_into_a_norm_that_also_feeds_the_residual():
    """BERT's blocks are post-norm: the attention LayerNorm feeds the feed-forward layer and the residual sum, so
    scaling it would change the block; only value -> attention output folds."""
    from transformers import BertConfig, BertModel

    from llmk_lab.compression.calibration import capture_block_inputs

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    block = model.encoder.layer[0]
    batch = {"input_ids": torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    record = capture_block_inputs(model, block, [batch], torch.device("cpu"))[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    names = {id(m): n for n, m in block.named_modules()}
    found = {names[id(p)]: readers for p, readers in foldable_groups(block, layers, record)}
    assert found == {"attention.self.value": ["attention.output.dense"]}


# --- the methods on a model -------------------------------------------------------------------------------

def ctx_for(model):
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(4)]
    return SimpleNamespace(model=model, quantized_by=None,
                           datamodule=SimpleNamespace(calibration_batches=lambda n, b, seed=0: batches))


@torch.no_grad()
def mean_nll(model, batches) -> float:
    losses = [float(model(**b, labels=b["input_ids"]).loss) for b in batches]
    return sum(losses) / len(losses)


def test_calibrated_methods_beat_rtn_on_a_model_at_3_bits():
    """GPTQ and AWQ reproduce the model's outputs on held-out text better than RTN at 3 bits (their papers'
    main finding), each block calibrated on the already quantised blocks' outputs."""
    results = {}
    g = torch.Generator().manual_seed(11)
    held_out = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(4)]
    dense = tiny_llama()
    reference = mean_nll(dense, held_out)
    for name, method in {"rtn": RoundToNearest(LowBitConfig(bits=3, group_size=16)),
                         "gptq": GPTQ(GPTQConfig(bits=3, group_size=16, calibration_examples=16)),
                         "awq": AWQ(AWQConfig(bits=3, group_size=16, calibration_examples=16))}.items():
        model = tiny_llama()
        method.after_fit(ctx_for(model))
        assert len(packed_layers(model)) == 14 and method.report["quantized_layers"] == 14
        results[name] = abs(mean_nll(model, held_out) - reference)
    assert results["gptq"] < results["rtn"] and results["awq"] < results["rtn"], results


def test_group_size_not_dividing_a_layer_is_refused_naming_the_layer():
    with pytest.raises(UserError, match=r"group_size=48 .*layer model\.layers\.0\.self_attn\.q_proj has 32 input"):
        RoundToNearest(LowBitConfig(group_size=48)).check_model(tiny_llama())


@pytest.mark.parametrize("key,value,allowed", [("bits", 5, r"one of \[2, 3, 4, 8\]"), ("group_size", 0, "-1"),
                                               ("calibration_examples", 0, ">= 1")])
def test_bad_settings_are_refused_in_one_line(key, value, allowed):
    with pytest.raises(UserError, match=rf"{key}={value}.*{allowed}"):
        GPTQConfig(**{key: value})


def test_act_order_with_dynamic_groups_is_refused():
    with pytest.raises(UserError, match="static_groups"):
        GPTQConfig(act_order=True, group_size=128, static_groups=False)


# --- whole runs -------------------------------------------------------------------------------------------

LM = ["model=tiny_llama", "data=movie_reviews", "data.task=causal_lm", "data.max_length=16", "logger=none",
      "data.limit_train=16", "data.limit_eval=8", "train.eval_batch_size=8", "train.max_steps=0", "peft=full",
      "measure.latency_batch_sizes=[1]", "measure.latency_repeats=2"]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_a_run_exports_packed_weights_that_transformers_reloads_to_the_same_outputs(tmp_path, method):
    overrides = LM + [f"compression={method}", "compression.group_size=16"]
    if method != "rtn":
        overrides.append("compression.calibration_examples=8")
    metrics = run_config(overrides, tmp_path)
    report = metrics["compression"][0]
    assert report["bits"] == 4 and report["quantized_layers"] == 14
    assert metrics["export/model_format"] == "compressed_tensors_pack_quantized"
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] == 0.0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert state["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in state
    assert metrics["size/compressed_bytes"] < metrics["size/dense_bytes"]
    assert "latency/bs1/speedup" in metrics


def test_prune_then_gptq_keeps_the_zeros_in_the_saved_low_bit_weights(tmp_path):
    overrides = LM + ["compression=chain",
                      "compression.steps=[{method:sparsegpt,sparsity:0.5,calibration_examples:8},"
                      "{method:gptq,group_size:16,calibration_examples:8}]"]
    metrics = run_config(overrides, tmp_path)
    gptq = metrics["compression"][1]
    assert gptq["zero_fraction_before"] == pytest.approx(0.5, abs=1e-3)
    assert gptq["zero_fraction_quantized"] >= 0.5
    assert metrics["export/model_sparsity_after"] == metrics["export/model_sparsity_before"]
    # Counted in the saved low-bit weights, reloaded by transformers alone: every block linear at least half zeros.
    from transformers import AutoModelForCausalLM

    from llmk_lab.export import linear_sparsity

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    per_layer = {k: v for k, v in linear_sparsity(reloaded)["per_layer"].items() if ".layers." in k}
    assert len(per_layer) == 14 and min(per_layer.values()) >= 0.5


def test_asymmetric_grids_export_their_state_dict_and_reload_through_llmk_lab(tmp_path):
    from llmk_lab.export import load_exported

    metrics = run_config(LM + ["compression=rtn", "compression.group_size=16", "compression.symmetric=false"], tmp_path)
    assert metrics["export/model_format"] == "llmk_lab_low_bit_state_dict"
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] == 0.0
    model = load_exported(tmp_path / "model")
    assert all(not p.symmetric for p in packed_layers(model).values()) and len(packed_layers(model)) == 14


@pytest.mark.parametrize("overrides,message", [
    (["compression=gptq", "peft=lora"], "cannot be combined with peft.method='lora'"),
    (["compression=chain",
      "compression.steps=[{method:rtn,group_size:16},{method:gptq,group_size:16}]"],
     r"steps\[1\]\.method='gptq' is not allowed: step 0 \('rtn'\) already quantises"),
    (["compression=rtn", "compression.bits=5"], r"compression.bits=5"),
])
def test_impossible_combinations_are_refused_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_config(LM + overrides, tmp_path)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "manifest.json").exists()


def test_quantising_the_same_run_twice_is_refused(tmp_path):
    with pytest.raises(UserError, match="already quantises"):
        run_config(LM + ["compression=chain",
                         "compression.steps=[{method:rtn,group_size:16},{method:dynamic_int8}]"], tmp_path)

"""Measurement of compressed models: sparse and quantised sizes, interleaved latency, fidelity, the run's measure stage."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from llmk_lab.measure import (bitmask_decode, bitmask_encode, compressed_state, fidelity_figures, interleaved_latency,
                              saved_bytes, size_figures)


def tiny_bert(hidden: int = 32):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=2 * hidden)).eval()


def test_bitmask_round_trip_and_size():
    weight = torch.randn(64, 48)
    weight[torch.rand_like(weight) < 0.7] = 0
    parts = bitmask_encode(weight)
    assert torch.equal(bitmask_decode(parts), weight)
    stored = parts["bitmask"].numel() + parts["values"].numel() * 4
    assert stored < 0.4 * weight.numel() * 4  # 30 % of the values plus 1 bit per weight
    assert bitmask_encode(torch.randn(8, 8)) is None  # dense: the plain tensor is smaller


def test_compressed_save_is_smaller_for_sparse_and_quantised_models():
    dense = tiny_bert()
    sparse = tiny_bert()
    with torch.no_grad():
        for module in sparse.modules():
            if isinstance(module, nn.Linear):
                module.weight[module.weight.abs() < module.weight.abs().median()] = 0
    state, fmt = compressed_state(sparse)
    assert fmt == "safetensors" and any(k.endswith(".bitmask") for k in state)
    figures = size_figures(sparse, dense)
    assert figures["size/compressed_bytes"] < figures["size/dense_bytes"]
    # wide enough that the int8 weights, not the pickling overhead per layer, dominate the file
    dense = tiny_bert(hidden=256)
    quantised = torch.ao.quantization.quantize_dynamic(tiny_bert(hidden=256), {nn.Linear}, dtype=torch.qint8)
    state, fmt = compressed_state(quantised)
    assert fmt == "torch.save"
    linear_bytes = sum(m.weight.numel() * 4 for m in dense.modules() if isinstance(m, nn.Linear))
    saved = size_figures(quantised, dense)
    assert saved["size/dense_bytes"] - saved["size/compressed_bytes"] > 0.5 * linear_bytes  # int8: 1/4 of fp32


def test_shared_weights_are_stored_once():
    model = tiny_bert()
    single = saved_bytes(*compressed_state(model))
    model.extra = nn.Linear(32, 32)
    model.extra.weight = model.bert.encoder.layer[0].attention.self.query.weight
    model.extra.bias = model.bert.encoder.layer[0].attention.self.query.bias
    assert saved_bytes(*compressed_state(model)) < single + 1024


def test_fidelity_of_a_model_with_itself_and_with_another():
    from llmk_lab.tasks import get_task

    task = get_task("sequence_classification", ["neg", "pos"])
    g = torch.Generator().manual_seed(0)
    loader = [{"input_ids": torch.randint(0, 50, (8, 6), generator=g), "labels": torch.arange(8) % 2}]
    model = tiny_bert()
    same = fidelity_figures(model, model, task, loader)
    assert same["fidelity/agreement"] == 1.0 and same["fidelity/mean_kl"] == pytest.approx(0.0, abs=1e-7)
    other = tiny_bert()
    with torch.no_grad():
        other.classifier.weight.mul_(-1)
        other.classifier.bias.mul_(-1)
    flipped = fidelity_figures(other, model, task, loader)
    assert flipped["fidelity/agreement"] == 0.0 and flipped["fidelity/mean_kl"] > 0
    assert "reference/test/acc" in flipped


def test_interleaved_latency_times_every_model():
    batch = {"input_ids": torch.randint(0, 50, (4, 6)), "labels": torch.zeros(4, dtype=torch.long)}
    seconds = interleaved_latency({"dense": tiny_bert(), "compressed": tiny_bert()}, {"dense": batch, "compressed": batch},
                                  repeats=3, warmup=1)
    assert set(seconds) == {"dense", "compressed"} and all(s > 0 for s in seconds.values())


def test_compression_run_reports_size_latency_and_fidelity(tmp_path, tiny):
    from tests.conftest import run_config

    metrics = run_config(tiny + ["compression.sparsity=0.5", "measure.latency_batch_sizes=[2]",
                                 "measure.latency_repeats=2"], tmp_path)
    for key in ("size/dense_bytes", "size/compressed_bytes", "latency/bs2/dense_ms", "latency/bs2/compressed_ms",
                "latency/bs2/speedup", "throughput/bs2/compressed_examples_per_s", "fidelity/agreement",
                "fidelity/mean_kl", "reference/test/acc", "sparsity/requested", "sparsity/pruned_layers"):
        assert key in metrics, key
    assert metrics["measure/reference"] == "model as loaded"
    assert len(metrics["sparsity_per_layer"]) == 12
    assert all(v == pytest.approx(0.5, abs=0.01) for v in metrics["sparsity_per_layer"].values())


def test_measurement_is_skippable_and_absent_without_compression(tmp_path, tiny):
    from tests.conftest import run_config

    skipped = run_config(tiny + ["measure.latency_batch_sizes=[]", "measure.size=false", "measure.fidelity=false"],
                         tmp_path / "skipped")
    assert not any(k.startswith(("size/", "latency/", "fidelity/")) for k in skipped)
    dense = run_config(tiny + ["compression=none"], tmp_path / "dense")
    assert "measure/reference" not in dense and not any(k.startswith("fidelity/") for k in dense)


def test_bad_measure_settings_are_one_line(tmp_path, tiny):
    from llmk_lab.errors import UserError
    from tests.conftest import run_config

    with pytest.raises(UserError, match="measure.latency_batch_sizes"):
        run_config(tiny + ["measure.latency_batch_sizes=[0]"], tmp_path)

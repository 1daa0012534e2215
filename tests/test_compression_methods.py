"""Structured pruning, gradual/movement pruning, distillation, quantisation, weight sharing, low rank (tiny models)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from llmk_lab.compression.distillation import distillation_loss
from llmk_lab.compression.gradual import GradualConfig, ScheduledPruning, cubic_sparsity
from llmk_lab.compression.low_rank import LowRank, LowRankConfig, energy_rank, factorize
from llmk_lab.masks import MASK
from llmk_lab.compression.movement import MovementConfig, MovementScores
from llmk_lab.compression.quantization import (DynamicInt8, DynamicInt8Config, WeightOnlyInt8, WeightOnlyInt8Config,
                                               is_quantized)
from llmk_lab.compression.structured import StructuredConfig, StructuredPruning, transformer_blocks
from llmk_lab.compression.weight_sharing import WeightSharing, WeightSharingConfig
from llmk_lab.errors import UserError
from tests.conftest import run_config


def tiny_bert(layers: int = 3, labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, num_labels=labels, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def calibration():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 100, (8, 12), generator=g),
             "attention_mask": torch.ones(8, 12, dtype=torch.long), "labels": torch.arange(8) % 2}]


def context(model):
    return SimpleNamespace(model=model, quantized_by=None, datamodule=SimpleNamespace(calibration_batches=lambda n, b: calibration()),
                           settings=SimpleNamespace(hardware=SimpleNamespace(accelerator="cpu")),
                           task=SimpleNamespace(head_modules=("classifier", "score")))


INPUT = {"input_ids": torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(2))}


# --- structured -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("importance", ["gradient", "l1"])
def test_structured_pruning_shrinks_matrices_and_reloads_with_identical_outputs(tmp_path, importance):
    model = tiny_bert()
    method = StructuredPruning(StructuredConfig(head_ratio=0.5, neuron_ratio=0.25, drop_layers=[1],
                                                importance=importance))
    method.before_fit(context(model))
    blocks = transformer_blocks(model)
    assert len(blocks) == 2
    for block in blocks:
        assert block.attention.self.query.weight.shape == (16, 32)  # 2 of 4 heads of size 8
        assert block.attention.output.dense.weight.shape == (32, 16)
        assert block.intermediate.dense.weight.shape == (48, 32)
        assert block.output.dense.weight.shape == (32, 48)
    assert method.report["layers_dropped"] == [1]
    assert all(len(v) == 2 for v in method.report["heads_removed"].values())
    expected = model(**INPUT).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.intermediate_size == 48
    assert torch.equal(reloaded(**INPUT).logits, expected)


def test_removing_whole_heads_equals_zeroing_their_output():
    """The pruned model computes exactly what the dense one does with the removed heads' context set to zero."""
    model = tiny_bert(layers=1)
    dense = BertForSequenceClassification(model.config).eval()
    dense.load_state_dict(model.state_dict())
    method = StructuredPruning(StructuredConfig(head_ratio=0.5, neuron_ratio=0.0, importance="l1"))
    method.before_fit(context(model))
    removed = method.report["heads_removed"]["0"]
    columns = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in removed])
    with torch.no_grad():
        dense.bert.encoder.layer[0].attention.output.dense.weight[:, columns] = 0
    assert torch.allclose(model(**INPUT).logits, dense(**INPUT).logits, atol=1e-6)


def test_gradient_head_importance_keeps_the_heads_that_matter():
    """A head whose output projection is zero has zero gate gradient: it is the one removed."""
    model = tiny_bert(layers=1)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 8:16] = 0  # head 1 contributes nothing
    method = StructuredPruning(StructuredConfig(head_ratio=0.25, importance="gradient"))
    method.before_fit(context(model))
    assert method.report["heads_removed"] == {"0": [1]}


@pytest.mark.parametrize("settings, message", [
    ({"head_ratio": 0.9}, "would remove all 4 heads"),
    ({"drop_layers": 3, "head_ratio": 0.0, "neuron_ratio": 0.0}, "would remove every one"),
    ({"drop_layers": [7], "head_ratio": 0.0, "neuron_ratio": 0.0}, "do not exist"),
])
def test_structured_bad_input_is_one_clear_line(settings, message):
    for hook in ("check_model", "before_fit"):  # refused before any method runs, and by the step itself
        method = StructuredPruning(StructuredConfig(**settings))
        with pytest.raises(UserError, match=message):
            method.check_model(tiny_bert()) if hook == "check_model" else method.before_fit(context(tiny_bert()))


def test_a_chain_step_the_model_cannot_take_is_refused_before_the_teacher_trains(tmp_path, tiny, monkeypatch):
    from llmk_lab.compression import distillation

    trained = []
    monkeypatch.setattr(distillation, "finetune_dense_teacher", lambda *a, **k: trained.append(1))
    with pytest.raises(UserError, match=r"drop_layers=\[3\] names layers \[3\] that do not exist"):
        run_config(tiny + ["compression=chain", "peft=full",
                           "compression.steps=[{method: distillation}, {method: structured, head_ratio: 0,"
                           " neuron_ratio: 0, drop_layers: [3]}]"], tmp_path)
    assert trained == [] and not (tmp_path / "metrics.json").exists() and not (tmp_path / "manifest.json").exists()


def test_structured_run_reports_smaller_model(tmp_path, tiny):
    metrics = run_config(tiny + ["compression=structured", "compression.head_ratio=0.5",
                                 "compression.neuron_ratio=0.5", "measure.latency_batch_sizes=[]"], tmp_path)
    report = metrics["compression"][0]
    assert report["params_after"] < report["params_before"]
    assert metrics["size/compressed_bytes"] < metrics["size/dense_bytes"]


# --- gradual magnitude and movement -----------------------------------------------------------------------

def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0.0, 0.8, 0, 10) == 0.0
    assert cubic_sparsity(5, 0.0, 0.8, 0, 10) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert cubic_sparsity(12, 0.1, 0.9, 2, 22) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    assert cubic_sparsity(10, 0.0, 0.8, 0, 10) == 0.8 and cubic_sparsity(50, 0.0, 0.8, 0, 10) == 0.8
    values = [cubic_sparsity(t, 0.0, 0.8, 0, 10) for t in range(11)]
    assert all(b > a for a, b in zip(values, values[1:]))  # grows fast at first, then flattens
    assert values[1] - values[0] > values[10] - values[9]


def test_scheduled_pruning_hits_each_scheduled_sparsity_and_keeps_masks():
    layer = nn.Linear(10, 10)
    callback = ScheduledPruning({"l": layer}, GradualConfig(sparsity=0.5, start_step=0, end_step=4, frequency=2), {})
    callback.end = 4
    callback.prune(2)
    assert (layer.weight == 0).float().mean().item() == pytest.approx(cubic_sparsity(2, 0, 0.5, 0, 4), abs=0.01)
    first = getattr(layer, MASK).clone()
    callback.prune(4)
    assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5)
    assert not (getattr(layer, MASK) & ~first).any()  # masks only grow


def test_each_cut_records_the_size_of_the_weights_it_removed_against_those_it_kept():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0]]))
    report = {}
    callback = ScheduledPruning({"l": layer}, GradualConfig(sparsity=0.5, start_step=0, end_step=1), report)
    callback.end = 1
    callback.prune(1)  # removes 1 and 2 (mean 1.5), keeps 3 and 4 (mean 3.5)
    callback.prune(1)  # removes nothing: no entry
    assert callback.cut_magnitudes == [(1, pytest.approx(1.5 / 3.5))]
    assert callback.cut_magnitude_report() == {"removed_to_kept_magnitude_first_cut": pytest.approx(1.5 / 3.5),
                                               "removed_to_kept_magnitude_mean": pytest.approx(1.5 / 3.5)}
    restored = ScheduledPruning({"l": nn.Linear(4, 1, bias=False)}, GradualConfig(sparsity=0.5, end_step=1), {})
    restored.load_state_dict(callback.state_dict())
    assert restored.cut_magnitudes == callback.cut_magnitudes


def test_movement_warns_when_its_first_cut_removes_weights_as_large_as_those_it_keeps(caplog):
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 1.0]]))
    callback = MovementScores({"l": layer}, MovementConfig(sparsity=0.5, end_step=1, score_update="sum"), {})
    callback.end = 1
    layer.weight.grad = torch.tensor([[1.0, 0.0]])  # scores [-3, 0]: the larger weight moves towards zero
    callback.on_before_optimizer_step(None, None, None)
    with caplog.at_level("WARNING", logger="llmk_lab.compression.movement"):
        callback.prune(1)
    assert callback.cut_magnitudes == [(1, 3.0)]
    assert "first cut (step 1) removed weights 3.00x the mean size" in caplog.text


def test_movement_scores_accumulate_minus_weight_times_gradient_and_prune_the_lowest():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    callback = MovementScores({"l": layer}, MovementConfig(sparsity=0.5, end_step=1, score_update="sum"), {})
    grads = [torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, -1.0]])]
    for grad in grads:
        layer.weight.grad = grad.clone()
        callback.on_after_backward(None, None)
        callback.on_before_optimizer_step(None, None, None)  # one optimiser step per gradient
    expected = -(layer.weight.detach() * (grads[0] + grads[1]))
    assert torch.allclose(callback.movement["l"], expected)  # [[-2, 2], [1, 3]]
    callback.end = 1
    callback.prune(1)
    # The weights moving towards zero (lowest scores) go, whatever their magnitude: W[0,0] = 1 and W[1,0] = 0.5.
    assert getattr(layer, MASK).tolist() == [[False, True], [False, True]]


def test_movement_scores_trained_by_adam_count_consistent_movement_whatever_the_size():
    """score_update=adam (the default): each step moves a score by Adam's normalised step on g = dL/dW' * W;
    a weight with the same gradient every step moves its score by one per step, large or small."""
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 300.0]]))
    callback = MovementScores({"l": layer}, MovementConfig(sparsity=0.5, end_step=1), {})
    for _ in range(3):
        layer.weight.grad = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])  # g*W: [[1, -2], [-0.5, 0]]
        callback.on_before_optimizer_step(None, None, None)
    assert torch.allclose(callback.movement["l"], torch.tensor([[-3.0, 3.0], [3.0, 0.0]]))


def test_movement_pruned_weights_keep_scoring_and_come_back_with_their_value():
    """The straight-through estimator: a pruned weight's score moves with dL/dW' times its value from
    when it was pruned, it does not train, and when its score overtakes a kept weight's it returns."""
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    callback = MovementScores({"l": layer}, MovementConfig(sparsity=0.5, end_step=1, score_update="sum"), {})
    callback.end = 1
    layer.weight.grad = torch.tensor([[2.0, 1.0], [-2.0, -1.0]])
    callback.on_before_optimizer_step(None, None, None)  # scores [[-2, 2], [1, 3]]
    callback.prune(1)
    assert getattr(layer, MASK).tolist() == [[False, True], [False, True]]
    assert layer.weight.tolist() == [[0.0, -2.0], [0.0, 3.0]]
    # W[0,0] (pruned at 1.0) would now reduce the loss: its score rises by 5 to 3, above W[0,1]'s 2.
    layer.weight.grad = torch.tensor([[-5.0, 0.0], [0.0, 0.0]])
    callback.on_before_optimizer_step(None, None, None)
    assert callback.movement["l"].tolist() == [[3.0, 2.0], [1.0, 3.0]]
    assert layer.weight.grad[0, 0] == 0  # pruned weights do not train
    callback.prune(1)
    assert getattr(layer, MASK).tolist() == [[True, False], [False, True]]
    assert layer.weight.tolist() == [[1.0, 0.0], [0.0, 3.0]]  # back with its value; W[0,1] put aside
    # first cut: removed 1 and 0.5 against kept 2 and 3; second: removed 2 against 1 (regrown) and 3
    assert callback.cut_magnitudes == [(1, pytest.approx(0.75 / 2.5)), (1, pytest.approx(1.0))]
    assert callback.pruned_values["l"].tolist() == [[0.0, -2.0], [0.5, 0.0]] and callback.regrown == 1


def test_movement_state_restored_from_a_checkpoint_follows_the_layers_to_their_device():
    """Lightning restores a checkpoint before it moves the model to its device: the restored scores, Adam
    moments and pruned values must end up beside the weights at fit start (the meta device stands in
    for a GPU here)."""
    layer = nn.Linear(4, 4, bias=False)
    callback = MovementScores({"l": layer}, MovementConfig(sparsity=0.5, end_step=1), {})
    callback.end = 1
    layer.weight.grad = torch.randn(4, 4)
    callback.on_before_optimizer_step(None, None, None)
    callback.prune(1)
    saved = callback.state_dict()
    assert saved["moments"] and saved["pruned_values"]

    fresh_layer = nn.Linear(4, 4, bias=False)
    restored = MovementScores({"l": fresh_layer}, MovementConfig(sparsity=0.5, end_step=1), {})
    restored.load_state_dict(saved)  # on the CPU, like the model at that point
    fresh_layer.to("meta")  # the strategy moves the model
    restored.on_fit_start(None, None)
    tensors = [restored.movement["l"], *restored.moments["l"], restored.pruned_values["l"],
               getattr(fresh_layer, MASK)]
    assert all(t.device.type == "meta" for t in tensors)


@pytest.mark.parametrize("method", ["gradual_magnitude", "movement"])
def test_training_time_pruning_reaches_requested_sparsity(tmp_path, tiny, method):
    metrics = run_config(tiny + [f"compression={method}", "peft=full", "compression.sparsity=0.6",
                                 "compression.frequency=1", "measure.latency_batch_sizes=[]"], tmp_path)
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.6, abs=0.005)
    assert metrics["sparsity/requested"] == 0.6
    assert metrics["compression"][0]["pruning_steps"] >= 4


def test_training_time_pruning_refuses_frozen_weights(tmp_path, tiny):
    with pytest.raises(UserError, match="use peft=full"):
        run_config(tiny + ["compression=movement"], tmp_path)
    assert not (tmp_path / "metrics.json").exists()


# --- distillation -----------------------------------------------------------------------------------------

def test_distillation_loss_on_a_hand_made_example():
    student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    t, alpha, task = 2.0, 0.25, torch.tensor(0.7)
    p = torch.softmax(teacher / t, -1)[0]
    q = torch.softmax(student / t, -1)[0]
    kl = float((p * (p / q).log()).sum())  # KL(teacher || student) at temperature T
    expected = alpha * 0.7 + (1 - alpha) * t ** 2 * kl
    assert float(distillation_loss(student, teacher, task, alpha, t)) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(teacher, teacher, task, 0.0, t)) == pytest.approx(0.0, abs=1e-7)


def test_distillation_from_a_dense_teacher_trained_in_the_run(tmp_path, tiny, monkeypatch):
    from llmk_lab.compression import distillation

    calls = []
    original = distillation.distillation_loss
    monkeypatch.setattr(distillation, "distillation_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    metrics = run_config(tiny + ["compression=chain", "peft=full", "measure.latency_batch_sizes=[]",
                                 "compression.steps=[{method: distillation, alpha: 0.5},"
                                 " {method: structured, head_ratio: 0, neuron_ratio: 0, drop_layers: 1}]"], tmp_path)
    # The method's loss_term is in the student's training loss, once per training step (not the teacher's).
    assert len(calls) == metrics["train/steps"] > 0
    assert metrics["measure/reference"] == "dense teacher fine-tuned in this run"
    assert metrics["compression"][1]["layers_dropped"] == [1]
    assert 0 <= metrics["fidelity/agreement"] <= 1 and metrics["fidelity/mean_kl"] >= 0


def test_teacher_with_other_labels_is_one_clear_line(tmp_path, tiny):
    teacher = tiny_bert(labels=3)
    teacher.config.id2label = {0: "a", 1: "b", 2: "c"}
    teacher.save_pretrained(tmp_path / "teacher")
    with pytest.raises(UserError, match="predicts labels \\['a', 'b', 'c'\\]"):
        run_config(tiny + ["compression=distillation", f"compression.teacher={tmp_path / 'teacher'}"],
                   tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


# --- what methods declare ---------------------------------------------------------------------------------

def test_every_method_declares_its_reference_with_the_hooks_and_no_schedule_metadata():
    from llmk_lab.compression import AS_LOADED, COMPRESSION, FINE_TUNED, CompressionMethod

    for name in COMPRESSION.names():
        cls = COMPRESSION.get(name).cls
        assert cls.dense_reference in (AS_LOADED, FINE_TUNED, None), name
        assert not hasattr(cls, "acts"), name  # the hooks are called; a method does not list them
    assert COMPRESSION.get("none").cls.dense_reference is None
    assert CompressionMethod(None).loss_term(None) is None


@pytest.mark.parametrize("compression, reference", [
    ("dynamic_int8", "fine-tuned model before compression"),
    ("chain", "model as loaded"),  # magnitude then int8: one step compresses before training
])
def test_the_dense_reference_is_the_one_the_methods_declare(tmp_path, tiny, compression, reference):
    steps = ["compression.steps=[{method: magnitude, sparsity: 0.5}, {method: dynamic_int8}]"] \
        if compression == "chain" else []
    metrics = run_config(tiny + [f"compression={compression}", *steps, "measure.latency_batch_sizes=[]",
                                 "measure.size=false"], tmp_path)
    assert metrics["measure/reference"] == reference
    assert 0 <= metrics["fidelity/agreement"] <= 1


# --- quantisation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [DynamicInt8(DynamicInt8Config()), DynamicInt8(DynamicInt8Config(backend="torchao")),
                                    WeightOnlyInt8(WeightOnlyInt8Config())], ids=["torch_ao", "torchao", "weight_only"])
def test_int8_outputs_stay_close_to_fp32(method):
    model = tiny_bert()
    expected = model(**INPUT).logits
    ctx = context(model)
    method.before_fit(ctx)
    method.after_fit(ctx)
    assert is_quantized(model)
    assert method.report["quantized_layers"] == 3 * 6 + 2  # block linears + pooler + classifier
    got = model(**INPUT).logits
    assert (got - expected).abs().max() < 0.02 * (1 + expected.abs().max())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_quantising_twice_is_refused_before_training(tmp_path, tiny):
    with pytest.raises(UserError, match=r"compression.steps\[1\].method='weight_only_int8' is not allowed: step 0 \('dynamic_int8'\) already quantises"):
        run_config(tiny + ["compression=chain",
                           "compression.steps=[{method: dynamic_int8}, {method: weight_only_int8}]"], tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_prune_then_quantise_chain_evaluates_the_int8_model(tmp_path, tiny):
    metrics = run_config(tiny + ["compression=chain", "measure.latency_batch_sizes=[4]",
                                 "compression.steps=[{method: magnitude, sparsity: 0.5}, {method: dynamic_int8}]"],
                         tmp_path)
    quantised = metrics["compression"][1]
    # 2 blocks x 6 linears + the pooler; the classifier LoRA trains and saves with the adapter stays float
    assert quantised["backend"] == "torch_ao" and quantised["quantized_layers"] == 13
    block_weights, pooler = 2 * (4 * 32 * 32 + 2 * 32 * 64), 32 * 32  # half of the block weights were pruned
    assert quantised["zero_fraction_before"] == pytest.approx(0.5 * block_weights / (block_weights + pooler), abs=0.005)
    assert quantised["zero_fraction_int8"] >= quantised["zero_fraction_before"]  # pruned weights stay zero in int8
    assert metrics["size/compressed_format"] == "torch.save"
    assert metrics["fidelity/agreement"] >= 0.9
    assert metrics["latency/bs4/speedup"] > 0


# --- weight sharing and low rank --------------------------------------------------------------------------

def test_weight_sharing_ties_parameters_and_trains_them_once():
    model = tiny_bert(layers=4)
    before = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.bert.encoder.layer[0].parameters())
    first = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    second = model.bert.encoder.layer[1].attention.self.query.weight.detach().clone()
    method = WeightSharing(WeightSharingConfig(groups=[[0, 1], [2, 3]]))
    method.before_fit(context(model))
    layers = model.bert.encoder.layer
    assert layers[1].attention.self.query.weight is layers[0].attention.self.query.weight
    assert layers[3].output.dense.weight is layers[2].output.dense.weight
    assert layers[2].attention.self.query.weight is not layers[0].attention.self.query.weight
    assert torch.allclose(layers[0].attention.self.query.weight, (first + second) / 2)
    assert sum(p.numel() for p in model.parameters()) == before - 2 * per_block
    model(**calibration()[0]).loss.backward()
    assert layers[1].attention.self.query.weight.grad is layers[0].attention.self.query.weight.grad


def test_weight_sharing_bad_groups():
    with pytest.raises(UserError, match="do not exist"):
        WeightSharing(WeightSharingConfig(groups=[[0, 9]])).before_fit(context(tiny_bert()))


def test_svd_factorisation_reconstructs_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    x = torch.randn(5, 16)
    full = factorize(linear, 12)
    assert torch.allclose(full(x), linear(x), atol=1e-5)
    with torch.no_grad():  # an exactly rank-3 weight is reproduced by rank 3
        linear.weight.copy_(torch.randn(12, 3) @ torch.randn(3, 16))
    low = factorize(linear, 3)
    assert low[0].weight.shape == (3, 16) and low[1].weight.shape == (12, 3)
    assert torch.allclose(low(x), linear(x), atol=1e-4)
    assert energy_rank(torch.linalg.svdvals(linear.weight), 0.999) <= 3
    assert energy_rank(torch.tensor([3.0, 1.0, 1.0]), 0.9) == 2  # 9/11 < 0.9 <= 10/11


def test_low_rank_replaces_linears_by_two_and_refuses_ranks_that_grow_layers():
    model = tiny_bert(layers=1)
    method = LowRank(LowRankConfig(rank=4))
    method.before_fit(context(model))
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, nn.Sequential) and query[0].weight.shape == (4, 32)
    assert method.report["factorized_layers"] == 6
    with pytest.raises(UserError, match="factorises no layer"):
        LowRank(LowRankConfig(rank=32)).before_fit(context(tiny_bert(layers=1)))

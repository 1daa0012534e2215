"""Every combination runs or is refused: the generated composition matrix, and one test per composition defect
it found (each fails with the defect back in place)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from llmk_lab import matrix
from llmk_lab.errors import UserError
from tests.conftest import ROOT, read_metrics

# Cheap runs for the defect tests: the matrix's tiny settings.
FAST = matrix.BASE + matrix.TASKS["sequence_classification"]


def run_fast(overrides: list[str], run_dir: Path) -> dict:
    from llmk_lab.run import run

    run_dir.mkdir(parents=True, exist_ok=True)
    return run(matrix.compose(FAST + overrides), run_dir)


def merged_state(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "merged" / "model.safetensors"))


# --- the matrix ------------------------------------------------------------------------------------------------

def test_the_cells_come_from_the_registries_and_the_quick_ones_run_every_method_of_every_task():
    compressions, pefts = matrix.registered()
    cells = matrix.cells()
    # Generated from the registries: a newly registered method adds its cells.
    sliced = len(pefts) + len(compressions) - 1
    assert len(cells) == len(compressions) * len(pefts) + (len(matrix.TASKS) - 1) * sliced
    quick = matrix.quick_cells()
    assert len(set(quick)) == len(quick) and set(quick) <= set(cells)
    # The full task: every method once, each with a partner it runs with where it has one.
    full = [c for c in quick if c.task == matrix.FULL_TASK]
    assert len(full) == max(len(compressions), len(pefts))
    assert {c.compression for c in full} == set(compressions) and {c.peft for c in full} == set(pefts)
    for cell in full:
        if matrix.refusals(cell)[1] is not None:
            assert all(matrix.refusals(c)[1] is not None for c in cells if c.compression == cell.compression
                       and c.task == cell.task), cell
    # The sliced tasks between them: every method once, every task some of them.
    sliced = [c for c in quick if c.task != matrix.FULL_TASK]
    assert {c.compression for c in sliced} == set(compressions) and {c.peft for c in sliced} == set(pefts)
    assert {c.task for c in sliced} == set(matrix.TASKS) - {matrix.FULL_TASK}
    assert len(quick) < len(cells) // 4
    # A cell's config is joined from a few compositions; it is the one Hydra composes for the cell.
    for cell in (matrix.Cell(matrix.FULL_TASK, "chain", "adalora"), matrix.Cell(matrix.FULL_TASK, "low_rank", "bitfit"),
                 matrix.Cell("token_classification", "wanda", "lora"), matrix.Cell("causal_lm", "magnitude", "prefix")):
        joined, composed = matrix.cell_config(cell), matrix.compose(cell.overrides(True))
        assert OmegaConf.to_yaml(joined) == OmegaConf.to_yaml(composed), cell
        for node in ("compression", "peft"):  # the schemas' types too (what validates an assignment)
            assert OmegaConf.get_type(joined[node]) is OmegaConf.get_type(composed[node]), (cell, node)


# The quick tier runs a share of the cells that runs every method of every task; the full suite runs the rest.
@pytest.mark.parametrize("tier", ["quick", pytest.param("rest", marks=pytest.mark.slow)])
def test_every_registered_combination_passes_its_invariants_or_is_refused_in_plan(tmp_path, capsys, tier):
    quick = matrix.quick_cells()
    selection = quick if tier == "quick" else [c for c in matrix.cells() if c not in set(quick)]
    outcomes = matrix.run_matrix(workdir=tmp_path, selection=selection)
    assert len(outcomes) == len(selection)
    with capsys.disabled():
        print(f"\ncomposition matrix ({tier}): {len(outcomes)} cells")
        for outcome in outcomes:
            print("  " + outcome.line())
    failed = [o.line() for o in outcomes if o.status == "failed"]
    assert not failed, "\n".join(failed)
    for outcome in outcomes:
        if outcome.status == "refused":
            line, cell = outcome.detail, outcome.cell
            assert "\n" not in line
            if line.endswith("(at model set-up)"):  # the model's architecture refuses one option, named
                assert cell.peft in line or cell.compression in line or "compression." in line, line
                continue
            # One line naming both options: the compression method and the PEFT strategy (or the export).
            assert cell.compression in line or cell.compression == "chain", line
            assert cell.peft in line or "export.merged" in line, line
    passed = [o for o in outcomes if o.status.startswith("passed")]
    assert len(passed) > len(outcomes) // 2
    # The merged-export invariants really ran: some cells compared sparsity per layer and logits.
    assert any(o.checks.get("layers_checked_for_sparsity") for o in passed)
    assert any("merged_max_logit_gap" in o.checks for o in passed)


def test_readme_table_is_the_one_the_registries_generate():
    text = (ROOT / "README.md").read_text()
    assert matrix.readme_section(text) == matrix.markdown(), \
        "README's composition table is stale: run python -m llmk_lab.matrix --write-readme README.md"


# --- defects found by the matrix ---------------------------------------------------------------------------------

def test_1_weight_sharing_with_lora_merges_each_blocks_update_into_its_own_weight(tmp_path):
    metrics = run_fast(["compression=weight_sharing", "peft=lora", "export.merged=true"], tmp_path)
    assert metrics["export/merged_max_logit_diff"] < 1e-4
    state = merged_state(tmp_path)
    # Shared before training, different after merging: block 0 and block 1 each got their own update.
    a, b = (state[f"bert.encoder.layer.{i}.attention.self.query.weight"] for i in (0, 1))
    assert not torch.equal(a, b)


def test_2_weight_only_int8_runs_to_the_end_and_counts_its_int8_weights(tmp_path):
    plain = run_fast(["compression=none", "peft=lora"], tmp_path / "plain")
    metrics = run_fast(["compression=weight_only_int8", "peft=lora"], tmp_path / "int8")
    assert "test/acc" in read_metrics(tmp_path / "int8")
    assert metrics["params/total"] == plain["params/total"]
    assert 0 < metrics["params/nonzero"] <= metrics["params/total"]


def test_3_adapters_survive_dynamic_int8(tmp_path):
    from llmk_lab.compression.quantization import DynamicInt8, DynamicInt8Config
    from llmk_lab.peft.adapter import ADAPTER, AdapterConfig, insert_adapters
    from tests.test_compression_methods import INPUT, tiny_bert

    model = tiny_bert()
    insert_adapters(model, AdapterConfig(bottleneck=4, init_std=0.5))
    sites = [n for n, m in model.named_modules() if hasattr(m, ADAPTER)]
    DynamicInt8(DynamicInt8Config()).quantize(model, [n for n, m in model.named_modules() if type(m) is nn.Linear])
    for name in sites:
        assert hasattr(model.get_submodule(name), ADAPTER), name
    with_adapters = model(**INPUT).logits
    for name in sites:  # switching the adapters off must change what the int8 model predicts
        model.get_submodule(name)._forward_hooks.clear()
    assert not torch.allclose(with_adapters, model(**INPUT).logits)
    metrics = run_fast(["compression=dynamic_int8", "peft=adapter", "peft.bottleneck=8"], tmp_path)
    assert "test/acc" in metrics


def test_4_weight_sharing_merged_export_saves_and_reloads(tmp_path):
    metrics = run_fast(["compression=weight_sharing", "peft=full", "export.merged=true"], tmp_path)
    assert metrics["export/merged_max_logit_diff"] < 1e-4
    state = merged_state(tmp_path)
    a, b = (state[f"bert.encoder.layer.{i}.attention.self.query.weight"] for i in (0, 1))
    assert torch.equal(a, b)  # still the one trained weight, stored per block


def test_5_low_rank_merged_export_is_refused_and_a_folder_with_random_layers_fails_the_check(tmp_path):
    from llmk_lab.plan import plan
    from llmk_lab.run import merged_logit_gap
    from tests.test_compression_methods import INPUT, tiny_bert

    with pytest.raises(UserError, match=r"export.merged=true .* compression.method='low_rank'"):
        plan(matrix.compose(FAST + ["compression=low_rank", "export.merged=true"]))
    # A folder whose weights do not fit the architecture reloads with random layers: the check refuses it.
    model = tiny_bert()
    model.bert.encoder.layer[0].attention.self.query = nn.Sequential(nn.Linear(32, 4), nn.Linear(4, 32))
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification

    batch = {**INPUT, "attention_mask": torch.ones_like(INPUT["input_ids"])}
    ctx = SimpleNamespace(model=model, task=SimpleNamespace(auto_class=AutoModelForSequenceClassification),
                          datamodule=SimpleNamespace(val_dataloader=lambda: [batch]))
    with pytest.raises(RuntimeError, match="does not reload"):
        merged_logit_gap(ctx, tmp_path)


def test_6_parameter_counts_include_packed_int8_weights():
    from llmk_lab.measure import parameter_counts
    from tests.test_compression_methods import tiny_bert

    model = tiny_bert()
    before = parameter_counts(model)
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    after = parameter_counts(model)
    assert after["total"] == before["total"]
    assert after["nonzero"] > 0.9 * before["nonzero"]


def test_7_the_adapter_of_a_pruned_run_reproduces_it_on_the_pruned_base(tmp_path):
    """IA3 over pruned weights: its adapter on the pruned base is the run's model. (A pruned LoRA run ships no
    adapter: its masked update is not what plain peft computes; tests/test_export.py.)"""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from llmk_lab.masks import load_pruned_base
    from tests.test_compression_methods import INPUT

    from transformers import BertConfig, BertForSequenceClassification

    # A base model anyone can load again, with the tokenizer's vocabulary.
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    run_fast(["compression=magnitude", "compression.sparsity=0.5", "peft=ia3", "export.merged=true",
              f"model.name_or_path={tmp_path / 'base'}", "model.from_config=null"], tmp_path / "run")
    batch = {**INPUT, "attention_mask": torch.ones_like(INPUT["input_ids"])}
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "merged").eval()
    expected = merged(**batch).logits
    adapter = tmp_path / "run" / "adapter"

    def with_adapter(restore: bool) -> torch.Tensor:
        base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
        if restore:
            load_pruned_base(base, adapter)
        return PeftModel.from_pretrained(base, adapter).eval()(**batch).logits

    restored = float((with_adapter(restore=True) - expected).abs().max())
    assert restored < 1e-5
    # The adapter alone on the unpruned base is another model: what the pruned base file is for.
    assert float((with_adapter(restore=False) - expected).abs().max()) > 10 * max(restored, 1e-7)


def test_8_tied_lm_heads_train_with_head_only_strategies(tmp_path):
    from llmk_lab.run import run

    for peft in ("linear_probe", "top_layers", "adapter"):
        overrides = matrix.Cell("causal_lm", "none", peft).overrides(merged=False)
        (tmp_path / peft).mkdir()
        metrics = run(matrix.compose(overrides), tmp_path / peft)
        assert "test/perplexity" in metrics and metrics["params/trainable"] > 0, peft


def test_9_movement_scores_count_each_micro_batch_once_with_gradient_accumulation():
    from llmk_lab.compression.movement import MovementConfig, MovementScores

    layer = nn.Linear(2, 2, bias=False)
    callback = MovementScores({"l": layer}, MovementConfig(sparsity=0.5, end_step=1, score_update="sum"), {})
    g1, g2 = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    # Two micro-batches of one optimiser step: the gradient accumulates, then the optimiser steps once.
    layer.weight.grad = g1.clone()
    callback.on_after_backward(None, None)
    layer.weight.grad = g1 + g2
    callback.on_after_backward(None, None)
    callback.on_before_optimizer_step(None, None, None)
    assert torch.allclose(callback.movement["l"], -(layer.weight.detach() * (g1 + g2)))


def test_10_structured_importance_does_not_depend_on_the_new_heads_seed():
    from llmk_lab.compression.structured import StructuredConfig, StructuredPruning
    from tests.test_compression_methods import context, tiny_bert

    removed = []
    for seed in (1, 2, 3):
        model = tiny_bert()
        torch.manual_seed(seed)
        model.classifier.reset_parameters()  # a newly initialised head, other seed
        method = StructuredPruning(StructuredConfig(head_ratio=0.5, neuron_ratio=0.25, importance="gradient"))
        method.before_fit(context(model))
        removed.append(method.report["heads_removed"])
        assert "fitted" in method.report["importance_scored_with"]
    assert removed[0] == removed[1] == removed[2]


def test_11_ia3_vectors_and_soft_prompts_are_not_weight_decayed(tmp_path, monkeypatch):
    from llmk_lab import module as module_file

    groups = {}

    def spy(self):
        result = original(self)
        decayed = {id(p) for g in result["optimizer"].param_groups if g["weight_decay"] > 0 for p in g["params"]}
        groups[self.task.registered_name] = [n for n, p in self.model.named_parameters() if id(p) in decayed]
        return result

    original = module_file.TaskModule.configure_optimizers
    monkeypatch.setattr(module_file.TaskModule, "configure_optimizers", spy)
    for peft, marker in (("ia3", "ia3_l"), ("prompt", "prompt_encoder")):
        groups.clear()
        run_fast([f"peft={peft}", "compression=none", "peft.num_virtual_tokens=4" if peft == "prompt" else
                  "train.weight_decay=0.1"], tmp_path / peft)
        decayed = next(iter(groups.values()))
        assert not [n for n in decayed if marker in n], peft


def test_12_gradual_schedule_ends_before_training_ends(tmp_path):
    from llmk_lab.compression.gradual import default_end_step

    assert default_end_step(100, 0) == 75 and default_end_step(100, 20) == 80
    assert all(default_end_step(total, 0) < total for total in range(2, 50))
    metrics = run_fast(["compression=gradual_magnitude", "peft=full", "compression.frequency=1",
                        "train.max_steps=-1", "data.limit_train=64"], tmp_path)
    report = metrics["compression"][0]
    assert report["schedule_end_step"] < metrics["train/steps"]
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.7, abs=0.01)


def test_13a_lora_over_pruned_weights_merges_to_the_pruned_model_without_re_masking(tmp_path):
    metrics = run_fast(["compression=magnitude", "compression.sparsity=0.5", "peft=lora", "export.merged=true"],
                       tmp_path)
    # Measured on the merged model as merged (nothing re-masked): exactly the requested sparsity.
    assert metrics["sparsity/after_merge"] == pytest.approx(0.5, abs=0.002)
    assert metrics["export/merged_max_logit_diff"] < 1e-4
    state = merged_state(tmp_path)
    for name, fraction in metrics["sparsity_per_layer_after_merge"].items():
        weight = state[f"{name}.weight"]
        assert float((weight == 0).float().mean()) == pytest.approx(fraction, abs=1e-9)


def test_13b_the_distillation_term_is_in_the_training_loss():
    from llmk_lab.compression.distillation import Distillation, DistillationConfig

    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    method = Distillation(DistillationConfig(teacher="given", alpha=0.25, temperature=2.0))
    method.teacher = lambda **b: SimpleNamespace(logits=teacher(b["x"]))
    term = method.loss_term(SimpleNamespace(task=SimpleNamespace(logits=lambda outputs: outputs.logits)))
    x = torch.randn(5, 4)
    batch = {"x": x}
    student = SimpleNamespace(logits=torch.randn(5, 3))
    task_loss = torch.tensor(0.9)
    total = term(batch, student, task_loss)
    with torch.no_grad():  # by hand: alpha * task + (1 - alpha) T^2 mean_batch KL(teacher_T || student_T)
        p, log_q = torch.softmax(teacher(x) / 2.0, -1), torch.log_softmax(student.logits / 2.0, -1)
        kl = (p * (p.log() - log_q)).sum(-1).mean()
    assert float(total) == pytest.approx(float(0.25 * task_loss + 0.75 * 4.0 * kl), rel=1e-5)
    assert abs(float(total) - 0.25 * 0.9) > 1e-3  # the KL part is there, not only the weighted task loss


def test_14_a_failure_after_training_keeps_what_was_measured(tmp_path, monkeypatch):
    from llmk_lab import run as run_module

    def broken_export(ctx, strategy, trainer):
        raise OSError("disk full")

    monkeypatch.setattr(run_module, "export", broken_export)
    with pytest.raises(OSError, match="disk full"):
        run_fast(["compression=magnitude", "peft=lora"], tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics["failed_stage"] == "export" and "disk full" in metrics["error"]
    assert "test/acc" in metrics and "sparsity/pruned_layers" in metrics and "params/total" in metrics


def test_15_method_yaml_defaults_are_the_schema_defaults():
    """The schema is the one source of truth: a method's YAML (and the top config's sections) may only restate
    its defaults, so `compression.X` means the same whether it comes from YAML or from a chain step."""
    from llmk_lab.compression import COMPRESSION
    from llmk_lab.config import RunConfig
    from llmk_lab.peft import PEFT

    disagree = []
    for registry, group in ((COMPRESSION, "compression"), (PEFT, "peft")):
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text()) or {}
            if path.stem != node.get("method"):
                continue  # a named variant of a method (magnitude_nm) sets other values on purpose
            defaults = registry.get(node["method"]).config()
            disagree += [f"{path.name}: {k}={v!r}, schema {getattr(defaults, k)!r}" for k, v in node.items()
                         if k != "defaults" and getattr(defaults, k) != v]
    sections = {f.name: f.default_factory() for f in dataclasses.fields(RunConfig)
                if f.default_factory is not dataclasses.MISSING}
    top = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    for section, values in top.items():
        if section in sections and isinstance(values, dict):
            disagree += [f"config.yaml {section}.{k}={v!r}, schema {getattr(sections[section], k)!r}"
                         for k, v in values.items() if getattr(sections[section], k) != v]
    assert not disagree, disagree

"""PEFT strategies on the tiny BERT (2 layers, width 32, feed-forward 64, 2 labels).

For each strategy: the trainable-parameter count equals the method's formula,
everything it freezes is bit-for-bit unchanged after training, the head
trains, merging (where possible) gives the same predictions, and bad input
gets one clear line.
"""
from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from llmk_lab.errors import UserError
from llmk_lab.peft import PEFT
from tests.conftest import compose_config, read_metrics, run_cli, run_config

LAYERS, D, FF, HEAD = 2, 32, 64, 32 * 2 + 2
# (d_in, d_out) of the six block linears: query, key, value, attention output, intermediate, output.
BLOCK_LINEARS = [(D, D)] * 4 + [(D, FF), (FF, D)]
PER_LAYER = 4 * (D * D + D) + (D * FF + FF) + (FF * D + D) + 2 * 2 * D  # linears + 2 LayerNorms
POOLER = D * D + D
# LoRA-style updates also adapt BERT's pooler (d x d) by default.
LOW_RANK_TARGETS = LAYERS * BLOCK_LINEARS + [(D, D)]

QUICK = ["compression=none", "data.limit_train=32", "train.batch_size=8"]

FORMULAS = {
    "linear_probe": ([], HEAD),
    "lora": (["peft.r=4"], sum(4 * (i + o) for i, o in LOW_RANK_TARGETS) + HEAD),
    # init_r (d_in + d_out + 1): P, Q and the singular values.
    "adalora": (["peft.init_r=6", "peft.target_r=2", "peft.tinit=0", "peft.tfinal=1", "peft.deltaT=1"],
                sum(6 * (i + o + 1) for i, o in LOW_RANK_TARGETS) + HEAD),
    # keys and values scaled at their output (d each), FFN activations at the down-projection's input (FF).
    "ia3": ([], LAYERS * (D + D + FF) + HEAD),
    # one key and one value vector per virtual token and layer.
    "prefix": (["peft.num_virtual_tokens=5"], 5 * LAYERS * 2 * D + HEAD),
    "prompt": (["peft.num_virtual_tokens=5"], 5 * D + HEAD),
    # two adapters per layer (2 d b + b + d each) and the two block LayerNorms (2 d each).
    "adapter": (["peft.bottleneck=8"], LAYERS * 2 * (2 * D * 8 + 8 + D) + LAYERS * 2 * 2 * D + HEAD),
    "top_layers": (["peft.num_layers=1"], PER_LAYER + POOLER + HEAD),
    # biases: q, k, v, attention output, 2 LayerNorms, output (d each) and intermediate (FF) per layer;
    # embedding LayerNorm and pooler (d each); the head.
    "bitfit": ([], LAYERS * (7 * D + FF) + D + D + HEAD),
}


def watch_apply(monkeypatch, method: str) -> dict:
    """Record the adapted model and a copy of its frozen and trainable tensors right after `apply`."""
    cls = PEFT.get(method).cls
    original = cls.apply
    seen: dict = {}

    def apply(self, model, ctx):
        adapted = original(self, model, ctx)
        seen["model"] = adapted
        seen["frozen"] = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
        seen["trainable"] = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
        return adapted

    monkeypatch.setattr(cls, "apply", apply)
    return seen


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_strategy_trains_what_its_formula_says_and_nothing_else(tmp_path, tiny, monkeypatch, method):
    extra, expected = FORMULAS[method]
    seen = watch_apply(monkeypatch, method)
    metrics = run_config(tiny + QUICK + [f"peft={method}", *extra], tmp_path)

    assert metrics["params/trainable"] == expected
    assert metrics["params/trainable_fraction"] == pytest.approx(expected / metrics["params/total"])
    model = seen["model"]
    now = dict(model.named_parameters())
    changed_frozen = [n for n, before in seen["frozen"].items() if not torch.equal(now[n], before)]
    assert changed_frozen == []
    trained = [n for n, before in seen["trainable"].items() if not torch.equal(now[n], before)]
    assert any("classifier" in n for n in trained), "the task head did not train"
    assert len(trained) > 2 or method == "linear_probe", f"only the head moved: {trained}"
    for key in ("train/examples_per_s", "train/peak_memory_mb"):
        assert metrics[key] > 0


def test_full_fine_tuning_trains_everything(tmp_path, tiny):
    metrics = run_config(tiny + QUICK + ["peft=full"], tmp_path)
    assert metrics["params/trainable"] == metrics["params/total"]


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("method, extra", [
    ("lora", ["peft.r=4"]), ("lora", ["peft.use_dora=true"]), ("ia3", []),
    ("adalora", FORMULAS["adalora"][0]), ("bitfit", []), ("top_layers", ["peft.num_layers=1"]),
])
def test_merged_export_loads_with_from_pretrained_and_predicts_the_same(tmp_path, tiny, monkeypatch, method, extra):
    seen = watch_apply(monkeypatch, method)
    metrics = run_config(tiny + QUICK + [f"peft={method}", "export.merged=true", *extra], tmp_path)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged).__module__.startswith("transformers.")
    batch = _batch(tmp_path)
    assert torch.allclose(_logits(seen["model"], batch), _logits(merged, batch), atol=1e-5)
    assert metrics["export/merged_max_logit_diff"] < 1e-4


def _batch(tmp_path):
    from llmk_lab.data import load_data
    from llmk_lab.data.module import TaskDataModule
    from llmk_lab.models import load_tokenizer
    from llmk_lab.plan import plan
    from llmk_lab.tasks import get_task

    settings = plan(compose_config(["model=tiny_bert", "data.limit_eval=32"])).settings
    raw = load_data(settings.data)
    tokenizer = load_tokenizer(settings.model)
    dm = TaskDataModule(raw, get_task(raw.task, raw.labels), tokenizer, settings.data, settings.train, 0)
    return next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("method, extra", [("ia3", []), ("adalora", FORMULAS["adalora"][0])])
def test_pruned_weights_stay_zero_after_training_and_merge(tmp_path, tiny, method, extra):
    metrics = run_config(tiny + ["data.limit_train=32", "train.batch_size=8", "compression=magnitude",
                                 "compression.sparsity=0.6", f"peft={method}", "export.merged=true", *extra],
                         tmp_path)
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.6, abs=0.005)
    assert metrics["sparsity/after_merge"] == pytest.approx(0.6, abs=0.005)
    # The trained (masked) model and the exported merged one agree, so the masks held in training too.
    assert metrics["export/merged_max_logit_diff"] < 1e-4


def test_adalora_reallocates_rank_every_step_and_logs_the_budget(tmp_path, tiny):
    # 64 examples / 8 = 8 optimiser steps; 13 adapted matrices (2 layers x 6, and the pooler):
    # the budget falls from 13 x 6 = 78 to 13 x 2 = 26.
    metrics = run_config(tiny + ["compression=none", "train.batch_size=8", "peft=adalora", "peft.init_r=6",
                                 "peft.target_r=2", "peft.tinit=1", "peft.tfinal=2", "peft.deltaT=1"], tmp_path)
    assert metrics["peft/rank_budget_initial"] == 78
    assert metrics["peft/rank_budget_final"] == 26
    assert metrics["peft/rank_in_use_final"] == 26
    assert sum(metrics["peft_ranks_per_layer"].values()) == 26
    import csv

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    budgets = [float(r["peft/rank_budget"]) for r in rows if r.get("peft/rank_budget")]
    assert len(budgets) == 8  # once per optimiser step
    assert budgets[0] == 78 and budgets[-1] == 26 and budgets == sorted(budgets, reverse=True)


def test_adalora_defaults_survive_a_fast_dev_run(tmp_path, tiny):
    # One step cannot hold the default schedule (tinit=10, tfinal=10); a smoke run must still pass.
    metrics = run_config(tiny + QUICK + ["peft=adalora", "train.fast_dev_run=true"], tmp_path)
    assert metrics["train/steps"] == 1


def test_adapter_export_round_trips(tmp_path, tiny, monkeypatch):
    from llmk_lab.models import load_model, load_tokenizer
    from llmk_lab.peft.adapter import AdapterConfig, BottleneckAdapters, load_adapter
    from llmk_lab.tasks import get_task

    seen = watch_apply(monkeypatch, "adapter")
    run_config(tiny + QUICK + ["peft=adapter", "peft.bottleneck=4"], tmp_path)
    # The run ships no adapter/ (plain peft and transformers cannot rebuild these adapters); llmk_lab's own
    # save and load still round-trip.
    assert not (tmp_path / "adapter").exists()
    BottleneckAdapters(AdapterConfig(bottleneck=4)).save_adapter(seen["model"], tmp_path / "adapter")
    settings = compose_config(["model=tiny_bert"])
    task = get_task("sequence_classification", ["negative", "positive"])
    fresh, _ = load_model(settings.model, task, load_tokenizer(settings.model))
    # The exported tensors cover only what trained; the frozen ones come from the same base.
    fresh.load_state_dict({n: p for n, p in seen["model"].state_dict().items() if "bottleneck_adapter" not in n},
                          strict=False)
    load_adapter(fresh, tmp_path / "adapter", AdapterConfig(bottleneck=4))
    batch = _batch(tmp_path)
    assert torch.equal(_logits(seen["model"], batch), _logits(fresh, batch))


def test_adapter_and_top_layers_work_on_llama(tiny):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_labels=2, pad_token_id=0)
    ctx = types.SimpleNamespace(task=types.SimpleNamespace(head_modules=("classifier", "score")), reports={})
    batch = {"input_ids": torch.randint(1, 64, (2, 5)), "labels": torch.tensor([0, 1])}
    for method, node, expected in [
        ("adapter", {"bottleneck": 4}, 2 * 2 * (2 * 32 * 4 + 4 + 32) + 2 * 2 * 32 + 32 * 2),
        ("top_layers", {"num_layers": 1}, None),
    ]:
        model = LlamaForSequenceClassification(config)
        strategy = PEFT.build({"method": method, **node}, "peft")
        model = strategy.apply(model, ctx)
        model(**batch).loss.backward()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if expected is None:  # one block, the final norm, the score head
            expected = sum(p.numel() for p in model.model.layers[1].parameters()) + 32 + 32 * 2
        assert trainable == expected, method


@pytest.mark.parametrize("overrides, key", [
    (["peft=lora", "peft.r=0"], "peft.r=0"),
    (["peft=adalora", "peft.init_r=4", "peft.target_r=8"], "peft.target_r=8"),
    (["peft=lora", "peft.target_modules=[no_such_layer]"], "peft.target_modules"),
    (["peft=ia3", "peft.target_modules=.*nothing$"], "peft.target_modules"),
    (["peft=adapter", "peft.target_modules=[no_such_layer]"], "peft.target_modules"),
    (["peft=prefix", "export.merged=true"], "export.merged=true"),
    (["peft=prompt", "export.merged=true"], "export.merged=true"),
    (["peft=adapter", "export.merged=true"], "export.merged=true"),
    (["peft=top_layers", "peft.num_layers=3"], "peft.num_layers=3"),
    (["peft=prefix", "peft.num_virtual_tokens=0"], "peft.num_virtual_tokens=0"),
    (["peft=adalora", "peft.tinit=5", "peft.tfinal=5"], "peft.tinit=5"),
])
def test_bad_peft_input_is_one_clear_error(tmp_path, tiny, overrides, key):
    with pytest.raises(UserError) as err:
        run_config(tiny + QUICK + overrides, tmp_path)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_prefix_on_a_model_peft_cannot_serve_is_one_line(tmp_path, tiny, monkeypatch):
    # Stand-in for an architecture without key/value caching: its forward refuses past_key_values.
    from transformers.models.bert import modeling_bert

    original = modeling_bert.BertModel.forward

    def forward(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_bert.BertModel, "forward", forward)
    with pytest.raises(UserError, match=r"peft=prefix cannot serve model type 'bert'"):
        run_config(tiny + QUICK + ["peft=prefix"], tmp_path)


@pytest.mark.slow
def test_lora_rank_sweep_through_the_cli(tmp_path):
    result = run_cli(["-m", "peft=lora", "peft.r=2,8", "model=tiny_bert", "logger=csv", "data.limit_train=64",
                      "data.limit_eval=32", "compression=none", "export.checkpoint=false",
                      "hydra.sweep.dir=sweep"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {}
    for metrics_file in (tmp_path / "sweep").glob("*/metrics.json"):
        metrics = read_metrics(metrics_file.parent)
        runs[compose_overrides_rank(metrics_file.parent)] = metrics["params/trainable"]
    assert set(runs) == {2, 8}
    per_rank = sum(i + o for i, o in LOW_RANK_TARGETS)
    assert runs[8] - runs[2] == (8 - 2) * per_rank
    assert runs[2] == 2 * per_rank + HEAD


def compose_overrides_rank(run_dir) -> int:
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["peft"]["r"])

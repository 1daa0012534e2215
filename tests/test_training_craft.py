"""Training craft: TensorBoard, early stopping, layer-wise LR decay, adaptive weight decay,
adversarial training and cross-layer pooling, each on a tiny model."""
from __future__ import annotations

import pytest
import torch

from llmk_lab.errors import UserError
from llmk_lab.plan import plan
from tests.conftest import compose_config, read_metrics, run_config

# Training long enough to log a few steps.
STEPS = ["train.log_every_n_steps=1", "compression=none"]


def _scalars(event_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_writes_event_files_next_to_the_csv_log(tmp_path, tiny):
    run_config(tiny + STEPS + ["logger.kinds=[csv,tensorboard]"], tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(tmp_path.iterdir())
    scalars = _scalars(tmp_path / "tensorboard")
    # 64 examples / batch 16 = 4 optimiser steps, each logged
    assert len(scalars["train/loss"]) == 4 and all(v > 0 for v in scalars["train/loss"])
    assert "val/acc" in scalars
    assert (tmp_path / "csv" / "metrics.csv").exists()
    # the config as hyperparameters with the final numbers as their metrics (TensorBoard's HParams view)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    final = read_metrics(tmp_path)
    assert scalars["test/acc"][-1] == pytest.approx(final["test/acc"])
    assert scalars["params/trainable"] == [final["params/trainable"]]  # only the summary logs it


def test_logger_options_compose_and_several_kinds_are_active_at_once():
    assert plan(compose_config(["logger=tensorboard"])).settings.logger.active == ["tensorboard"]
    assert plan(compose_config(["logger=csv"])).settings.logger.active == []
    both = plan(compose_config(["logger.kinds=[wandb,tensorboard]"])).settings.logger
    assert both.active == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match=r"logger\.kinds=\['wandb', 'tb'\].*allowed"):
        plan(compose_config(["logger.kinds=[wandb,tb]"]))


def test_logger_none_writes_no_per_step_log_and_logger_csv_does(tmp_path, tiny):
    for kind in ("csv", "none"):
        overrides = [o for o in tiny if not o.startswith("logger=")] + STEPS + [f"logger={kind}"]
        metrics = run_config(overrides, tmp_path / kind)
        assert "test/acc" in metrics and (tmp_path / kind / "metrics.json").exists(), kind
    assert (tmp_path / "csv" / "csv" / "metrics.csv").exists()
    assert not (tmp_path / "none" / "csv").exists()
    with pytest.raises(UserError, match=r"logger\.kinds=\['none', 'wandb'\].*\[none\], not both"):
        plan(compose_config(["logger.kinds=[none,wandb]"]))


def _epoch_values(run_dir, key: str) -> list[float]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_early_stopping_stops_and_the_best_checkpoint_is_what_gets_tested(tmp_path, tiny):
    # min_delta larger than any change: no epoch after the first counts as an improvement, so
    # training stops after 1 + patience epochs; the checkpoint keeps the lowest val/loss regardless.
    metrics = run_config(tiny + STEPS + ["peft=full", "train.lr=0.05", "train.max_epochs=6", "train.monitor=val/loss",
                                         "train.early_stopping_patience=2", "train.early_stopping_min_delta=10"],
                         tmp_path)
    assert metrics["train/epochs_run"] == 3 and metrics["train/stopped_early"] is True
    per_epoch = _epoch_values(tmp_path, "val/loss")[:3]  # the fit's validations; the 4th is the final evaluation
    best = min(range(3), key=per_epoch.__getitem__)
    assert metrics["train/best_epoch"] == best + 1
    assert metrics["train/best_score"] == pytest.approx(per_epoch[best])
    # The final validation ran on the restored weights: it reproduces the selected epoch's value.
    assert metrics["val/loss"] == pytest.approx(per_epoch[best], rel=1e-5)
    assert best != 2, f"the last epoch was the best ({per_epoch}): restoring would not be tested"


def test_a_monitored_name_the_task_does_not_log_is_one_line(tmp_path, tiny):
    with pytest.raises(UserError, match=r"train\.monitor='val/accuracy' .*allowed: \[.*'val/acc'"):
        run_config(tiny + STEPS + ["train.monitor=val/accuracy", "train.early_stopping_patience=1"], tmp_path)


def test_monitor_must_be_a_validation_metric():
    with pytest.raises(UserError, match=r"train\.monitor='test/acc'.*allowed"):
        plan(compose_config(["train.monitor=test/acc"]))
    with pytest.raises(UserError, match=r"train\.early_stopping_patience=2.*train\.monitor"):
        plan(compose_config(["train.early_stopping_patience=2"]))


def _capture_optimizer(monkeypatch) -> dict:
    from llmk_lab.module import TaskModule

    original, seen = TaskModule.configure_optimizers, {}

    def configure(self):
        result = original(self)
        seen.update(optimizer=result["optimizer"], model=self.model)
        return result

    monkeypatch.setattr(TaskModule, "configure_optimizers", configure)
    return seen


@pytest.mark.parametrize("peft", ["lora", "full"])
def test_layer_lr_decay_gives_block_i_base_times_decay_to_the_L_minus_i(tmp_path, tiny, monkeypatch, peft):
    import re

    seen = _capture_optimizer(monkeypatch)
    base, decay, layers = 0.01, 0.5, 2
    run_config(tiny + ["compression=none", f"peft={peft}", f"train.lr={base}", f"train.layer_lr_decay={decay}",
                       "train.max_steps=1"], tmp_path)
    name_of = {id(p): n for n, p in seen["model"].named_parameters()}
    expected_lrs, lora_blocks, counted = set(), set(), 0
    for group in seen["optimizer"].param_groups:
        for param in group["params"]:
            name = name_of[id(param)]
            block = re.search(r"\.layer\.(\d+)\.", name)
            if block:
                expected = base * decay ** (layers - int(block.group(1)))
                if "lora_" in name:
                    lora_blocks.add(int(block.group(1)))
            elif "embeddings" in name:
                expected = base * decay ** (layers + 1)  # the lowest rate
            else:
                expected = base  # pooler and classifier: the head
            assert group["initial_lr"] == pytest.approx(expected), name
            expected_lrs.add(round(expected, 12))
            counted += 1
    trainable = [p for p in seen["model"].parameters() if p.requires_grad]
    assert counted == len(trainable)  # every trainable tensor in exactly one group
    if peft == "lora":
        assert lora_blocks == {0, 1} and len(expected_lrs) == 3  # two blocks and the head; embeddings frozen
    else:
        assert len(expected_lrs) == 4
    # weight decay stays where it was: none on biases and norms
    assert all(g["weight_decay"] == 0 for g in seen["optimizer"].param_groups if g["params"][0].ndim < 2)


def test_adaptive_weight_decay_follows_its_formula_on_a_hand_made_step():
    from llmk_lab.training.regularization import adaptive_decay_step

    w1, w2 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # ||w|| = 5
    w1.grad, w2.grad = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])  # ||grad|| = 1
    first = adaptive_decay_step([w1, w2], lambda_awd=0.1, previous=None, average=0.1)
    assert first == pytest.approx(0.1 * 1 / 5)  # lambda_awd * ||grad|| / ||w||
    # the decay term joins the gradient: grad + lambda * w
    assert torch.allclose(w1.grad, torch.tensor([1.0 + 0.02 * 3, 0.0]))
    assert torch.allclose(w2.grad, torch.tensor([0.0, 0.02 * 4]))
    w1.grad, w2.grad = torch.tensor([0.0, 2.0]), torch.zeros(2)  # ||grad|| = 2: lambda_t = 0.04
    second = adaptive_decay_step([w1, w2], lambda_awd=0.1, previous=first, average=0.1)
    assert second == pytest.approx(0.1 * 0.02 + 0.9 * 0.04)  # running average of the coefficient
    assert torch.allclose(w1.grad, torch.tensor([second * 3, 2.0]))


def test_adaptive_weight_decay_and_dropout_in_a_run_log_the_effective_decay(tmp_path, tiny, monkeypatch):
    import csv

    from torch import nn

    seen = _capture_optimizer(monkeypatch)
    metrics = run_config(tiny + STEPS + ["train.adaptive_weight_decay=0.5", "train.dropout=0.3", "peft.dropout=0.1"], tmp_path)
    groups = seen["optimizer"].param_groups
    adaptive = [g for g in groups if g.get("adaptive_weight_decay")]
    assert adaptive and all(g["weight_decay"] == 0 for g in groups)  # the fixed decay is replaced, not added
    assert all(p.ndim >= 2 for g in adaptive for p in g["params"])  # biases and norms stay undecayed
    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = [float(r["train/effective_weight_decay"]) for r in csv.DictReader(f)
                  if r.get("train/effective_weight_decay")]
    assert len(logged) == metrics["train/steps"] == 4 and all(v > 0 for v in logged)
    assert len(set(logged)) > 1  # it adapts step by step
    dropouts = {n: m.p for n, m in seen["model"].named_modules() if isinstance(m, nn.Dropout)}
    assert {p for n, p in dropouts.items() if "lora_dropout" not in n} == {0.3}
    assert any("lora_dropout" in n and p == 0.1 for n, p in dropouts.items())  # peft.lora_dropout is its own knob


def test_label_smoothing_changes_the_training_loss_by_its_formula():
    from types import SimpleNamespace

    from torch import nn

    from llmk_lab.config import TrainConfig
    from llmk_lab.module import TaskModule
    from llmk_lab.tasks import get_task

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    labels = torch.tensor([0, 1])

    class Fixed(nn.Module):
        def forward(self, **batch):
            return SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))

    task = get_task("sequence_classification", ["neg", "pos"])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": labels}
    plain = TaskModule(Fixed(), task, TrainConfig()).training_step(batch, 0)
    smoothed = TaskModule(Fixed(), task, TrainConfig(label_smoothing=0.2)).training_step(batch, 0)
    logp = logits.log_softmax(-1)
    # (1 - eps) * NLL of the label + eps * mean over classes of -log p
    expected = (0.8 * -logp[[0, 1], labels] + 0.2 * -logp.mean(-1)).mean()
    assert plain == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))
    assert smoothed == pytest.approx(float(expected)) and smoothed != pytest.approx(float(plain))
    with pytest.raises(UserError, match=r"train\.label_smoothing=0\.1 .*'causal_lm'.*allowed"):
        TaskModule(Fixed(), get_task("causal_lm", None), TrainConfig(label_smoothing=0.1))


def _tiny_bert_module(**train):
    from transformers import BertConfig, BertForSequenceClassification

    from llmk_lab.config import TrainConfig
    from llmk_lab.module import TaskModule
    from llmk_lab.tasks import get_task

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config).train()
    module = TaskModule(model, get_task("sequence_classification", ["neg", "pos"]), TrainConfig(dropout=0.0, **train))
    batch = {"input_ids": torch.randint(0, 50, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    return module, batch


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_adversarial_step_raises_the_loss_and_leaves_the_embeddings_as_they_were(method):
    module, batch = _tiny_bert_module(adversarial=method, adversarial_epsilon=0.5, adversarial_steps=3)
    embeddings = module.model.get_input_embeddings().weight
    before = embeddings.detach().clone()
    clean = float(module.model(**batch).loss)  # dropout 0: the same clean loss the step sees
    loss = module.training_step(batch, 0)
    last = module.adversary.last
    assert last["clean_loss"] == pytest.approx(clean, rel=1e-5)
    assert last["adversarial_loss"] > clean  # the perturbation climbs the loss
    assert float(loss) == pytest.approx(last["clean_loss"] + last["adversarial_loss"], rel=1e-5)
    assert torch.equal(embeddings.detach(), before)  # the attack never writes into the embedding matrix
    norms = torch.linalg.vector_norm(module.adversary.last_delta.flatten(1), dim=1)
    if method == "fgm":
        assert torch.allclose(norms, torch.full_like(norms, 0.5), atol=1e-5)  # exactly epsilon per example
    else:
        assert bool((norms <= 0.5 + 1e-5).all())  # projected into the epsilon ball
    loss.backward()  # both losses reach the weights, the embedding matrix included
    assert embeddings.grad is not None and torch.equal(embeddings.detach(), before)


@pytest.mark.parametrize("peft", ["lora", "prompt", "adapter"])
def test_adversarial_training_under_peft_reports_its_cost(tmp_path, tiny, peft):
    metrics = run_config(tiny + STEPS + [f"peft={peft}", "train.adversarial=pgd", "train.adversarial_steps=2"],
                         tmp_path)
    assert metrics["train/adversarial_seconds"] > 0
    assert 0 < metrics["train/adversarial_seconds_per_step"] < metrics["train/seconds"]


def test_scalar_mix_weights_sum_to_one_and_receive_gradients():
    module, batch = _tiny_bert_module(pooling="mean", layer_mix="scalar_mix")
    head = module.model.cross_layer_head
    with torch.no_grad():
        head.mix.scalars.copy_(torch.tensor([0.3, -0.2, 0.5]))  # 2 blocks + embeddings
    outputs = module.model(**batch)
    assert outputs.logits.shape == (4, 2)
    assert float(head.mix.weights.sum()) == pytest.approx(1.0)
    outputs.loss.backward()
    assert head.mix.scalars.grad is not None and bool((head.mix.scalars.grad != 0).all())
    assert head.mix.gamma.grad is not None and float(head.mix.gamma.grad) != 0
    # the mix is what the formula says: gamma * sum_j softmax(w)_j h_j, mean-pooled, then the classifier
    hidden = module.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states
    weights = torch.softmax(torch.tensor([0.3, -0.2, 0.5]), 0)
    mixed = sum(w * h for w, h in zip(weights, hidden)).mean(1)
    head.eval()
    assert torch.allclose(module.model.eval()(**batch).logits, head.classifier(mixed), atol=1e-5)
    # the model's own classifier and pooler are bypassed, so frozen
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if "bert.pooler" in n
                   or n.startswith("classifier."))


@pytest.mark.parametrize("pooling, layer_mix", [("cls", "last"), ("max", "last"), ("last_token", "last_k"),
                                                ("mean", "last_k")])
def test_token_poolings_reduce_the_right_positions(pooling, layer_mix):
    module, batch = _tiny_bert_module(pooling=pooling, layer_mix=layer_mix, layer_mix_k=2)
    batch["attention_mask"][:, 7:] = 0  # three padding positions
    module.model.eval()
    hidden = module.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states
    states = torch.cat(hidden[-2:], -1) if layer_mix == "last_k" else hidden[-1]
    expected = {"cls": states[:, 0], "max": states[:, :7].max(1).values, "last_token": states[:, 6],
                "mean": states[:, :7].mean(1)}[pooling]
    head = module.model.cross_layer_head
    assert torch.allclose(module.model(**batch).logits, head.classifier(expected), atol=1e-5)
    outputs = module.model(**batch)
    assert float(outputs.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(outputs.logits,
                                                                                        batch["labels"])))


def test_scalar_mix_for_token_classification_scores_every_token():
    from transformers import BertConfig, BertForTokenClassification

    from llmk_lab.config import TrainConfig
    from llmk_lab.module import TaskModule
    from llmk_lab.tasks import get_task

    model = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64, num_labels=3))
    module = TaskModule(model.eval(), get_task("token_classification", ["O", "B-x", "I-x"]),
                        TrainConfig(layer_mix="scalar_mix"))
    labels = torch.tensor([[-100, 0, 1, 2, -100], [-100, 2, 0, -100, -100]])
    outputs = module.model(input_ids=torch.randint(0, 50, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long),
                           labels=labels)
    assert outputs.logits.shape == (2, 5, 3)
    assert float(outputs.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(
        outputs.logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)))
    outputs.loss.backward()
    assert bool((module.model.cross_layer_head.mix.scalars.grad != 0).all())
    with pytest.raises(UserError, match=r"train\.pooling='mean'.*token_classification"):
        TaskModule(BertForTokenClassification(model.config), get_task("token_classification", ["O", "B-x", "I-x"]),
                   TrainConfig(pooling="mean"))


@pytest.mark.parametrize("peft", ["lora", "ia3", "prompt", "bitfit"])
def test_a_pooled_head_trains_under_peft_strategies(tmp_path, tiny, monkeypatch, peft):
    seen = _capture_optimizer(monkeypatch)
    metrics = run_config(tiny + STEPS + [f"peft={peft}", "train.pooling=mean", "train.layer_mix=scalar_mix",
                                         "train.lr=0.05"], tmp_path)
    head = seen["model"].cross_layer_head
    optimised = {id(p) for g in seen["optimizer"].param_groups for p in g["params"]}
    assert all(id(p) in optimised and p.requires_grad for p in head.parameters())
    assert not torch.allclose(head.mix.scalars.detach(), torch.zeros(3))  # the mix weights moved in training
    assert float(head.mix.weights.sum()) == pytest.approx(1.0)
    assert "val/acc" in metrics and "merged" not in metrics["exports"]


def test_a_pooled_head_refuses_merged_export_in_one_line():
    with pytest.raises(UserError, match=r"export\.merged=true is not possible with a cross-layer head"):
        plan(compose_config(["train.pooling=cls", "export.merged=true"]))
    with pytest.raises(UserError, match=r"train\.layer_mix='all'.*allowed"):
        plan(compose_config(["train.layer_mix=all"]))


# Every option at once, on the smallest budget that still validates twice (early stopping needs two epochs).
ALL_ON = ["logger=csv", "train.log_every_n_steps=1", "data.limit_train=16", "data.limit_eval=8", "train.batch_size=8", "train.eval_batch_size=8",
          "train.max_epochs=2", "export.checkpoint=false", "measure.latency_batch_sizes=[]", "measure.size=false",
          "measure.fidelity=false", "train.monitor=val/acc", "train.early_stopping_patience=1",
          "train.layer_lr_decay=0.8", "train.adaptive_weight_decay=0.05", "train.dropout=0.2",
          "train.label_smoothing=0.1", "train.adversarial=fgm", "train.pooling=mean", "train.layer_mix=scalar_mix"]


def _check_all_on(metrics: dict, run_dir) -> None:
    assert metrics["train/best_epoch"] in (1, 2) and metrics["train/adversarial_seconds"] > 0
    assert metrics["train/steps"] > 0 and 0 <= metrics["test/acc"] <= 1
    assert _epoch_values(run_dir, "train/effective_weight_decay")


@pytest.mark.parametrize("peft", ["lora", "adalora", "ia3", "prefix", "prompt", "adapter", "top_layers", "bitfit",
                                  "full", "linear_probe"])
def test_every_option_at_once_composes_with_each_peft_strategy(tmp_path, peft):
    extra = ["peft.tinit=1", "peft.tfinal=1"] if peft == "adalora" else []  # a rank schedule that fits 4 steps
    metrics = run_config(ALL_ON + ["model=tiny_bert", "compression=none", f"peft={peft}", *extra], tmp_path)
    _check_all_on(metrics, tmp_path)


@pytest.mark.parametrize("compression, peft", [("magnitude", "lora"), ("structured", "lora"),
                                               ("dynamic_int8", "lora"), ("distillation", "lora"),
                                               ("gradual_magnitude", "full")])
def test_every_option_at_once_composes_with_compression(tmp_path, compression, peft):
    metrics = run_config(ALL_ON + ["model=tiny_bert", f"compression={compression}", f"peft={peft}"], tmp_path)
    _check_all_on(metrics, tmp_path)


def test_layer_lr_decay_finds_the_blocks_of_a_decoder_too():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from llmk_lab.training.llrd import split_by_depth

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=3, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=2, pad_token_id=0))
    groups = split_by_depth(model, [{"params": list(model.parameters()), "weight_decay": 0.0}], 1.0, 0.5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    lr_of = {name_of[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert lr_of["model.layers.0.self_attn.q_proj.weight"] == 0.5 ** 3
    assert lr_of["model.layers.2.mlp.down_proj.weight"] == 0.5
    assert lr_of["model.embed_tokens.weight"] == 0.5 ** 4
    assert lr_of["score.weight"] == 1.0 and lr_of["model.norm.weight"] == 1.0  # above the blocks: the head's rate

"""Exports round-trip: model/ reloaded with plain transformers predicts what the run predicted on its test
split and keeps its zeros; ONNX (onnxruntime) gives the same labels; a refused export says why."""
from __future__ import annotations

import json

import pytest
import torch

from llmk_lab import export
from llmk_lab.errors import UserError
from tests.conftest import read_metrics, run_config
from tests.test_data import conll_sentences, topic_rows, write_conll, write_csv

FAST = ["model=tiny_bert", "logger=csv", "export.checkpoint=false", "train.batch_size=8", "train.eval_batch_size=16"]


def topic_csv(tmp_path):
    write_csv(tmp_path / "topics.csv", topic_rows(90), ["body", "title", "topic"])
    return ["data=local_csv", f"data.path={tmp_path / 'topics.csv'}", "data.text_column=body",
            "data.label_column=topic", "data.val_size=12", "data.test_size=20"]


@pytest.fixture(scope="module")
def pruned_lora_run(tmp_path_factory):
    """Magnitude pruning 50 % + LoRA (merged into model/): the default recipe on a tiny model."""
    root = tmp_path_factory.mktemp("pruned_lora")
    run_config(FAST + topic_csv(root) + ["compression=magnitude", "compression.sparsity=0.5", "peft=lora",
                                         "train.max_epochs=2"], root / "run")
    return root / "run"


def _zero_fraction(model, names):
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in names)
    return zeros / sum(modules[n].weight.numel() for n in names)


def test_pruned_lora_model_reloads_with_plain_transformers_and_predicts_as_the_run(pruned_lora_run):
    from transformers import AutoModelForSequenceClassification

    metrics = read_metrics(pruned_lora_run)
    folder = pruned_lora_run / "model"
    assert metrics["export/model"] == str(folder) and metrics["exports"]["model"] == str(folder)
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] < 1e-4
    # the merged LoRA update is masked: the pruned layers keep their 50 % zeros after merging and reloading
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    pruned = [name for name in metrics["sparsity_per_layer"]]
    pruned = [n.removeprefix("base_model.model.").removesuffix(".base_layer") for n in pruned]
    assert _zero_fraction(model, pruned) == pytest.approx(metrics["sparsity/pruned_layers"], abs=1e-6)
    assert _zero_fraction(model, pruned) == pytest.approx(0.5, abs=0.01)
    assert metrics["export/model_sparsity_after"] == metrics["export/model_sparsity_before"]
    # predictions of the reloaded model on the stored test inputs are the run's own
    inputs, reference = export.load_reference(pruned_lora_run)
    assert len(reference) == 20 and reference.shape[1] == 3
    logits = export.model_outputs(model, "sequence_classification", inputs)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    # and score what the run scored on its test split
    accuracy = float((reference.argmax(-1) == inputs["labels"]).double().mean())
    assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)
    info = json.loads((folder / "llmk_lab.json").read_text())
    assert info["task"] == "sequence_classification" and sorted(info["labels"]) == ["food", "music", "sports"]


def test_export_command_checks_the_model_again(pruned_lora_run, capsys):
    assert export.main([str(pruned_lora_run)]) == 0
    assert "agreement 1.0000" in capsys.readouterr().out


def test_onnx_export_gives_the_runs_labels(pruned_lora_run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = export.export_onnx(pruned_lora_run)
    figures = export.check_onnx(pruned_lora_run)
    assert path.exists() and figures["agreement"] == 1.0 and figures["max_abs_diff"] < 1e-3
    assert figures["unpadded_agreement"] == 1.0 and figures["unpadded_max_abs_diff"] < 1e-3
    assert (path.parent / "tokenizer.json").exists() or (path.parent / "vocab.txt").exists()


def test_structured_pruning_keeps_its_smaller_matrices(tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_config(FAST + topic_csv(tmp_path) + ["compression=structured", "peft=full"], tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/model_agreement"] == 1.0, metrics.get("export/model")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    dense = 2 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 64)  # two 32-wide blocks of the tiny BERT
    in_blocks = sum(p.numel() for n, p in model.named_parameters() if ".layer." in n and n.endswith("weight")
                    and p.ndim == 2)
    assert in_blocks < dense


def test_ner_export_agrees_on_every_tagged_word(tmp_path):
    write_conll(tmp_path / "ner.conll", conll_sentences(40))
    run_config(FAST + ["data=local_conll", f"data.path={tmp_path / 'ner.conll'}", "data.val_size=8",
                       "data.test_size=8", "optimized_metric=test/f1", "compression=magnitude", "peft=lora"],
               tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/model_agreement"] == 1.0
    assert metrics["export/model_sparsity_after"] == metrics["export/model_sparsity_before"] > 0


# Loads model/ the way the README shows, in a process where importing llmk_lab fails: nothing of it is needed.
PLAIN_LOAD = """
import json, sys
sys.modules["llmk_lab"] = None
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification
from safetensors.torch import load_file
folder = sys.argv[1]
info = json.load(open(folder + "/llmk_lab.json"))
if info["format"] == "torch_ao_dynamic_int8":
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(folder))
    torch.ao.quantization.quantize_dynamic(model, set(info["int8_modules"]), dtype=torch.qint8, inplace=True)
    model.load_state_dict(torch.load(folder + "/int8_state_dict.pt"))
else:
    model = AutoModelForSequenceClassification.from_pretrained(folder)
model.eval()
reference = load_file(sys.argv[2])
keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in reference]
labels = []
with torch.inference_mode():
    for i in range(len(reference["input_ids"])):  # one unpadded example at a time
        n = int(reference["attention_mask"][i].sum())
        labels.append(int(model(**{k: reference[k][i:i + 1, :n] for k in keys}).logits.argmax(-1)))
print(json.dumps({"labels": labels, "weight": type(model.bert.encoder.layer[0].attention.self.query).__name__}))
"""


def plain_labels(run_dir) -> dict:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(run_dir / "model"),
                             str(run_dir / "reference" / "test.safetensors")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pruned_lora_int8_run(tmp_path_factory):
    """Magnitude pruning 50 %, LoRA merged, then torch.ao dynamic int8 (dynamic_int8's default backend)."""
    root = tmp_path_factory.mktemp("pruned_lora_int8")
    overrides = FAST + topic_csv(root) + ["compression=chain", "peft=lora", "train.max_epochs=2",
                                          "measure.latency_batch_sizes=[]",
                                          "compression.steps=[{method: magnitude, sparsity: 0.5},"
                                          " {method: dynamic_int8}]"]
    run_config(overrides, root / "run")
    return root / "run", overrides


def test_int8_model_round_trips_in_int8_with_its_zeros(pruned_lora_int8_run):
    from llmk_lab.data import load_data
    from llmk_lab.predict import load
    from llmk_lab.plan import plan
    from tests.conftest import compose_config

    run_dir, overrides = pruned_lora_int8_run
    metrics = read_metrics(run_dir)
    assert metrics["export/model"] == str(run_dir / "model"), metrics["export/model"]
    assert metrics["export/model_format"] == export.TORCH_AO_INT8
    # the int8 layers reload as int8: the state dict holds int8 weights, no float copy of them
    assert (run_dir / "model" / export.INT8_STATE_FILE).exists()
    assert not list((run_dir / "model").glob("*.safetensors"))
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] == 0.0
    # the pruned zeros survive merging, quantising and reloading: about half of the block linears' int8 values
    assert metrics["export/model_sparsity_after"] == metrics["export/model_sparsity_before"] > 0.4
    model = export.load_exported(run_dir / "model")
    assert type(model.bert.encoder.layer[0].attention.self.query).__module__.startswith("torch.ao.nn.quantized")
    assert export.linear_sparsity(model)["overall"] == metrics["export/model_sparsity_before"]
    # the command-line check batches as the test stage did: the same outputs exactly
    figures = export.check_model_dir(run_dir)
    assert figures["agreement"] == 1.0 and figures["max_abs_diff"] == 0.0
    # plain torch + transformers, without llmk_lab, as the README shows: the run's labels
    _, reference = export.load_reference(run_dir)
    loaded = plain_labels(run_dir)
    assert loaded["weight"] == "Linear" and loaded["labels"] == reference.argmax(-1).tolist()
    # and the predictor (on CPU: the int8 kernels are CPU kernels) gives the run's labels on its test texts
    texts = [e["text"] for e in load_data(plan(compose_config(overrides)).settings.data).splits["test"]]
    predictor = load(run_dir)
    assert predictor.device == "cpu"
    labels = [predictor.labels.index(r["label"]) for r in predictor.predict(texts, batch_size=16)]
    assert labels == reference.argmax(-1).tolist()
    with pytest.raises(UserError, match="device='cuda' is not allowed for this run: its model/ is int8"):
        load(run_dir, device="cuda")


def test_int8_model_is_refused_for_onnx_in_one_line(pruned_lora_int8_run):
    with pytest.raises(UserError, match="ONNX export is of float models; this run's model/ is int8"):
        export.export_onnx(pruned_lora_int8_run[0])


@pytest.mark.parametrize("compression", [["compression=weight_only_int8"],
                                         pytest.param(["compression=dynamic_int8", "compression.backend=torchao"],
                                                      marks=pytest.mark.slow)])
def test_torchao_int8_model_reloads_with_from_pretrained(tmp_path, compression):
    run_config(FAST + topic_csv(tmp_path) + compression + ["peft=full", "measure.latency_batch_sizes=[]"],
               tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/model_format"] == export.TORCHAO_INT8, metrics["export/model"]
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] == 0.0
    assert metrics["export/model_sparsity_after"] == metrics["export/model_sparsity_before"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    _, reference = export.load_reference(tmp_path / "run")
    assert plain_labels(tmp_path / "run")["labels"] == reference.argmax(-1).tolist()


def test_pooled_head_is_not_exported_and_says_why(tmp_path):
    """A cross-layer head is no part of a transformers class: model/ is left out up front, with that reason
    (not a reload that disagrees), and the run's own test outputs are still kept."""
    run_config(FAST + topic_csv(tmp_path) + ["compression=none", "peft=full", "train.pooling=mean",
                                             "train.layer_mix=scalar_mix"], tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    reason = metrics["export/model"]
    assert reason.startswith("not written: train.pooling='mean' / train.layer_mix='scalar_mix'"), reason
    assert "cross-layer head" in reason and "agreed" not in reason
    assert "export/model_agreement" not in metrics
    assert not (tmp_path / "run" / "model").exists()
    assert (tmp_path / "run" / "reference" / "test.safetensors").exists()


def test_unfinished_and_failed_run_directories_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        export.finished_model_dir(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a finished run"):
        export.finished_model_dir(tmp_path / "half")
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "failed.json").write_text(json.dumps({"error": "loss diverged"}))
    with pytest.raises(UserError, match="the run failed \\(loss diverged\\)"):
        export.finished_model_dir(tmp_path / "failed")


def _bad_run_dirs(tmp_path) -> dict:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "failed.json").write_text(json.dumps({"error": "loss diverged"}))
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "metrics.json").write_text(json.dumps({"failed_stage": "export", "error": "MemoryError"}))
    return {"missing": (tmp_path / "missing", "no such run directory"),
            "incomplete": (tmp_path / "half", "not a finished run directory"),
            "failed": (tmp_path / "failed", "the run failed (loss diverged)"),
            "stopped": (tmp_path / "stopped", "the run stopped in stage 'export'")}


@pytest.mark.parametrize("case", ["missing", "incomplete", "failed", "stopped"])
@pytest.mark.parametrize("command", ["export", "export --onnx", "compare", "predict"])
def test_bad_run_directory_is_one_line_and_exit_2_in_every_command(tmp_path, capsys, case, command):
    from llmk_lab import compare, predict

    path, message = _bad_run_dirs(tmp_path)[case]
    main, args = {"export": (export.main, [str(path)]), "export --onnx": (export.main, [str(path), "--onnx"]),
                  "compare": (compare.main, [str(path), str(path)]),
                  "predict": (predict.main, [str(path), "some text"])}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_compare_two_runs_on_the_same_inputs(pruned_lora_run, tmp_path, capsys):
    from llmk_lab import compare

    dense = tmp_path / "dense"
    # the dense parent trained longer and faster, so the two models' distributions clearly differ
    run_config(FAST + topic_csv(pruned_lora_run.parent) + ["compression=none", "peft=lora", "train.max_epochs=3",
                                                           "train.lr=5e-3"], dense)
    same = compare.compare(dense, dense, repeats=2)
    assert same["agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["size/ratio"] == 1.0 and all(v["b_minus_a"] == 0 for v in same["metrics"].values())
    result = compare.compare(dense, pruned_lora_run, repeats=2)
    # both runs stored their own outputs on the same test inputs: the comparison must agree with them
    inputs_a, ref_a = export.load_reference(dense)
    inputs_b, ref_b = export.load_reference(pruned_lora_run)
    assert torch.equal(inputs_a["input_ids"], inputs_b["input_ids"])
    assert result["agreement"] == pytest.approx(float((ref_a.argmax(-1) == ref_b.argmax(-1)).double().mean()))
    kl = torch.nn.functional.kl_div(ref_b.log_softmax(-1), ref_a.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    assert result["mean_kl"] == pytest.approx(float(kl), rel=1e-3, abs=1e-7) and result["mean_kl"] > 1e-4
    acc_a, acc_b = read_metrics(dense)["test/acc"], read_metrics(pruned_lora_run)["test/acc"]
    assert result["metrics"]["test/acc"]["b_minus_a"] == pytest.approx(acc_b - acc_a)
    # half of the tiny BERT's block-linear weights (2 blocks x (4 x 32x32 + 2 x 32x64)) are zeros in B only
    assert result["params/nonzero_a"] - result["params/nonzero_b"] >= 0.45 * 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert result["params/nonzero_ratio"] == result["params/nonzero_b"] / result["params/nonzero_a"] < 1
    assert result["latency/ratio"] > 0
    assert compare.main([str(dense), str(pruned_lora_run), "--repeats", "2", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "latency ratio" in out
    assert json.loads((tmp_path / "c.json").read_text())["agreement"] == result["agreement"]


def test_an_export_that_would_lose_the_adapter_is_left_out_with_the_reason(tmp_path):
    """Houlsby adapters live inside the transformers model but are not part of its class: a folder saved
    from it would reload without them, so it is not written, and metrics.json says why."""
    run_config(FAST + topic_csv(tmp_path) + ["compression=none", "peft=adapter"], tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/model"].startswith("not written:"), metrics["export/model"]
    assert "do not load into plain" in metrics["export/model"] or "differ" in metrics["export/model"]
    assert not (tmp_path / "run" / "model").exists()
    assert (tmp_path / "run" / "reference" / "test.safetensors").exists()


# ----------------------------------------------------------------------------- the adapter alone

# Loads adapter/ folders the way the README shows, in a process where importing llmk_lab fails.
PLAIN_ADAPTER_LOAD = """
import json, sys
sys.modules["llmk_lab"] = None
import torch, transformers
from peft import PeftModel
from safetensors.torch import load_file
results = []
for folder in sys.argv[1:]:
    info = json.load(open(f"{folder}/llmk_lab.json"))
    model = getattr(transformers, info["auto_class"]).from_pretrained(info["base_model"], dtype=torch.float32,
                                                                      **info["base_kwargs"])
    if info["pruned_base"]:  # the pruned layers the adapter trained over
        pruned = load_file(f"{folder}/{info['pruned_base']}")
        assert not model.load_state_dict({k: v for k, v in pruned.items() if k.endswith(".weight")},
                                         strict=False).unexpected_keys
    if info["format"] == "peft":
        model = PeftModel.from_pretrained(model, folder)
    else:  # trained_tensors: the model's own parameters that trained
        assert not model.load_state_dict(load_file(f"{folder}/adapter_model.safetensors"), strict=False).unexpected_keys
    model.eval()
    reference = load_file(f"{folder}/../reference/test.safetensors")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in reference]
    labels = []
    with torch.inference_mode():
        for i in range(len(reference["input_ids"])):  # one unpadded example at a time
            n = int(reference["attention_mask"][i].sum())
            labels.append(int(model(**{k: reference[k][i:i + 1, :n] for k in keys}).logits.argmax(-1)))
    results.append(labels)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny BERT encoder (no task head) saved as a folder: a base that from_pretrained loads again."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("base") / "tiny_bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory, base_dir):
    """Runs on the saved base whose adapters reproduce them: LoRA unpruned (peft's folder), BitFit and prompt
    tuning over a 50 % pruned base (trained tensors; peft's folder, the pruned layers beside each)."""
    root = tmp_path_factory.mktemp("adapters")
    on_base = FAST + topic_csv(root) + [f"model.name_or_path={base_dir}", "model.from_config=null"]
    cases = {"lora": ["compression=none", "peft=lora"],
             "lora_without_model": ["compression=none", "peft=lora", "export.model=false"],
             "pruned_bitfit": ["compression=magnitude", "compression.sparsity=0.5", "peft=bitfit"],
             "pruned_prompt": ["compression=magnitude", "compression.sparsity=0.5", "peft=prompt",
                               "peft.num_virtual_tokens=4"]}
    for name, extra in cases.items():
        run_config(on_base + extra + ["train.lr=1e-2"], root / name)
    return {name: root / name for name in cases}


@pytest.mark.parametrize("case, form", [("lora", "peft"), ("pruned_bitfit", "trained_tensors"),
                                        ("pruned_prompt", "peft")])
def test_adapter_reloaded_on_its_base_predicts_as_the_run(adapter_runs, case, form):
    from llmk_lab.masks import PRUNED_BASE

    run_dir = adapter_runs[case]
    metrics = read_metrics(run_dir)
    folder = run_dir / "adapter"
    assert metrics["export/adapter"] == str(folder) and metrics["exports"]["adapter"] == str(folder)
    assert metrics["export/adapter_format"] == form
    assert metrics["export/adapter_agreement"] == 1.0 and metrics["export/adapter_max_abs_diff"] < 1e-5
    assert metrics["export/adapter_checked_examples"] == 20  # the whole tiny test split
    assert (folder / PRUNED_BASE).exists() == case.startswith("pruned")
    # the run's own check, repeated: the loader gives the run's test outputs
    inputs, reference = export.load_reference(run_dir)
    outputs = export.model_outputs(export.load_adapter_folder(folder), "sequence_classification", inputs)
    assert torch.equal(outputs.argmax(-1), reference.argmax(-1))
    assert float((outputs - reference).abs().max()) < 1e-5


def test_adapter_is_checked_without_model_export_too(adapter_runs):
    """export.model=false keeps no test-stage outputs: the trained model is run on the checked examples."""
    metrics = read_metrics(adapter_runs["lora_without_model"])
    assert metrics["export/adapter_agreement"] == 1.0 and metrics["export/adapter_max_abs_diff"] < 1e-5
    assert metrics["export/adapter_checked_examples"] == 20 and "export/model" not in metrics
    assert (adapter_runs["lora_without_model"] / "adapter" / "adapter_model.safetensors").exists()


def test_adapters_load_as_the_readme_shows_without_llmk_lab(adapter_runs):
    import subprocess
    import sys

    folders = [str(adapter_runs[case] / "adapter") for case in ("lora", "pruned_bitfit", "pruned_prompt")]
    result = subprocess.run([sys.executable, "-c", PLAIN_ADAPTER_LOAD, *folders], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for case, plain in zip(("lora", "pruned_bitfit", "pruned_prompt"), loaded):
        _, reference = export.load_reference(adapter_runs[case])
        assert plain == reference.argmax(-1).tolist(), case


def test_pruned_lora_adapter_is_skipped_up_front_with_its_reason(pruned_lora_run):
    """Plain peft computes W * M + s B A, not the trained (W + s B A) * M: no adapter/ is shipped, and the
    reason is the masked update, decided before anything was written or reloaded."""
    metrics = read_metrics(pruned_lora_run)
    reason = metrics["export/adapter"]
    assert reason.startswith("skipped: peft.method='lora': its update over the pruned weights is masked"), reason
    assert "export/adapter_agreement" not in metrics and "adapter" not in metrics["exports"]
    assert not (pruned_lora_run / "adapter").exists()
    assert metrics["export/model_agreement"] == 1.0  # model/ holds the run's model


def test_an_adapter_that_disagrees_with_the_run_is_removed_with_the_reason(tmp_path, base_dir, monkeypatch):
    """Without the up-front refusal, the pruned LoRA adapter is written, reloaded with plain peft over the
    pruned base, found to differ from the run, and removed (lr 1e-2 makes the masked-away update large)."""
    from llmk_lab.peft.lora import LoRA

    monkeypatch.setattr(LoRA, "masks_its_update", False)
    run_config(FAST + topic_csv(tmp_path) + [f"model.name_or_path={base_dir}", "model.from_config=null",
                                             "compression=magnitude", "compression.sparsity=0.5", "peft=lora",
                                             "train.max_epochs=2", "train.lr=1e-2"], tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    reason = metrics["export/adapter"]
    assert reason.startswith("skipped: reloaded, its outputs differ from the run's"), reason
    assert metrics["export/adapter_max_abs_diff"] > 1e-3
    assert not (tmp_path / "run" / "adapter").exists() and "adapter" not in metrics["exports"]


@pytest.fixture(scope="module")
def base_without_pooler(tmp_path_factory):
    """The tiny BERT encoder saved without its pooler: a run on it draws the pooler at random."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("base") / "no_pooler"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128), add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.mark.parametrize("base, overrides, reason", [
    (None, ["peft=adapter"], "skipped: peft.method='adapter': bottleneck adapters are llmk_lab modules"),
    (None, ["peft=full"], "skipped: peft.method='full': it trains the model's own weights"),
    (None, ["peft=lora"], "skipped: the base model was built from model.from_config"),
    ("base_dir", ["peft=ia3", "compression=weight_sharing"],
     "skipped: compression.method='weight_sharing': its blocks share one set of weights"),
    ("base_without_pooler", ["peft=lora"], "skipped: the base checkpoint has no bert.pooler.dense."),
])
def test_adapters_that_cannot_reproduce_the_run_are_refused_up_front(tmp_path, request, monkeypatch, base,
                                                                     overrides, reason):
    from llmk_lab.export import adapter as export_module

    def never(*args):
        raise AssertionError("a refused adapter is not written")

    monkeypatch.setattr(export_module, "_write_adapter", never)
    on_base = [f"model.name_or_path={request.getfixturevalue(base)}", "model.from_config=null"] if base else []
    run_config(FAST + topic_csv(tmp_path) + ["compression=none", *on_base, *overrides], tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/adapter"].startswith(reason), metrics["export/adapter"]
    assert not (tmp_path / "run" / "adapter").exists()

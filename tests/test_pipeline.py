"""End-to-end runs of the pipeline on a tiny model, in-process."""
import json

import pytest
from safetensors.torch import load_file

from tests.conftest import read_metrics, run_config


def test_tiny_run_writes_a_complete_run_directory(tmp_path, tiny):
    metrics = run_config(tiny + ["export.checkpoint=true", "export.merged=true"], tmp_path)
    for name in ("metrics.json", "manifest.json", "config.yaml", "checkpoints/last.ckpt", "model/model.safetensors",
                 "merged/model.safetensors", "csv/metrics.csv"):
        assert (tmp_path / name).exists(), name
    on_disk = read_metrics(tmp_path)
    # adapter/ is left out, with its reason (a LoRA update masked by the pruning; tests/test_export.py).
    assert on_disk["export/adapter"].startswith("skipped: ") and not (tmp_path / "adapter").exists()
    assert on_disk["test/acc"] == pytest.approx(metrics["test/acc"])
    for key in ("val/acc", "val/macro_f1", "test/acc", "test/macro_f1", "params/total", "params/trainable",
                "train/examples_per_s", "train/peak_memory_mb", "wall_time_s", "run_dir"):
        assert key in on_disk, key
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["packages"]["torch"]
    assert manifest["data"]["sizes"] == {"train": 64, "validation": 32, "test": 32}
    assert manifest["data"]["sha256"] and "git" in manifest and "hardware" in manifest


def test_magnitude_pruning_reaches_the_requested_sparsity_and_survives_lora_merge(tmp_path, tiny):
    metrics = run_config(tiny + ["compression.sparsity=0.7", "export.merged=true"], tmp_path)
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.7, abs=0.005)
    assert metrics["sparsity/after_merge"] == pytest.approx(0.7, abs=0.005)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    linear = [k for k in merged if ".layer." in k and k.endswith("weight") and merged[k].ndim == 2]
    assert len(linear) == 12  # 2 layers x (q, k, v, o, up, down)
    for key in linear:
        assert (merged[key] == 0).float().mean().item() == pytest.approx(0.7, abs=0.01), key


def test_lora_trains_only_adapters_and_head(tmp_path, tiny):

    metrics = run_config(tiny, tmp_path)
    # LoRA r=8 on 2 layers x 6 linears of a 32-wide BERT (intermediate 64):
    # q,k,v,o: 8*(32+32) each; up: 8*(32+64); down: 8*(64+32); the pooler 8*(32+32);
    # plus the 2-class head.
    lora = 2 * (4 * 8 * 64 + 2 * 8 * 96) + 8 * 64
    head = 32 * 2 + 2
    assert metrics["params/trainable"] == lora + head


def test_full_fine_tuning_keeps_pruned_weights_at_zero(tmp_path, tiny):
    metrics = run_config(tiny + ["peft=full", "compression.sparsity=0.5"], tmp_path)
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.5, abs=0.005)
    assert metrics["params/trainable_fraction"] == 1.0


def test_same_seed_gives_identical_metrics(tmp_path, tiny):
    keys = ("val/acc", "val/loss", "test/acc", "test/loss", "test/macro_f1", "params/nonzero")
    a = run_config(tiny + ["seed=3"], tmp_path / "a")
    b = run_config(tiny + ["seed=3"], tmp_path / "b")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_the_tokenisation_cache_gives_back_what_was_tokenised(tmp_path, monkeypatch):
    """Splits of 1-D tensors (a causal LM's windows) are stored packed, one tensor per key; they come back as
    the same examples, each its own tensor; other splits (lists of ids) as they were."""
    from types import SimpleNamespace

    import torch

    from llmk_lab.data import module

    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path / "cache"))
    windows = [{"input_ids": torch.arange(i, i + n)} for i, n in enumerate((5, 3, 8))]
    lists = [{"input_ids": [1, 2, 3], "label": 0}, {"input_ids": [4], "label": 1}]
    splits = {"train": windows, "validation": lists, "test": []}
    task = SimpleNamespace(registered_name="t", tokenize_split=lambda tok, examples, cfg, split: splits[split])
    raw = SimpleNamespace(fingerprint=lambda: "raw", splits=splits)
    cfg = SimpleNamespace(max_length=8, options={}, split_seed=0)
    monkeypatch.setattr(module, "tokenizer_fingerprint", lambda tokenizer: "tok")
    first, hit = module.tokenize_cached(raw, task, None, cfg)
    assert not hit and first == splits
    stored = torch.load(next((tmp_path / "cache" / "tokenized").glob("*.pt")), weights_only=True)
    assert set(stored["train"]) == {"columns", "lengths"}  # one tensor for the three windows
    again, hit = module.tokenize_cached(raw, task, None, cfg)
    assert hit and [e["input_ids"].tolist() for e in again["train"]] == [e["input_ids"].tolist() for e in windows]
    assert again["validation"] == lists and again["test"] == []
    ids = [e["input_ids"] for e in again["train"]]
    assert all(t.dtype == torch.int64 and t.untyped_storage().nbytes() == t.numel() * 8 for t in ids)


def test_tokenisation_is_cached_by_fingerprint(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path / "cache"))
    first = run_config(tiny, tmp_path / "a")
    second = run_config(tiny, tmp_path / "b")
    third = run_config(tiny + ["data.max_length=32"], tmp_path / "c")
    assert (first["data/tokenization_cache_hit"], second["data/tokenization_cache_hit"],
            third["data/tokenization_cache_hit"]) == (False, True, False)

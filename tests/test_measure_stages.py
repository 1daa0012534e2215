"""The stages after training: one deployable copy for every figure and export, the latency budget in the
metrics, stage timings, and `measure.enabled=false` for runs that only want the task metric."""
from __future__ import annotations

import pytest

from tests.conftest import run_config

PRUNED = ["compression=magnitude", "compression.sparsity=0.5", "data.limit_train=32", "train.batch_size=8"]


def _count_deployable(monkeypatch) -> list:
    import llmk_lab.measure as measure

    calls, original = [], measure.deployable

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(measure, "deployable", counted)
    return calls


def test_one_deployable_copy_serves_sparsity_size_latency_and_both_exports(tmp_path, tiny, monkeypatch):
    calls = _count_deployable(monkeypatch)
    metrics = run_config(tiny + PRUNED + ["export.merged=true", "export.model=true",
                                          "measure.latency_batch_sizes=[2]", "measure.latency_repeats=2",
                                          "measure.latency_warmup=1"], tmp_path)
    assert len(calls) == 1
    assert metrics["sparsity/after_merge"] == pytest.approx(0.5, abs=0.01)
    assert "size/ratio" in metrics and "latency/bs2/speedup" in metrics
    assert (tmp_path / "merged").is_dir() and metrics["export/merged_max_logit_diff"] < 1e-4
    # The budget the latency figures were measured on is part of them.
    assert (metrics["latency/repeats"], metrics["latency/warmup"], metrics["latency/batch_sizes"]) == (2, 1, [2])
    assert metrics["latency/bs2/tokens"] >= 2
    for stage in ("evaluate", "sparsity", "compression_figures", "export"):
        assert metrics[f"time/{stage}_s"] >= 0
    assert 0 < metrics["time/fit_s"] < metrics["wall_time_s"]
    assert metrics["time/post_training_s"] >= metrics["time/compression_figures_s"] + metrics["time/export_s"]


def test_measure_disabled_keeps_only_the_task_metric(tmp_path, tiny, monkeypatch):
    calls = _count_deployable(monkeypatch)
    metrics = run_config(tiny + PRUNED + ["measure.enabled=false", "export.merged=false", "export.model=false"],
                         tmp_path)
    assert "test/acc" in metrics and metrics["sparsity/pruned_layers"] == pytest.approx(0.5, abs=0.01)
    assert not calls  # no merged copy, and no dense reference compared with
    assert "sparsity/after_merge" not in metrics and "measure/reference" not in metrics
    assert not any(k.startswith(("size/", "latency/", "throughput/", "fidelity/")) for k in metrics)


def test_latency_batch_is_a_typical_evaluation_batch():
    """Consecutive examples of the evaluation order (by length) around its middle: a batch as evaluation
    forms it, not the first test examples padded to the longest of them."""
    from llmk_lab.measure import _fixed_batch

    class Data:
        splits = {"test": [{"input_ids": [1] * n} for n in (9, 1, 5, 3, 7, 2, 8)]}

        def eval_order(self, split):
            examples = self.splits[split]
            return sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))

        def collate(self, chosen):
            return {"lengths": [len(e["input_ids"]) for e in chosen]}

    assert _fixed_batch(Data(), 3)["lengths"] == [3, 5, 7]
    assert _fixed_batch(Data(), 9)["lengths"] == [1, 2, 3, 5, 7, 8, 9, 1, 2]  # cycled when the split is smaller

"""The run's reference outputs come from its test stage: the export runs only the reloaded model, the
outputs are the test stage's example by example, and a record that cannot be trusted is not used."""
from __future__ import annotations

import pytest
import torch

from llmk_lab import export
from llmk_lab import reference as reference_module
from llmk_lab.reference import FROM_TEST_STAGE, RecordedTestOutputs, check_subset, outputs_by_length
from tests.conftest import read_metrics, run_config

PRUNED = ["compression=magnitude", "compression.sparsity=0.5", "data.limit_train=32", "train.batch_size=8",
          "measure.latency_batch_sizes=[]"]


def _tiny(kind: str):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    return (BertForTokenClassification if kind == "token" else BertForSequenceClassification)(config).eval()


def _padded(lengths: list[int], width: int, left: bool = False) -> dict:
    torch.manual_seed(1)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span] = torch.randint(1, 50, (n,))
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(lengths), dtype=torch.long)}


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_outputs_by_length_are_the_outputs_of_one_padded_batch(kind, left):
    model = _tiny(kind)
    inputs = _padded([3, 12, 5, 12, 2, 7, 9], width=16, left=left)  # nothing is 16 long: a padded column
    task = "token_classification" if kind == "token" else "sequence_classification"
    whole = export.model_outputs(model, task, inputs, batch_size=64)
    bucketed = outputs_by_length(model, task, inputs, batch_size=3)
    assert bucketed.shape == whole.shape
    if kind == "token":
        attended = inputs["attention_mask"].bool()
        assert torch.allclose(bucketed[attended], whole[attended], atol=1e-5)
        assert not bucketed[~attended].any()  # zero where nothing is attended
    else:
        assert torch.allclose(bucketed, whole, atol=1e-5)


def _examples(lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": 0} for n in lengths]


def _batch(examples, indices):
    width = max(len(examples[i]["input_ids"]) for i in indices)
    ids = torch.zeros(len(indices), width, dtype=torch.long)
    for row, i in enumerate(indices):
        ids[row, :len(examples[i]["input_ids"])] = torch.tensor(examples[i]["input_ids"])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class _Out:
    def __init__(self, logits):
        self.logits = logits


def test_test_outputs_are_laid_out_in_split_order_and_refused_when_they_are_not_the_examples():
    examples = _examples([4, 2, 3, 1])
    order = [3, 1, 2, 0]  # by length, as the evaluation loader yields them
    model = object()
    record = RecordedTestOutputs(examples, order, limit=3, model=model)
    for chunk in ([3, 1], [2, 0]):
        batch = _batch(examples, chunk)
        record.add(batch, _Out(torch.tensor([[float(i), -float(i)] for i in chunk])))
    inputs = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4)}
    outputs, why = record.outputs(inputs, model)
    assert why is None and outputs[:, 0].tolist() == [0.0, 1.0, 2.0]  # test examples 0, 1, 2 in that order
    assert record.outputs(inputs, object()) == (None, "the model changed after the test stage")
    # a loader that yields other examples than the order says: nothing is taken from it
    shuffled = RecordedTestOutputs(examples, order, limit=3, model=model)
    shuffled.add(_batch(examples, [1, 3]), _Out(torch.zeros(2, 2)))
    assert shuffled.outputs(inputs, model)[0] is None and "is not test example" in shuffled.refusal
    # a test stage cut short (limited test batches) leaves examples out: not a reference either
    short = RecordedTestOutputs(examples, order, limit=3, model=model)
    short.add(_batch(examples, [3, 1]), _Out(torch.zeros(2, 2)))
    outputs, why = short.outputs(inputs, model)
    assert outputs is None and "scored 1 of the 3" in why


def test_the_export_runs_only_the_reloaded_model_and_stores_the_test_stage_outputs(tmp_path, tiny, monkeypatch):
    ran = []
    original = reference_module.model_outputs

    def counted(model, *args, **kwargs):
        ran.append(type(model).__name__)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(reference_module, "model_outputs", counted)
    metrics = run_config(tiny + PRUNED, tmp_path)
    assert metrics["export/reference_outputs"] == FROM_TEST_STAGE
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] < 1e-4
    # the trained model is a PeftModel: only the reloaded plain transformers model went over the examples
    assert ran and not any(name.startswith("Peft") for name in ran)
    inputs, reference = export.load_reference(tmp_path)
    assert len(reference) == 32
    assert float((reference.argmax(-1) == inputs["labels"]).double().mean()) == pytest.approx(metrics["test/acc"])


def test_a_mixed_precision_test_stage_is_not_the_reference(tmp_path, tiny):
    metrics = run_config(tiny + PRUNED + ["hardware.precision=bf16-mixed"], tmp_path)
    assert metrics["export/reference_outputs"].startswith("a second pass of the trained model")
    assert "hardware.precision=bf16-mixed" in metrics["export/reference_outputs"]
    assert metrics["export/model_agreement"] == 1.0


def test_ner_reference_is_the_test_stage_logits_per_token(tmp_path, tiny):
    from tests.test_data import conll_sentences, write_conll

    write_conll(tmp_path / "ner.conll", conll_sentences(40))
    run_config(tiny + ["data=local_conll", f"data.path={tmp_path / 'ner.conll'}", "data.val_size=8",
                       "data.test_size=8", "compression=magnitude", "peft=lora", "train.batch_size=8",
                       "train.eval_batch_size=3", "measure.latency_batch_sizes=[]"], tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/reference_outputs"] == FROM_TEST_STAGE
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] < 1e-4
    inputs, reference = export.load_reference(tmp_path / "run")
    attended = inputs["attention_mask"].bool()
    assert reference.ndim == 3 and reference[attended].abs().sum(-1).gt(0).all() and not reference[~attended].any()
    # `python -m llmk_lab.export RUN_DIR` reloads model/ and finds the stored outputs where tags are read
    figures = export.check_model_dir(tmp_path / "run")
    assert figures["agreement"] == 1.0 and figures["max_abs_diff"] < 1e-4


def test_token_outputs_are_compared_where_a_tag_is_read():
    """References written before per-token outputs were zeroed at padding hold logits there: a check of
    such a run's model/ compares where tags are read, not the padding."""
    ours = torch.randn(2, 4, 3)
    labels = torch.tensor([[1, -100, 2, -100], [0, 1, -100, -100]])
    theirs = ours.clone()
    theirs[labels == -100] = 0.0
    assert export.agreement("token_classification", ours, theirs, labels) == {"agreement": 1.0, "max_abs_diff": 0.0}
    theirs[0, 0] += 0.5
    assert export.agreement("token_classification", ours, theirs, labels)["max_abs_diff"] == pytest.approx(0.5)


def test_check_subset_is_whole_test_batches_spread_over_the_lengths():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    inputs = _padded(lengths, width=12)
    order = torch.argsort(inputs["attention_mask"].sum(-1), stable=True)  # how the loader and the check group
    batches = [set(b.tolist()) for b in torch.split(order, 3)]  # 4 batches of lengths 1-3, 4-6, 7-9, 10-11
    picked = set(check_subset(inputs, batch_size=3, examples=6).tolist())
    assert picked == batches[1] | batches[3]  # of each half of the batches, its middle one, whole
    assert set(check_subset(inputs, batch_size=3, examples=1).tolist()) == batches[2]
    assert check_subset(inputs, batch_size=3, examples=10) is None  # every batch: no subset


def test_the_run_checks_model_on_a_budget_of_whole_test_batches(tmp_path, tiny, monkeypatch):
    from llmk_lab.export import model as model_export

    monkeypatch.setattr(model_export, "CHECK_EXAMPLES", 8)  # where the model/ check reads it
    metrics = run_config(tiny + PRUNED + ["train.eval_batch_size=8"], tmp_path)
    assert metrics["export/model_checked_examples"] == 8 and metrics["export/model_agreement"] == 1.0
    _, reference = export.load_reference(tmp_path)
    assert len(reference) == 32  # the stored reference keeps every test example; the command checks them all
    assert export.check_model_dir(tmp_path)["agreement"] == 1.0

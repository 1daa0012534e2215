"""Predicting with a finished run: the API and the command line give the run's own predictions; bad input
(an unfinished run, a missing or empty file, a text too long) is one line or a warning."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from llmk_lab import export
from llmk_lab.data import load_data
from llmk_lab.errors import UserError
from llmk_lab.predict import TruncationWarning, bio_spans, load
from llmk_lab.plan import plan
from llmk_lab.tasks import task_class
from tests.conftest import ROOT, compose_config, read_metrics, run_config
from tests.test_data import WORDS, conll_sentences, sentence, write_conll
from tests.test_export import FAST, topic_csv


def predict_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "llmk_lab.predict", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    overrides = FAST + topic_csv(root) + ["compression=magnitude", "peft=lora", "train.max_epochs=3",
                                          "train.lr=3e-3"]
    run_config(overrides, root / "run")
    texts = [e["text"] for e in load_data(plan(compose_config(overrides)).settings.data).splits["test"]]
    return root / "run", texts


def test_classification_predictions_are_the_runs_own(classification_run):
    run_dir, texts = classification_run
    predictor = load(run_dir)
    results = predictor.predict(texts, batch_size=7)  # batches that do not divide the test split
    _, reference = export.load_reference(run_dir)
    labels = predictor.labels
    assert [r["label"] for r in results] == [labels[i] for i in reference.argmax(-1).tolist()]
    expected = reference.softmax(-1)
    for result, row in zip(results, expected):
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert [result["probabilities"][label] for label in labels] == pytest.approx(row.tolist(), abs=1e-4)
        assert result["score"] == max(result["probabilities"].values())
    # the model folder alone loads too
    assert [r["label"] for r in load(run_dir / "model").predict(texts[:3])] == [r["label"] for r in results[:3]]


def test_long_text_is_truncated_with_a_warning(classification_run):
    run_dir, texts = classification_run
    predictor = load(run_dir)
    long_text = " ".join([texts[0]] * 100)
    with pytest.warns(TruncationWarning, match=r"truncated to max_length=128"):
        [result] = predictor.predict([long_text])
    assert result["label"] in predictor.labels
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        predictor.predict([texts[0]])  # a text that fits: no warning


def test_command_line_jsonl_from_a_file(classification_run, tmp_path):
    run_dir, texts = classification_run
    (tmp_path / "in.txt").write_text("\n".join(texts[:5]) + "\n\n")
    result = predict_cli([str(run_dir), "--input", str(tmp_path / "in.txt")], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = load(run_dir).predict(texts[:5])
    assert [r["text"] for r in rows] == texts[:5]
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    assert "\x1b[" not in result.stderr  # not a terminal: no ANSI codes
    assert "Loading weights" not in result.stderr and "LOAD REPORT" not in result.stderr


@pytest.mark.parametrize("case", ["missing_file", "empty_file", "unfinished_run", "no_texts"])
def test_bad_input_is_one_line_and_non_zero_exit(classification_run, tmp_path, case):
    run_dir, _ = classification_run
    args = {"missing_file": [str(run_dir), "--input", str(tmp_path / "nope.txt")],
            "empty_file": [str(run_dir), "--input", str(tmp_path / "empty.txt")],
            "unfinished_run": [str(tmp_path / "half"), "some text"],
            "no_texts": [str(run_dir)]}[case]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("seed: 1\n")
    result = predict_cli(args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert {"missing_file": "no such file", "empty_file": "is empty", "unfinished_run": "not a finished run",
            "no_texts": "nothing to predict"}[case] in lines[0]


def test_bio_spans_read_entities_the_conll_way():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-PER"]
    assert bio_spans(tags, [1.0, 0.5, 1, 1, 1, 1]) == [(0, 2, "PER", 0.75), (3, 4, "LOC", 1.0),
                                                        (4, 5, "LOC", 1.0), (5, 6, "PER", 1.0)]


def test_ner_entities_match_the_runs_tags(tmp_path):
    sentences = conll_sentences(40)
    write_conll(tmp_path / "ner.conll", sentences)
    overrides = FAST + ["data=local_conll", f"data.path={tmp_path / 'ner.conll'}", "data.val_size=8",
                        "data.test_size=8", "optimized_metric=test/f1", "peft=full", "compression=none",
                        "train.max_epochs=6", "train.lr=5e-3"]
    run_config(overrides, tmp_path / "run")
    predictor = load(tmp_path / "run")
    test = load_data(plan(compose_config(overrides)).settings.data).splits["test"]
    inputs, reference = export.load_reference(tmp_path / "run")
    results = predictor.predict([" ".join(e["tokens"]) for e in test])
    for i, (example, result) in enumerate(zip(test, results)):
        scored = inputs["labels"][i] != -100
        tags = [predictor.labels[t] for t in reference[i][scored].argmax(-1).tolist()]
        expected = [(kind, " ".join(example["tokens"][a:b])) for a, b, kind, _ in bio_spans(tags, [0.0] * len(tags))]
        assert [(e["type"], e["text"]) for e in result["entities"]] == expected
        assert result["words_tagged"] == len(example["tokens"])
        for entity in result["entities"]:
            assert " ".join(example["tokens"])[entity["start"]:entity["end"]] == entity["text"]
    # words of several sub-tokens get one tag each, read on their first sub-token
    [result] = predictor.predict(["Alice   Smithsonianesquely revisited Reykjavikhalla"])
    assert result["words"] == result["words_tagged"] == 4


def test_causal_lm_perplexity_and_generation(tmp_path):
    import random

    rng = random.Random(0)
    paragraphs = [" ".join(sentence(list(WORDS)[i % 3], rng) + "." for _ in range(8)) for i in range(30)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs))
    overrides = ["model=tiny_llama", "logger=csv", "export.checkpoint=false", "compression=none", "peft=lora",
                 "data=local_text", f"data.path={tmp_path / 'corpus.txt'}", "data.max_length=32",
                 "data.val_size=3", "data.test_size=3", "optimized_metric=test/perplexity", "train.batch_size=8"]
    run_config(overrides, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/model_agreement"] == 1.0
    predictor = load(tmp_path / "run")
    inputs, reference = export.load_reference(tmp_path / "run")
    # one window's perplexity from its decoded text is the exp of the run's own mean NLL on that window
    window = inputs["input_ids"][0]
    mine = predictor.perplexity_of_ids(window.tolist())
    assert mine["nll"] == pytest.approx(float(reference[0]), rel=1e-4)
    result = predictor.predict(["science experiment data. " * 40])[0]  # longer than one 32-token window
    assert result["tokens"] > 32 and result["perplexity"] > 1
    greedy = [predictor.generate("the guitar", max_new_tokens=5) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0]["new_tokens"] == 5
    sampled = predictor.generate("the guitar", max_new_tokens=5, sample=True, seed=3)
    assert sampled == predictor.generate("the guitar", max_new_tokens=5, sample=True, seed=3)


def test_a_run_without_a_model_export_is_refused(tmp_path):
    run_config(FAST + topic_csv(tmp_path) + ["compression=none", "peft=prefix"], tmp_path / "run")
    with pytest.raises(UserError, match="no model/ export"):
        load(tmp_path / "run")


@pytest.mark.parametrize("args, message", [
    (["--max-length", "100000"], "max_length=100000 is not allowed: the model has 128 positions"),
    (["--batch-size", "0"], "--batch-size=0 is not allowed"),
    (["--generate", "5"], "--generate is for causal-LM runs"),
    (["--top-k", "0"], "top_k=0 is not allowed"),
])
def test_bad_options_are_one_line_and_exit_2(classification_run, capsys, args, message):
    from llmk_lab import predict

    run_dir, texts = classification_run
    assert predict.main([str(run_dir), texts[0], *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_masked_lm_fills_masks_and_its_export_is_checked(tmp_path):
    import math

    import torch
    from transformers import AutoModelForMaskedLM

    data = [arg for arg in topic_csv(tmp_path) if not arg.startswith("data.test_size=")]
    overrides = FAST + data + ["data.test_size=10", "compression=none", "peft=full", "data.task=masked_lm",
                               "train.max_epochs=2", "train.lr=5e-3"]
    run_config(overrides, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics["export/model_agreement"] == 1.0 and metrics["export/model_max_abs_diff"] < 1e-6
    # the reference keeps each test window's mean NLL over its masked tokens: together, the run's perplexity
    inputs, reference = export.load_reference(tmp_path / "run")
    counts = (inputs["labels"] != -100).sum(-1)
    assert len(reference) == len(counts) < task_class("masked_lm").reference_size  # every test window: in the reference
    pooled = float((reference * counts).sum() / counts.sum())
    assert math.exp(pooled) == pytest.approx(metrics["test/perplexity"], rel=1e-4)
    predictor = load(tmp_path / "run", top_k=3)
    mask = predictor.tokenizer.mask_token
    [result] = predictor.predict([f"the {mask} played a {mask} guitar"])
    assert len(result["masks"]) == 2 and all(len(candidates) == 3 for candidates in result["masks"])
    scores = [c["score"] for c in result["masks"][0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
    assert mask not in result["filled"] and result["masks"][1][0]["token"] in result["filled"]
    # the best candidate is the plain model's own top token at that position
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "model").eval()
    batch = predictor.tokenizer([f"the {mask} played a {mask} guitar"], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits[0]
    first = int((batch["input_ids"][0] == predictor.tokenizer.mask_token_id).nonzero()[0])
    assert result["masks"][0][0]["token"] == predictor.tokenizer.decode([int(logits[first].argmax())]).strip()
    with pytest.raises(UserError, match=r"a masked-LM run fills \[MASK\] tokens: 'no mask here' has none"):
        predictor.predict(["no mask here"])

"""Tasks on hand-made examples: sub-word label alignment, seqeval entity scores, perplexity windows and
exp(mean NLL), calibration windows, masked-LM masking and NSP pairs, classification reports; slow tier on
the real assets (WNUT-16 NER with MiniLM, SmolLM2 perplexity on Shakespeare)."""
import math
import random

import pytest
import torch

from llmk_lab.data import RawData
from llmk_lab.data.module import TaskDataModule
from llmk_lab.errors import UserError
from llmk_lab.models import load_tokenizer
from llmk_lab.plan import plan
from llmk_lab.tasks import get_task
from llmk_lab.tasks.causal_lm import TokenNLL, random_windows, token_windows
from llmk_lab.tasks.masked_lm import segments_of, sentence_pairs
from llmk_lab.tasks.token_classification import EntityF1, align_labels, entity_scores
from tests.conftest import compose_config, read_metrics, run_config

FAST = ["logger=csv", "compression=none", "export.checkpoint=false", "train.batch_size=8", "train.eval_batch_size=16"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(plan(compose_config(["model=tiny_bert"])).settings.model)


# ------------------------------------------------------------------ token classification


def test_first_sub_token_carries_the_word_label_and_the_rest_are_ignored(tokenizer):
    words = ["Shakespearean", "sonnets", "in", "Stratford"]
    encoded = tokenizer(words, is_split_into_words=True)
    word_ids = encoded.word_ids()
    assert word_ids.count(0) > 1  # "Shakespearean" is split into several sub-words
    labels = align_labels(word_ids, [1, 0, 0, 2])
    first = {}
    for position, word in enumerate(word_ids):
        if word is None:
            assert labels[position] == -100  # [CLS], [SEP]
        elif word not in first:
            first[word] = position
            assert labels[position] == [1, 0, 0, 2][word]
        else:
            assert labels[position] == -100
    assert sorted(first) == [0, 1, 2, 3]


def test_entity_scores_follow_seqeval_on_a_hand_made_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-LOC", "O", "O"]]
    scores = entity_scores(gold, predicted)
    # Entities: gold PER x2, LOC x2; predicted PER (right), ORG (wrong), LOC (right).
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert scores["f1_PER"] == pytest.approx(2 * 1 * 0.5 / 1.5) and scores["recall_LOC"] == pytest.approx(0.5)
    assert scores["f1_ORG"] == 0.0 and scores["support_ORG"] == 0
    # A partly matched span is no match at all (exact entity boundaries).
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0


def test_entity_metric_reads_words_back_from_sub_word_batches():
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    metric = EntityF1(labels)
    # Two batches, -100 on sub-word continuations and padding.
    gold = torch.tensor([[-100, 1, -100, 2, 0, -100], [-100, 3, 0, -100, -100, -100]])
    predicted_ids = torch.tensor([[0, 1, 0, 2, 0, 0], [0, 3, 3, 0, 0, 0]])
    metric.update(torch.nn.functional.one_hot(predicted_ids, 4).float(), gold)
    metric.update(torch.nn.functional.one_hot(predicted_ids[:1], 4).float(), gold[:1])
    gold_seqs, predicted_seqs = metric.sequences()
    assert gold_seqs == [["B-PER", "I-PER", "O"], ["B-LOC", "O"], ["B-PER", "I-PER", "O"]]
    assert predicted_seqs == [["B-PER", "I-PER", "O"], ["B-LOC", "B-LOC"], ["B-PER", "I-PER", "O"]]
    assert metric.compute() == entity_scores(gold_seqs, predicted_seqs)


# ------------------------------------------------------------------ causal LM


def test_windows_are_non_overlapping_and_drop_the_remainder():
    assert token_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(list(range(3)), 4) == []


def test_perplexity_is_exp_of_the_mean_token_nll_over_all_batches():
    metric = TokenNLL()
    # Batch 1: one window of 3 tokens -> 2 predictions; batch 2: two windows of 3 tokens -> 4 predictions.
    # Logits chosen so that the target's probability is known exactly.
    def logits_for(probabilities_of_target, targets, vocab=4):
        rows = []
        for p, t in zip(probabilities_of_target, targets):
            rest = (1 - p) / (vocab - 1)
            rows.append([math.log(p) if v == t else math.log(rest) for v in range(vocab)])
        return torch.tensor(rows)

    ids1 = torch.tensor([[0, 1, 2]])
    l1 = torch.zeros(1, 3, 4)
    l1[0, :2] = logits_for([0.5, 0.25], [1, 2])
    ids2 = torch.tensor([[3, 0, 1], [2, 2, 2]])
    l2 = torch.zeros(2, 3, 4)
    l2[0, :2] = logits_for([0.1, 0.2], [0, 1])
    l2[1, :2] = logits_for([0.4, 0.8], [2, 2])
    metric.update(l1, ids1)
    metric.update(l2, ids2)
    nll = [-math.log(p) for p in (0.5, 0.25, 0.1, 0.2, 0.4, 0.8)]
    assert float(metric.compute()) == pytest.approx(math.exp(sum(nll) / 6), rel=1e-6)
    mean_of_batch_means = (sum(nll[:2]) / 2 + sum(nll[2:]) / 4) / 2
    assert float(metric.compute()) != pytest.approx(math.exp(mean_of_batch_means), rel=1e-3)
    assert int(metric.tokens) == 6


def causal_datamodule(tokenizer, seqlen=16, train_words=600):
    rng = random.Random(0)
    vocabulary = ["castle", "king", "night", "sword", "crown", "storm", "ghost", "queen"]
    train = [{"text": " ".join(rng.choice(vocabulary) for _ in range(train_words))} for _ in range(2)]
    # Evaluation text uses words the training text never has, so any window can be traced to its split.
    held_out = [{"text": " ".join(rng.choice(["apple", "river", "table", "window"]) for _ in range(200))}]
    raw = RawData(splits={"train": train, "validation": held_out, "test": held_out}, task="causal_lm")
    settings = plan(compose_config(["model=tiny_llama", "data=local_text", f"data.max_length={seqlen}",
                                    "data.path=unused"])).settings
    return TaskDataModule(raw, get_task("causal_lm", None), tokenizer, settings.data, settings.train, seed=0)


def test_calibration_windows_come_from_training_text_only_and_are_reproducible(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path))
    datamodule = causal_datamodule(tokenizer)
    first = datamodule.calibration_batches(12, batch_size=5)
    again = datamodule.calibration_batches(12, batch_size=5)
    assert [b["input_ids"].shape for b in first] == [torch.Size([5, 16]), torch.Size([5, 16]), torch.Size([2, 16])]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    stream = torch.cat([e["input_ids"] for e in datamodule.tokenized["train"]]).tolist()
    held_out_ids = set(torch.cat([e["input_ids"] for e in datamodule.tokenized["test"]]).tolist())
    train_only = set(stream) - held_out_ids
    windows = torch.cat([b["input_ids"] for b in first]).tolist()
    starts = set()
    for window in windows:
        matches = [i for i in range(len(stream) - 15) if stream[i:i + 16] == window]
        assert matches, "a calibration window is not a slice of the training text"
        starts.update(matches)
        assert set(window) <= train_only | {tokenizer.cls_token_id, tokenizer.sep_token_id}
    assert len(starts) > 6  # random offsets, not the first windows in order
    assert [w.tolist() for w in random_windows(torch.arange(100), 3, 10)] == \
           [w.tolist() for w in random_windows(torch.arange(100), 3, 10)]


def test_evaluation_windows_and_model_perplexity_agree_with_a_direct_computation(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path))
    from llmk_lab.models import load_model
    from llmk_lab.module import TaskModule

    datamodule = causal_datamodule(tokenizer)
    task = datamodule.task
    settings = plan(compose_config(["model=tiny_llama"])).settings
    model, _ = load_model(settings.model, task, tokenizer)
    model.eval()
    test_ids = tokenizer("\n\n".join([datamodule.raw.splits["test"][0]["text"]]))["input_ids"]
    windows = token_windows(test_ids, 16)
    assert [e["input_ids"].tolist() for e in datamodule.tokenized["test"]] == windows
    module = TaskModule(model, task, settings.train)
    total_nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            outputs = module(batch)
            task.update_metrics(module.metrics["test"], batch, outputs)
        for window in windows:
            ids = torch.tensor([window])
            logits = model(input_ids=ids).logits
            total_nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            tokens += 15
    values = task.compute_metrics(module.metrics["test"])
    assert values["perplexity"] == pytest.approx(math.exp(total_nll / tokens), rel=1e-4)
    assert values["nll"] == pytest.approx(total_nll / tokens, rel=1e-4)


# ------------------------------------------------------------------ masked LM


def test_nsp_pairs_are_next_segments_or_segments_of_another_document():
    documents = [" ".join(f"Doc{d} sentence {i}." for i in range(40)) for d in range(4)]
    pairs = sentence_pairs(documents, target_words=6, seed=0)
    assert pairs == sentence_pairs(documents, target_words=6, seed=0)
    positives = [p for p in pairs if p["next_sentence_label"] == 0]
    negatives = [p for p in pairs if p["next_sentence_label"] == 1]
    assert 0.3 < len(negatives) / len(pairs) < 0.7
    for pair in positives:
        doc = pair["text"].split()[0]
        segments = segments_of(documents[int(doc[3:])], 6)
        assert segments[segments.index(pair["text"]) + 1] == pair["text_pair"]
    for pair in negatives:
        assert pair["text"].split()[0] != pair["text_pair"].split()[0]
    with pytest.raises(UserError, match="at least 2 non-empty documents"):
        sentence_pairs(documents[:1], 6, 0)


def test_masked_lm_evaluation_masks_are_fixed_and_training_masks_are_fresh(tokenizer):
    settings = plan(compose_config(["model=tiny_bert", "+data.options.mlm_probability=0.3"])).settings
    task = get_task("masked_lm", None)
    task.configure(settings.data, seed=1)
    examples = [{"text": "the king walked to the castle at night and met a ghost " * 3}] * 4
    once = task.tokenize_split(tokenizer, examples, settings.data, "test")
    twice = task.tokenize_split(tokenizer, examples, settings.data, "test")
    assert once == twice
    masked = sum(label != -100 for e in once for label in e["labels"])
    assert 0.15 < masked / sum(len(e["labels"]) for e in once) < 0.45
    collate = task.collator(tokenizer)
    train = task.tokenize_split(tokenizer, examples, settings.data, "train")
    a, b = collate(train), collate(train)
    assert not torch.equal(a["labels"], b["labels"])  # dynamic masking: new positions every batch
    assert (a["labels"][a["input_ids"] == tokenizer.cls_token_id] == -100).all()


def test_masked_lm_pretraining_output_is_the_model_of_a_classification_run(tmp_path):
    from tests.test_data import topic_rows, write_csv

    write_csv(tmp_path / "topics.csv", topic_rows(48), ["body", "title", "topic"])
    common = [f"data.path={tmp_path / 'topics.csv'}", "data=local_csv", "data.text_column=body",
              "data.label_column=topic", "data.val_size=8", "data.test_size=8"]
    pretrain = run_config(FAST + ["model=tiny_bert", "peft=full", "data.task=masked_lm", "export.merged=true",
                                  "optimized_metric=test/perplexity"] + common, tmp_path / "mlm")
    assert pretrain["test/perplexity"] > 1 and 0 <= pretrain["test/masked_acc"] <= 1
    merged = tmp_path / "mlm" / "merged"
    classify = run_config(FAST + ["model=tiny_bert", "model.from_config=null", f"model.name_or_path={merged}",
                                  "model.tokenizer=null"] + common, tmp_path / "cls")
    assert 0 <= classify["test/acc"] <= 1
    manifest = (tmp_path / "cls" / "manifest.json").read_text()
    assert str(merged) in manifest


def test_classification_needs_two_classes():
    with pytest.raises(UserError, match="at least 2 labels"):
        get_task("sequence_classification", ["only"])


# ------------------------------------------------------------------ slow: real assets


@pytest.mark.slow
def test_ner_on_wnut16_with_minilm_reports_entity_f1_per_type(tmp_path):
    metrics = run_config(["+experiment=ner_wnut16", "logger=csv", "data.limit_train=400", "data.limit_eval=150",
                          "train.max_epochs=1", "train.lr=3e-4"], tmp_path)
    assert 0.0 <= metrics["test/f1"] <= 1.0
    per_type = {k for k in metrics if k.startswith("test/f1_")}
    assert {"test/f1_person", "test/f1_geo-loc"} <= per_type and len(per_type) >= 5
    # 25 steps only teach the tag distribution (95 % of words are O; entity F1 can still be 0 at this
    # budget): the loss falls far below uniform guessing over the 21 tags (ln 21 = 3.04).
    assert metrics["test/loss"] < 1.0
    assert metrics["test/support_person"] > 0


@pytest.mark.slow
def test_smollm2_perplexity_on_a_few_shakespeare_windows_is_finite_and_sane(tmp_path):
    metrics = run_config(["+experiment=smollm2_perplexity", "logger=csv", "data.max_length=128",
                          "data.limit_eval=4"], tmp_path)
    for stage in ("val", "test"):
        assert math.isfinite(metrics[f"{stage}/perplexity"])
        # Uniform guessing over 49,152 tokens would be 49,152; a working 135M LM on Shakespeare is far below.
        assert 5 < metrics[f"{stage}/perplexity"] < 300, metrics[f"{stage}/perplexity"]
    assert metrics["train/steps"] == 0
    assert read_metrics(tmp_path)["test/perplexity"] == pytest.approx(metrics["test/perplexity"])

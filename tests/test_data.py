"""A user's own files (CSV, JSON lines, CoNLL, plain text) end to end, the tokenisation cache, and bad input."""
import csv
import json
import random

import pytest

from llmk_lab.data import load_data
from llmk_lab.errors import UserError
from llmk_lab.plan import plan
from llmk_lab.cli import _objective
from llmk_lab.sweep_layout import infer_direction
from tests.conftest import compose_config, read_metrics, run_cli, run_config

FAST = ["logger=csv", "compression=none", "export.checkpoint=false", "train.batch_size=8", "train.eval_batch_size=16"]
WORDS = {"sports": ["match", "goal", "team", "coach", "league"], "food": ["pasta", "bread", "sauce", "oven", "salad"],
         "music": ["guitar", "song", "album", "drummer", "chorus"]}


def sentence(topic: str, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS[topic]) for _ in range(6))


def write_csv(path, rows, fieldnames, delimiter=","):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = list(WORDS)[i % 3]
        rows.append({"body": sentence(topic, rng), "title": topic.upper(), "topic": topic})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def conll_sentences(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    people, places = ["Alice", "Bob", "Carol"], ["Paris", "Rome", "Oslo"]
    out = []
    for _ in range(n):
        out.append([(rng.choice(people), "B-PER"), ("Smith", "I-PER"), ("visited", "O"), (rng.choice(places), "B-LOC"),
                    ("today", "O")])
    return out


def write_conll(path, sentences):
    path.write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in s) for s in sentences) + "\n")


def data_cfg(overrides):
    return plan(compose_config(overrides)).settings.data


# ------------------------------------------------------------------ end to end


def test_csv_sentence_pairs_multiclass_end_to_end(tmp_path):
    write_csv(tmp_path / "topics.csv", topic_rows(60), ["body", "title", "topic"])
    metrics = run_config(FAST + ["model=tiny_bert", "data=local_csv", f"data.path={tmp_path / 'topics.csv'}",
                                 "data.text_column=body", "data.text_pair_column=title", "data.label_column=topic",
                                 "data.val_size=12", "data.test_size=12"], tmp_path / "run")
    for key in ("test/acc", "test/macro_f1", "test/f1_food", "test/f1_music", "test/f1_sports",
                "test/precision_food", "test/recall_music"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["data/train_examples"] == 36


def test_tsv_is_read_with_tabs(tmp_path):
    write_csv(tmp_path / "topics.tsv", topic_rows(30), ["body", "title", "topic"], delimiter="\t")
    cfg = data_cfg(["data=local_tsv", f"data.path={tmp_path / 'topics.tsv'}", "data.text_column=body",
                    "data.label_column=topic", "data.val_size=6", "data.test_size=6"])
    raw = load_data(cfg)
    assert raw.labels == ["food", "music", "sports"] and raw.sizes() == {"train": 18, "validation": 6, "test": 6}


def test_parquet_is_read(tmp_path):
    import pandas as pd

    pd.DataFrame(topic_rows(30)).to_parquet(tmp_path / "topics.parquet")
    raw = load_data(data_cfg(["data=local_parquet", f"data.path={tmp_path / 'topics.parquet'}", "data.text_column=body",
                              "data.label_column=topic", "data.val_size=6", "data.test_size=6"]))
    assert raw.labels == ["food", "music", "sports"] and raw.sizes() == {"train": 18, "validation": 6, "test": 6}
    assert all(isinstance(e["label"], int) and isinstance(e["text"], str) for e in raw.splits["train"])


def test_jsonl_directory_of_splits_end_to_end(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, n, seed in (("train", 40, 0), ("validation", 9, 1), ("test", 9, 2)):
        write_jsonl(folder / f"{name}.jsonl", [{"text": r["body"], "label": i % 3} for i, r in
                                               enumerate(topic_rows(n, seed))])
    metrics = run_config(FAST + ["model=tiny_bert", "data=local_jsonl", f"data.path={folder}"], tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["split"] == "from files"
    assert manifest["data"]["sizes"] == {"train": 40, "validation": 9, "test": 9}
    # Integer labels keep their order and become the class names.
    assert {"test/f1_0", "test/f1_1", "test/f1_2"} <= set(metrics)


def test_conll_ner_end_to_end_reports_entity_f1_per_type(tmp_path):
    write_conll(tmp_path / "ner.conll", conll_sentences(40))
    metrics = run_config(FAST + ["model=tiny_bert", "data=local_conll", f"data.path={tmp_path / 'ner.conll'}",
                                 "data.val_size=8", "data.test_size=8"], tmp_path / "run")
    for key in ("test/f1", "test/precision", "test/recall", "test/f1_PER", "test/f1_LOC", "val/f1_PER"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # optimized_metric left at its default: the sweepers get the NER task's entity F1, not a test/acc it lacks.
    assert metrics["optimized_metric"] == "test/f1" and read_metrics(tmp_path / "run")["optimized_metric"] == "test/f1"
    assert _objective(metrics, None) == metrics["test/f1"]
    assert metrics["test/support_PER"] == 8 and metrics["test/support_LOC"] == 8


def test_text_file_causal_lm_end_to_end_and_second_run_hits_the_tokenisation_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    paragraphs = [" ".join(sentence(list(WORDS)[i % 3], rng) + "." for _ in range(8)) for i in range(30)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs))
    overrides = FAST + ["model=tiny_llama", "data=local_text", f"data.path={tmp_path / 'corpus.txt'}",
                        "data.max_length=32", "data.val_size=3", "data.test_size=3", "peft=lora"]
    first = run_config(overrides, tmp_path / "a")
    second = run_config(overrides, tmp_path / "b")
    assert (first["data/tokenization_cache_hit"], second["data/tokenization_cache_hit"]) == (False, True)
    assert first["test/perplexity"] == pytest.approx(second["test/perplexity"])
    # The default objective of a language model: its perplexity, which sweeps and reports minimise.
    assert first["optimized_metric"] == "test/perplexity" and infer_direction(first["optimized_metric"]) == "minimize"
    assert _objective(first, None) == first["test/perplexity"]
    assert 1.0 < first["test/perplexity"] < 2 * 30522  # a random 30k-vocabulary model: about the vocabulary size
    log = (tmp_path / "b" / "llmk_lab.log")
    if log.exists():  # written by the CLI's logging setup; in-process runs may not have it
        assert "cache hit" in log.read_text()


# ------------------------------------------------------------------ bad input


@pytest.mark.slow  # a subprocess start; the in-process cases below cover each bad input quickly
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path):
    result = run_cli(["data=local_csv", f"data.path={tmp_path / 'nope.csv'}", "model=tiny_bert", "logger=none"],
                     cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.path=" in errors[0] and "no such file" in errors[0]
    assert "Traceback" not in result.stderr


def bad_input_cases(tmp_path):
    rows = topic_rows(30)
    write_csv(tmp_path / "ok.csv", rows, ["body", "title", "topic"])
    write_csv(tmp_path / "numbers.csv", [{"body": i, "topic": "a" if i % 2 else "b"} for i in range(30)],
              ["body", "topic"])
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    write_csv(unseen / "train.csv", [r for r in rows if r["topic"] != "music"], ["body", "title", "topic"])
    write_csv(unseen / "validation.csv", rows[:6], ["body", "title", "topic"])
    write_csv(unseen / "test.csv", rows[:6], ["body", "title", "topic"])
    empty = tmp_path / "empty"
    empty.mkdir()
    write_csv(empty / "train.csv", rows, ["body", "title", "topic"])
    write_csv(empty / "validation.csv", rows[:6], ["body", "title", "topic"])
    write_csv(empty / "test.csv", [], ["body", "title", "topic"])
    write_jsonl(tmp_path / "tags.jsonl", [{"tokens": ["Alice", "went", "home"], "tags": ["B-PER", "O", "O"]}] * 20
                + [{"tokens": ["Bob", "left"], "tags": ["B-PER", "O", "O"]}])
    (tmp_path / "untagged.conll").write_text("Alice\tB-PER\nwent\n\nBob\tB-PER\n")
    base = ["data.text_column=body", "data.label_column=topic", "data.val_size=6", "data.test_size=6"]
    return {
        "missing file": (["data=local_csv", f"data.path={tmp_path / 'missing.csv'}"] + base, "no such file"),
        "missing path": (["data=local_csv", "data.path=null"] + base, "data.path is required"),
        "missing column": (["data=local_csv", f"data.path={tmp_path / 'ok.csv'}", "data.text_column=content",
                            "data.label_column=topic", "data.val_size=6", "data.test_size=6"],
                           "data.text_column='content' is not a column"),
        "missing label column": (["data=local_csv", f"data.path={tmp_path / 'ok.csv'}", "data.text_column=body",
                                  "data.val_size=6", "data.test_size=6"], "data.label_column='label' is not a column"),
        "empty split": (["data=local_csv", f"data.path={empty}"] + base, "test split is empty"),
        "unseen labels": (["data=local_csv", f"data.path={unseen}"] + base, "never has"),
        "text not text": (["data=local_csv", f"data.path={tmp_path / 'numbers.csv'}"] + base, "not text"),
        "too few rows": (["data=local_csv", f"data.path={tmp_path / 'ok.csv'}", "data.text_column=body",
                          "data.label_column=topic"], "held-out"),
        "tag length": (["data=local_jsonl", f"data.path={tmp_path / 'tags.jsonl'}", "data.task=token_classification",
                        "data.text_column=tokens", "data.label_column=tags", "data.val_size=2", "data.test_size=2"],
                       "3 tags for 2 tokens"),
        "conll without tag": (["data=local_conll", f"data.path={tmp_path / 'untagged.conll'}"], "line 2"),
    }


CASES = ["missing file", "missing path", "missing column", "missing label column", "empty split", "unseen labels",
         "text not text", "too few rows", "tag length", "conll without tag"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(tmp_path, case):
    overrides, message = bad_input_cases(tmp_path)[case]
    with pytest.raises(UserError) as err:
        load_data(data_cfg(overrides))
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_hub_dataset_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"data.path='no-such-user/no-such-dataset': cannot load the hub dataset"):
        load_data(data_cfg(["data=hub", "data.path=no-such-user/no-such-dataset"]))

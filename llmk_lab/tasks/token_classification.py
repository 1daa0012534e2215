"""Token classification (NER): BIO tags on words, scored by entities with seqeval.

Words are split into sub-word tokens; the first sub-token of each word
carries the word's tag and the others get -100 (ignored by the loss and the
metrics), so predictions are read back once per word. At epoch end the
predicted and gold tag sequences of every example go to seqeval, which scores
whole entities (type and exact span, CoNLL's definition): precision, recall and
F1 overall (micro) and per entity type.
"""
from __future__ import annotations


import torch
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from llmk_lab.errors import UserError
from llmk_lab.tasks import TASKS, Task, check_token_tags, index_labels, metric_name


def align_labels(word_ids: list, word_labels: list[int]) -> list[int]:
    """Per sub-word token: the word's label on its first sub-token, -100 elsewhere and on special tokens."""
    aligned, previous = [], None
    for word in word_ids:
        aligned.append(-100 if word is None or word == previous else word_labels[word])
        previous = word
    return aligned


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """seqeval's entity-level precision / recall / F1: overall (micro) and `<metric>_<type>` per type."""
    from seqeval.metrics import classification_report

    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    overall = report["micro avg"]
    scores = {"precision": overall["precision"], "recall": overall["recall"], "f1": overall["f1-score"],
              "macro_f1": report["macro avg"]["f1-score"]}
    for kind, row in report.items():
        if kind.endswith(" avg"):
            continue
        kind = metric_name(kind)
        scores[f"f1_{kind}"] = row["f1-score"]
        scores[f"precision_{kind}"] = row["precision"]
        scores[f"recall_{kind}"] = row["recall"]
        scores[f"support_{kind}"] = row["support"]
    return {k: float(v) for k, v in scores.items()}


class EntityF1(Metric):
    """Collects word-level predicted and gold tag ids per example; scores entities with seqeval at compute."""
    full_state_update = False

    def __init__(self, labels: list[str]):
        super().__init__()
        self.labels = labels
        self.add_state("predicted", default=[], dist_reduce_fx="cat")
        self.add_state("gold", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        scored = labels != -100
        self.predicted.append(logits.argmax(-1)[scored])
        self.gold.append(labels[scored])
        self.lengths.append(scored.sum(-1))

    def sequences(self) -> tuple[list[list[str]], list[list[str]]]:
        def cat(state):
            return torch.cat(state) if isinstance(state, list) else state
        predicted, gold, lengths = cat(self.predicted), cat(self.gold), cat(self.lengths)
        gold_seqs, predicted_seqs, at = [], [], 0
        for n in lengths.tolist():
            gold_seqs.append([self.labels[i] for i in gold[at:at + n].tolist()])
            predicted_seqs.append([self.labels[i] for i in predicted[at:at + n].tolist()])
            at += n
        return gold_seqs, predicted_seqs

    def compute(self) -> dict[str, float]:
        return entity_scores(*self.sequences())


@TASKS.register("token_classification")
class TokenClassification(Task):
    auto_class = AutoModelForTokenClassification
    peft_task_type = "TOKEN_CLS"
    primary_metric = "f1"
    summary_metrics = ("macro_f1", "f1")
    example_format = "tagged_tokens"
    scores = "token"

    @classmethod
    def label_names(cls, splits, setting):
        check_token_tags(splits, setting)
        return index_labels(splits, "tags", setting, sequence=True)

    @classmethod
    def agreement(cls, ours, theirs, labels=None):
        same, gap = ours.argmax(-1) == theirs.argmax(-1), (ours - theirs).abs()
        if labels is not None:
            read = labels != -100  # the words' first sub-tokens: where a tag is read (padding is not)
            same, gap = same[read], gap[read]
        return {"agreement": float(same.double().mean()), "max_abs_diff": float(gap.max())}

    @classmethod
    def comparison(cls, a, b, labels=None):
        if labels is not None:  # the words' first sub-tokens
            a, b = a[labels != -100], b[labels != -100]
        return super().comparison(a, b)

    def model_kwargs(self):
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}

    @staticmethod
    def check_examples(raw, data_cfg) -> None:
        for split, examples in raw.splits.items():
            for number, example in enumerate(examples):
                if len(example["tokens"]) != len(example["tags"]):
                    raise UserError(f"data.name={data_cfg.name!r}: {split} example {number} has {len(example['tags'])} "
                                    f"tags for {len(example['tokens'])} tokens; every token needs exactly one tag")

    def tokenize(self, tokenizer, examples, data_cfg):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("token classification needs a fast tokenizer (to map sub-words back to words)")
        encoded = tokenizer([e["tokens"] for e in examples], is_split_into_words=True, truncation=True,
                            max_length=data_cfg.max_length)
        out = []
        for i, example in enumerate(examples):
            item = {k: encoded[k][i] for k in encoded.keys()}
            item["labels"] = align_labels(encoded.word_ids(i), example["tags"])
            out.append(item)
        return out

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer, return_tensors="pt")

    def metrics(self):
        return MetricCollection({"entity": EntityF1(self.labels)})

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits, batch["labels"])

    def compute_metrics(self, metrics):
        return dict(metrics["entity"].compute())

"""Sequence classification (single sentences or pairs), binary or multi-class.

Metrics (torchmetrics): accuracy, macro-F1, and a per-class report
(`precision_<label>`, `recall_<label>`, `f1_<label>`). A second text column
(`data.text_pair_column`) makes the input a sentence pair, encoded the BERT way
(`[CLS] a [SEP] b [SEP]` with segment ids).
"""
from __future__ import annotations


from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from llmk_lab.errors import UserError
from llmk_lab.tasks import TASKS, Task, index_labels, metric_name


@TASKS.register("sequence_classification")
class SequenceClassification(Task):
    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    primary_metric = "acc"
    summary_metrics = ("acc", "macro_f1")
    onnx_export = True

    def __init__(self, labels=None):
        if not labels or len(labels) < 2:
            raise UserError(f"sequence classification needs at least 2 labels; the data has {labels}")
        super().__init__(labels)

    @classmethod
    def label_names(cls, splits, setting):
        return index_labels(splits, "label", setting)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @staticmethod
    def check_examples(raw, data_cfg) -> None:
        for split, examples in raw.splits.items():
            for number, example in enumerate(examples):
                for key, setting in (("text", "text_column"), ("text_pair", "text_pair_column")):
                    if key in example and not isinstance(example[key], str):
                        raise UserError(f"data.{setting}={getattr(data_cfg, setting)!r}: {split} example {number} "
                                        f"holds {type(example[key]).__name__} ({example[key]!r:.40}), not text")

    def model_kwargs(self):
        return {
            "num_labels": self.num_labels,
            "id2label": dict(enumerate(self.labels)),
            "label2id": {label: i for i, label in enumerate(self.labels)},
        }

    def tokenize(self, tokenizer, examples, data_cfg):
        texts = [e["text"] for e in examples]
        pairs = [e["text_pair"] for e in examples] if examples and "text_pair" in examples[0] else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=data_cfg.max_length)
        return [
            {**{k: encoded[k][i] for k in encoded.keys()}, "labels": e["label"]}
            for i, e in enumerate(examples)
        ]

    def collator(self, tokenizer):
        # Pad each batch to its own longest example: most sentences are far
        # shorter than max_length, so this is several times faster than fixed padding.
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def metrics(self):
        return MetricCollection({
            "acc": MulticlassAccuracy(num_classes=self.num_labels, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes=self.num_labels, average="macro"),
            "precision_per_class": MulticlassPrecision(num_classes=self.num_labels, average=None),
            "recall_per_class": MulticlassRecall(num_classes=self.num_labels, average=None),
            "f1_per_class": MulticlassF1Score(num_classes=self.num_labels, average=None),
        })

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits.argmax(-1), batch["labels"])

    def compute_metrics(self, metrics):
        values = {}
        for name, value in metrics.compute().items():
            if name.endswith("_per_class"):
                kind = name.removesuffix("_per_class")
                values.update({f"{kind}_{metric_name(label)}": float(v) for label, v in zip(self.labels, value)})
            else:
                values[name] = float(value)
        return values

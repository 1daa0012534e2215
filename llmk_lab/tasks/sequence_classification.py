"""Sequence classification (single sentences or pairs): accuracy and macro-F1."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from llmk_lab.tasks import TASKS, Task


@dataclass
class SequenceClassificationConfig:
    name: str = "sequence_classification"


@TASKS.register("sequence_classification", config=SequenceClassificationConfig)
class SequenceClassification(Task):
    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    primary_metric = "acc"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

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
        })

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits.argmax(-1), batch["labels"])

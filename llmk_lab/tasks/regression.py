"""Regression on text (single sentences or pairs): one number per example, e.g. a similarity or a rating.

The sibling of sequence classification: the same inputs (`data.text_column`, optionally
`data.text_pair_column`) and the same transformers head with one output (`num_labels=1`,
`problem_type="regression"`, so the model's loss is the mean squared error). `data.label_column` holds
numbers. Metrics (torchmetrics): Pearson and Spearman correlation (how STS-B is reported), mean squared
and mean absolute error. Everything the pipeline needs of a task is declared here: adding this task
changed no file outside `llmk_lab/tasks/`.
"""
from __future__ import annotations

import math

import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from llmk_lab.errors import UserError
from llmk_lab.tasks import TASKS, Task
from llmk_lab.tasks.sequence_classification import SequenceClassification


@TASKS.register("regression")
class Regression(Task):
    auto_class = AutoModelForSequenceClassification
    peft_task_type = "SEQ_CLS"
    primary_metric = "pearson"
    summary_metrics = ("pearson", "spearman", "mse")
    example_format = "labelled_text"
    scores = "sequence"
    scores_a_distribution = False
    loss_is_label_cross_entropy = False

    check_examples = staticmethod(SequenceClassification.check_examples)

    @classmethod
    def label_names(cls, splits, setting):
        """Numbers, not classes: each label is read as a float and there is no label vocabulary."""
        for split, examples in splits.items():
            for number, example in enumerate(examples):
                value = example["label"]
                try:
                    example["label"] = float(value)
                except (TypeError, ValueError):
                    raise UserError(f"{setting}: {split} example {number} holds {value!r:.40}, not a number; "
                                    "regression needs numeric labels") from None
                if not math.isfinite(example["label"]):
                    raise UserError(f"{setting}: {split} example {number} holds {value!r}; allowed: finite numbers")
        if len({e["label"] for e in splits.get("train", [])}) < 2:
            raise UserError(f"{setting}: the training split has fewer than 2 distinct values; nothing to regress")
        return None

    def model_kwargs(self):
        return {"num_labels": 1, "problem_type": "regression"}

    def tokenize(self, tokenizer, examples, data_cfg):
        texts = [e["text"] for e in examples]
        pairs = [e["text_pair"] for e in examples] if examples and "text_pair" in examples[0] else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=data_cfg.max_length)
        return [{**{k: encoded[k][i] for k in encoded.keys()}, "labels": float(e["label"])}
                for i, e in enumerate(examples)]

    def collator(self, tokenizer):
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def metrics(self):
        # Updated together on the same predictions and targets; Pearson and Spearman keep every pair.
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(),
                                 "mse": MeanSquaredError(), "mae": MeanAbsoluteError()})

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits.squeeze(-1).float(), batch["labels"].float())

    @classmethod
    def agreement(cls, ours, theirs, labels=None):
        gap = (ours - theirs).abs()
        same = torch.isclose(ours, theirs, rtol=1e-4, atol=1e-5)
        return {"agreement": float(same.double().mean()), "max_abs_diff": float(gap.max())}

    @classmethod
    def fidelity_sums(cls, dense, compressed, labels=None):
        gap = (dense - compressed).squeeze(-1)
        return {"mean_abs_diff": float(gap.abs().sum()), "mean_squared_diff": float((gap ** 2).sum())}, int(gap.numel())

    @classmethod
    def comparison(cls, a, b, labels=None):
        a, b = a.squeeze(-1).double(), b.squeeze(-1).double()
        pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(a) > 1 else float("nan")
        return {"pearson": pearson, "mean_abs_diff": float((a - b).abs().mean())}

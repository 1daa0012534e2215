"""Tasks: what a model is trained to predict, how examples are tokenised, and how results are scored.

A task is registered once and picked by the dataset (or `data.task`). Adding
a task is one file in this folder.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torchmetrics import MetricCollection

from llmk_lab.registry import Registry, import_submodules


class Task:
    """Interface every task implements."""

    registered_name: str
    # transformers Auto class whose head the task trains.
    auto_class: Any
    # peft `TaskType` name, so peft knows which head to keep trainable.
    peft_task_type: str
    # Metric (without stage prefix) that sums up the task, e.g. "acc".
    primary_metric: str
    # Top-level submodules that form the task head: trained by every PEFT strategy.
    head_modules: tuple[str, ...] = ("classifier", "score")

    def __init__(self, labels: list[str] | None = None):
        self.labels = labels

    def model_kwargs(self) -> dict[str, Any]:
        """Extra arguments for `from_pretrained` (e.g. num_labels)."""
        return {}

    def tokenize(self, tokenizer, examples: list[dict], data_cfg) -> list[dict]:
        raise NotImplementedError

    def collator(self, tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        raise NotImplementedError

    def eval_outputs(self, model, batch: dict) -> Any:
        """The model's outputs on an evaluation batch; `update_metrics` and the logged `loss` read them.
        A task may compute them more frugally (causal LM: the loss without the whole batch's logits)."""
        return model(**batch)

    def update_metrics(self, metrics: MetricCollection, batch: dict, outputs: Any) -> None:
        raise NotImplementedError

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.compute().items()}

    def predictions(self, outputs: Any) -> torch.Tensor:
        """Hard predictions, for agreement with another model."""
        return outputs.logits.argmax(-1)


TASKS: Registry[Task] = Registry("task", key="name", store_schemas=False)


def metric_name(label) -> str:
    """A class or entity-type name as it appears in a metric key (`f1_<name>`): no spaces or slashes."""
    return re.sub(r"[^\w\-]+", "_", str(label)).strip("_") or "_"


def get_task(name: str, labels: list[str] | None) -> Task:
    return TASKS.get(name, "data.task").cls(labels)


# Every module of this package registers its tasks entries when imported.
import_submodules(__name__, __path__)

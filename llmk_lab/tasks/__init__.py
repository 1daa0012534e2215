"""Tasks: what a model is trained to predict, how examples are tokenised, and how results are scored.

A task is registered once and picked by the dataset (or `data.task`). Adding
a task is one file in this folder.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
from torchmetrics import MetricCollection

from llmk_lab.registry import Registry, import_submodules


class Task:
    """Interface every task implements. The data module and the loaders call only what is declared here;
    a task overrides the hooks whose defaults do not fit it."""

    registered_name: str
    # transformers Auto class whose head the task trains.
    auto_class: Any
    # peft `TaskType` name, so peft knows which head to keep trainable.
    peft_task_type: Optional[str]
    # Metric (without stage prefix) that sums up the task, e.g. "acc".
    primary_metric: str
    # Top-level submodules that form the task head: trained by every PEFT strategy.
    head_modules: tuple[str, ...] = ("classifier", "score")
    # Whether `data.limit_*` count tokenised examples (windows cut from a text stream) rather than raw examples.
    limits_count_windows: bool = False
    # Whether the model predicts the next token of any text (a causal LM head): lm-evaluation-harness scores
    # continuations with it (`eval.lm_eval`).
    scores_text_continuations: bool = False
    # How the headline number is computed, recorded in the manifest next to the data (`{seqlen}`: data.max_length).
    protocol: Optional[str] = None

    def __init__(self, labels: list[str] | None = None):
        self.labels = labels

    def model_kwargs(self) -> dict[str, Any]:
        """Extra arguments for `from_pretrained` (e.g. num_labels)."""
        return {}

    def configure(self, data_cfg, seed: int) -> None:
        """Read task options from the data config before tokenising (e.g. the masking probability)."""

    @staticmethod
    def check_examples(raw, data_cfg) -> None:
        """Refuse raw examples the task cannot use, in one line naming the data key (default: accept all)."""

    def tokenize(self, tokenizer, examples: list[dict], data_cfg) -> list[dict]:
        raise NotImplementedError

    def tokenize_split(self, tokenizer, examples: list[dict], data_cfg, split: str) -> list[dict]:
        """Tokenise one split; tasks whose evaluation splits differ (fixed masks, ...) override this."""
        return self.tokenize(tokenizer, examples, data_cfg)

    def calibration_examples(self, splits: dict[str, list[dict]], n_examples: int, data_cfg,
                             seed: int = 0) -> list[dict]:
        """Tokenised training examples for one-shot compression (never validation or test): the first
        `n_examples` of the fixed, seeded split (`seed` unused); causal LM draws random windows with `seed`."""
        return splits["train"][:n_examples]

    def logits(self, outputs: Any) -> torch.Tensor:
        """The scores the task's head produces, for measurement, distillation and export checks
        (BERT's pretraining heads call them `prediction_logits`)."""
        return outputs.logits

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



TASKS: Registry[Task] = Registry("task", key="name", store_schemas=False)


def metric_name(label) -> str:
    """A class or entity-type name as it appears in a metric key (`f1_<name>`): no spaces or slashes."""
    return re.sub(r"[^\w\-]+", "_", str(label)).strip("_") or "_"


def get_task(name: str, labels: list[str] | None) -> Task:
    return TASKS.get(name, "data.task").cls(labels)


def optimized_metric(setting: Optional[str], task: Task) -> str:
    """The metric a run is judged by (returned to the sweepers, ranked by the sweep report): `optimized_metric`
    when it is set, else the task's primary metric on the test split. The run records it in metrics.json."""
    return setting or f"test/{task.primary_metric}"


# Every module of this package registers its tasks entries when imported.
import_submodules(__name__, __path__)

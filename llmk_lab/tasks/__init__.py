"""Tasks: what a model is trained to predict, how examples are tokenised, and how results are scored.

A task is registered once and picked by the dataset (or `data.task`). Adding
a task is one file in this folder.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
from torchmetrics import MetricCollection

from llmk_lab.errors import UserError
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
    # The metrics the end-of-run table shows for validation and test (metrics.json holds them all).
    summary_metrics: tuple[str, ...] = ("perplexity",)
    # Top-level submodules that form the task head: trained by every PEFT strategy.
    head_modules: tuple[str, ...] = ("classifier", "score")
    # Whether `data.limit_*` count tokenised examples (windows cut from a text stream) rather than raw examples.
    limits_count_windows: bool = False
    # Whether the model predicts the next token of any text (a causal LM head): lm-evaluation-harness scores
    # continuations with it (`eval.lm_eval`).
    scores_text_continuations: bool = False
    # How the headline number is computed, recorded in the manifest next to the data (`{seqlen}`: data.max_length).
    protocol: Optional[str] = None
    # What a raw example holds, which is what the data loaders read from user files and hub datasets:
    # "text" ({"text"}), "labelled_text" ({"text", "label"}, optionally "text_pair"), "tagged_tokens"
    # ({"tokens", "tags"}: one tag per token).
    example_format: str = "labelled_text"
    # What the head scores: "sequence" (one row of outputs per example), "token" (a row per token), "text" (a
    # language model's loss over a window). The test reference, the agreement of two models and the
    # cross-layer head read it.
    scores: str = "sequence"
    # Whether the head's scores are the logits of a distribution (over classes or tokens): what distillation's KL
    # between teacher and student reads.
    scores_a_distribution: bool = True
    # Whether the training loss is the cross-entropy of the head's scores against `labels` alone (-100 ignored):
    # what label smoothing and the cross-layer head's own loss replace.
    loss_is_label_cross_entropy: bool = True
    # Test examples whose outputs the run keeps as its reference (`reference/test.safetensors`); language-model
    # tasks keep windows, each scored by its mean token NLL.
    reference_size: int = 1000
    # Whether the test stage's outputs are per-example logits the export can take as the reference as they are
    # (language models score their loss in chunks and keep no logits).
    test_stage_keeps_outputs: bool = True
    # Whether `python -m llmk_lab.export RUN_DIR --onnx` can export and check the run's model.
    onnx_export: bool = False

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

    # What the data loaders, the export and the comparison of two runs need of a task, by its name alone
    # (a finished run's folder records the name): class methods.

    @classmethod
    def label_names(cls, splits: dict[str, list[dict]], setting: str) -> Optional[list[str]]:
        """Check the raw examples' labels and index them; return the label names (None: the task has none)."""
        return None

    @classmethod
    def reference_batch(cls, tokenizer, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Tokenised examples as one batch of tensors padded to the longest, with their labels (-100 pads per-token
        labels)."""
        features = [{k: e[k] for k in INPUT_KEYS if k in e} for e in examples]
        batch = dict(tokenizer.pad(features, padding="longest", return_tensors="pt"))
        width = batch["input_ids"].shape[1]
        labels = []
        for e in examples:
            label = e.get("labels")
            if isinstance(label, (list, tuple)) or getattr(label, "ndim", 0):  # per token: pad with -100
                label = list(label) + [-100] * (width - len(label))
            labels.append(label)
        batch["labels"] = torch.tensor(labels)
        return {k: v for k, v in batch.items() if k in (*INPUT_KEYS, "labels")}

    @classmethod
    def example_outputs(cls, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the reference keeps of a batch's head scores (float32, on the batch's device): the logits."""
        return logits

    @classmethod
    def agreement(cls, ours: torch.Tensor, theirs: torch.Tensor, labels=None) -> dict[str, float]:
        """How far two models' outputs on the same examples are apart: the share of identical predictions and
        the largest difference."""
        same, gap = ours.argmax(-1) == theirs.argmax(-1), (ours - theirs).abs()
        return {"agreement": float(same.double().mean()), "max_abs_diff": float(gap.max())}

    @classmethod
    def fidelity_sums(cls, dense: torch.Tensor, compressed: torch.Tensor, labels=None) -> tuple[dict[str, float], int]:
        """Sums over one batch of how far the compressed model's scores are from the dense model's, and the number
        of predictions they sum over (`measure.fidelity_figures` divides): identical top predictions
        (`agreement`) and KL(dense || compressed) (`mean_kl`), at the labelled positions where labels are per
        position."""
        valid = (labels != -100) if labels is not None and labels.shape == dense.shape[:-1] else \
            torch.ones(dense.shape[:-1], dtype=torch.bool, device=dense.device)
        d, c = dense[valid], compressed[valid]
        kl = torch.nn.functional.kl_div(torch.log_softmax(c, -1), torch.log_softmax(d, -1), log_target=True,
                                        reduction="sum")
        return {"agreement": float((d.argmax(-1) == c.argmax(-1)).sum()), "mean_kl": float(kl)}, int(d.shape[0])

    @classmethod
    def comparison(cls, a: torch.Tensor, b: torch.Tensor, labels=None) -> dict[str, float]:
        """How run B's predictions differ from run A's (`python -m llmk_lab.compare`): the share of identical
        predictions and the mean KL divergence of B's class distribution from A's."""
        kl = torch.nn.functional.kl_div(torch.log_softmax(b, -1), torch.log_softmax(a, -1), log_target=True,
                                        reduction="none").sum(-1)
        return {"agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()), "mean_kl": float(kl.mean())}


# The tokenizer outputs a model's forward takes (the rest of a tokenised example is labels and bookkeeping).
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def loss_comparison(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Two language models' mean token NLLs per window: how often they agree, and B's perplexity over A's."""
    return {"agreement": float(torch.isclose(a, b, rtol=1e-4, atol=1e-5).double().mean()),
            "perplexity_ratio": float(torch.exp(b.mean()) / torch.exp(a.mean()))}


def loss_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Agreement of two language models' mean token NLLs per window: equal to float32 precision."""
    return {"agreement": float(torch.isclose(ours, theirs, rtol=1e-4, atol=1e-5).double().mean()),
            "max_abs_diff": float((ours - theirs).abs().max())}


def _label_order(values: set) -> list:
    # Integer labels keep their numeric order (so 0..K-1 map to themselves); others sort as text.
    if all(isinstance(v, (int, bool)) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def index_labels(splits: dict[str, list[dict]], key: str, setting: str, sequence: bool = False,
                 known: Optional[list] = None) -> list[str]:
    """Replace each example's label(s) by an index into the training labels; return the label names.

    `sequence`: the label is a list (one tag per token). `known`: a fixed label
    list (e.g. a dataset's declared classes) instead of the ones seen in training.
    Labels that appear in validation/test but never in training are refused:
    the model could never predict them.
    """
    def values(split: str) -> set:
        found = set()
        for example in splits.get(split, []):
            found.update(example[key] if sequence else [example[key]])
        return found

    train_values = values("train")
    labels = list(known) if known is not None else _label_order(train_values)
    if known is None and not sequence and len(labels) < 2:
        raise UserError(f"{setting}: the training split has only {len(labels)} distinct label(s) "
                        f"({[str(v) for v in labels]}); classification needs at least 2")
    for split in ("train", "validation", "test"):
        unseen = values(split) - set(labels) if known is not None else values(split) - train_values
        if unseen:
            shown = sorted(map(str, unseen))[:5]
            raise UserError(f"{setting}: the {split} split has label(s) {shown} that the training split never has "
                            f"(training labels: {[str(v) for v in labels][:20]})")
    index = {value: i for i, value in enumerate(labels)}
    for split in splits:
        for example in splits[split]:
            example[key] = [index[v] for v in example[key]] if sequence else index[example[key]]
    return [str(v) for v in labels]


def check_token_tags(splits: dict[str, list[dict]], where: str) -> None:
    """Every example of a token-classification split has exactly one tag per token."""
    for split, examples in splits.items():
        for number, example in enumerate(examples):
            tokens, tags = example["tokens"], example["tags"]
            if len(tokens) != len(tags):
                raise UserError(f"{where}: {split} example {number} has {len(tags)} tags for {len(tokens)} tokens "
                                f"(tokens start {tokens[:5]}); every token needs exactly one tag")



TASKS: Registry[Task] = Registry("task", key="name", store_schemas=False)


def metric_name(label) -> str:
    """A class or entity-type name as it appears in a metric key (`f1_<name>`): no spaces or slashes."""
    return re.sub(r"[^\w\-]+", "_", str(label)).strip("_") or "_"


def get_task(name: str, labels: list[str] | None) -> Task:
    return TASKS.get(name, "data.task").cls(labels)


def task_class(name: str) -> type[Task]:
    """The task a finished run recorded by name (its class: what export and comparison need of it)."""
    return TASKS.get(name, "task").cls


def optimized_metric(setting: Optional[str], task: Task) -> str:
    """The metric a run is judged by (returned to the sweepers, ranked by the sweep report): `optimized_metric`
    when it is set, else the task's primary metric on the test split. The run records it in metrics.json."""
    return setting or f"test/{task.primary_metric}"


# Every module of this package registers its tasks entries when imported.
import_submodules(__name__, __path__)

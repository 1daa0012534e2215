"""Causal-LM perplexity, the protocol of the one-shot pruning papers (Wanda, SparseGPT).

- Evaluation: the split's documents joined with "\\n\\n", tokenised once, cut
  into non-overlapping windows of `data.max_length` tokens (the papers'
  `seqlen`), the remainder dropped. Each window is scored on its own;
  perplexity = exp(total token NLL / predicted tokens), summed over every
  batch (not a mean of per-batch means).
- Calibration (`calibration_examples`): windows of the same length starting at
  random offsets (Python `random`, seed 0 as in the papers) of the training
  text, which never overlaps the evaluation text.
- Fine-tuning (optional, any PEFT strategy): next-token loss on the training
  text cut the same way.

`data.limit_train` / `data.limit_eval` count windows here, not documents.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForCausalLM

from llmk_lab.errors import UserError
from llmk_lab.tasks import TASKS, Task

CALIBRATION_SEED = 0


class TokenNLL(Metric):
    """Sum of token negative log-likelihoods and the number of tokens scored; computes exp(mean NLL).

    Labels equal to -100 are not scored; logits at position t predict token t+1.
    """
    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> None:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        scored = labels != -100
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        self.nll_sum += nll.double()
        self.tokens += scored.sum()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.tokens.clamp(min=1))


def token_windows(ids: list[int], seqlen: int) -> list[list[int]]:
    """Non-overlapping windows of exactly `seqlen` tokens; the remainder is dropped."""
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(len(ids) // seqlen)]


def random_windows(stream: torch.Tensor, n: int, seqlen: int, seed: int = CALIBRATION_SEED) -> list[torch.Tensor]:
    """`n` windows of `seqlen` tokens at random offsets of `stream` (the papers' calibration sampling)."""
    if len(stream) <= seqlen:
        raise UserError(f"calibration needs more than data.max_length={seqlen} tokens of training text; "
                        f"the training split has {len(stream)}")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(n)]
    return [stream[s:s + seqlen] for s in starts]


@dataclass
class CausalLMConfig:
    name: str = "causal_lm"


@TASKS.register("causal_lm", config=CausalLMConfig)
class CausalLM(Task):
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    primary_metric = "perplexity"
    head_modules = ("lm_head",)
    limits_count_windows = True
    protocol = ("each split's documents joined with '\\n\\n', tokenised once, non-overlapping windows of {seqlen} "
                "tokens, remainder dropped; perplexity = exp(total token NLL / predicted tokens) over all windows; "
                "calibration: windows of {seqlen} tokens at random offsets (seed 0) of the training text")

    def tokenize(self, tokenizer, examples, data_cfg):
        return self.tokenize_split(tokenizer, examples, data_cfg, "train")

    def tokenize_split(self, tokenizer, examples, data_cfg, split):
        for number, example in enumerate(examples):
            if not isinstance(example.get("text"), str):
                raise UserError(f"data.text_column={data_cfg.text_column!r}: {split} example {number} holds "
                                f"{type(example.get('text')).__name__}, not text")
        text = "\n\n".join(e["text"] for e in examples)
        # One call over the whole text, as the protocol prescribes; its length
        # exceeds the model's maximum on purpose (we cut windows ourselves).
        ids = tokenizer(text, verbose=False)["input_ids"]
        windows = token_windows(ids, data_cfg.max_length)
        if not windows:
            raise UserError(f"data: the {split} split has {len(ids)} tokens, fewer than one window of "
                            f"data.max_length={data_cfg.max_length}")
        return [{"input_ids": torch.tensor(w, dtype=torch.long)} for w in windows]

    def collator(self, tokenizer):
        def collate(examples):
            input_ids = torch.stack([e["input_ids"] for e in examples])
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                    "labels": input_ids.clone()}
        return collate

    def calibration_examples(self, splits, n_examples, data_cfg):
        """Random windows of the training text (seed 0), never of the evaluation text."""
        stream = torch.cat([e["input_ids"] for e in splits["train"]])
        return [{"input_ids": w} for w in random_windows(stream, n_examples, data_cfg.max_length)]

    def metrics(self):
        return MetricCollection({"perplexity": TokenNLL()})

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits, batch["labels"])

    def compute_metrics(self, metrics):
        perplexity = float(metrics["perplexity"].compute())  # synced across processes under DDP
        return {"perplexity": perplexity, "nll": math.log(perplexity)}

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
from llmk_lab.tasks import TASKS, Task, loss_agreement, loss_comparison

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

    def update(self, logits: torch.Tensor | None = None, labels: torch.Tensor | None = None, shift: bool = True,
               nll_sum: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> None:
        """From logits and labels, or from sums computed elsewhere (`nll_sum`, `tokens`: see `chunked_token_nll`)."""
        if nll_sum is not None:
            self.nll_sum += nll_sum.double()
            self.tokens += tokens
            return
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        # One sequence at a time: the float copy and log-softmax of cross_entropy then cost one
        # sequence x vocab, not batch x length x vocab.
        for row_logits, row_labels in zip(logits, labels):
            self.nll_sum += torch.nn.functional.cross_entropy(row_logits.float(), row_labels, ignore_index=-100,
                                                              reduction="sum").double()
            self.tokens += (row_labels != -100).sum()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.tokens.clamp(min=1))


# Bytes of float32 logits one lm_head call in evaluation may produce: the positions scored per call are
# this / (4 x vocab), so the logits (and cross-entropy's log-softmax of them) held at once stay the same
# whatever the vocabulary, eval batch size and window length (SmolLM2's 49,152 tokens: 682 positions a call;
# a 262,144-token vocabulary: 128).
EVAL_LOGITS_BYTES = 128 * 2**20


@dataclass
class ChunkedLMOutput:
    """What `CausalLM.eval_outputs` returns: the summed token NLL instead of the logits."""
    loss: torch.Tensor  # mean NLL of the scored tokens, what the module logs as `<stage>/loss`
    nll_sum: torch.Tensor
    tokens: torch.Tensor
    logits: None = None


def _final_hidden_states(model, head: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Run `model` with its output layer replaced by one that records its input (the final hidden
    states) and returns a 1-wide placeholder, so the batch x length x vocab logits are never formed.
    Works through PEFT wrappers and for any architecture whose logits are `head(hidden)`."""
    captured: list[torch.Tensor] = []
    own_forward = head.__dict__.get("forward")  # a forward patched onto the instance (e.g. masked layers)

    def record(hidden, *args, **kwargs):
        captured.append(hidden)
        return hidden.new_zeros(*hidden.shape[:-1], 1)

    head.forward = record
    try:
        model(**inputs)
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
    if len(captured) != 1:
        raise RuntimeError(f"the output layer ran {len(captured)} times in one forward; expected once")
    return captured[0]


def chunked_token_nll(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                      chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and scored-token count from the final hidden states, `chunk` positions
    per call of the output layer (labels -100 are not scored; position t predicts token t+1)."""
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # adapter wrappers keep out_features
    chunk = chunk or max(1, EVAL_LOGITS_BYTES // (4 * vocab))
    hidden = hidden[:, -labels.shape[1]:]  # prompt tuning puts virtual tokens in front of the input
    targets = labels[:, 1:].reshape(-1)
    scored = targets != -100
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[scored]
    targets = targets[scored]
    nll = hidden.new_zeros((), dtype=torch.float64)
    for start in range(0, len(targets), chunk):
        logits = head(states[start:start + chunk]).float()
        nll += torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="sum").double()
    return nll, scored.sum()


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


@TASKS.register("causal_lm")
class CausalLM(Task):
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    primary_metric = "perplexity"
    head_modules = ("lm_head",)
    limits_count_windows = True
    scores_text_continuations = True
    example_format = "text"
    scores = "text"
    reference_size = 16
    test_stage_keeps_outputs = False
    loss_is_label_cross_entropy = False  # the next-token loss over the window, labels shifted
    protocol = ("each split's documents joined with '\\n\\n', tokenised once, non-overlapping windows of {seqlen} "
                "tokens, remainder dropped; perplexity = exp(total token NLL / predicted tokens) over all windows; "
                "calibration: windows of {seqlen} tokens at random offsets (seed 0) of the training text")

    @classmethod
    def reference_batch(cls, tokenizer, examples):
        ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @classmethod
    def example_outputs(cls, logits, batch):
        """Mean next-token NLL of each window."""
        ids = batch["input_ids"]
        logits = logits[:, -ids.shape[1]:]  # prompt tuning puts virtual tokens in front
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.mean(-1).double()  # kept in float64, as NLL sums are

    @classmethod
    def agreement(cls, ours, theirs, labels=None):
        return loss_agreement(ours, theirs)

    @classmethod
    def comparison(cls, a, b, labels=None):
        return loss_comparison(a, b)

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

    def calibration_examples(self, splits, n_examples, data_cfg, seed=CALIBRATION_SEED):
        """Random windows of the training text (seed 0 unless a method sets its own), never of the evaluation text."""
        stream = torch.cat([e["input_ids"] for e in splits["train"]])
        return [{"input_ids": w} for w in random_windows(stream, n_examples, data_cfg.max_length, seed)]

    def metrics(self):
        return MetricCollection({"perplexity": TokenNLL()})

    def eval_outputs(self, model, batch):
        """Evaluation loss without the whole batch's logits (see `EVAL_LOGITS_BYTES`)."""
        head = model.get_output_embeddings()
        # Logit soft-capping (Gemma 2) happens after the output layer: score such models the plain way.
        if head is None or getattr(getattr(model, "config", None), "final_logit_softcapping", None):
            return model(**batch)
        labels = batch["labels"]
        hidden = _final_hidden_states(model, head, {k: v for k, v in batch.items() if k != "labels"})
        nll_sum, tokens = chunked_token_nll(head, hidden, labels)
        return ChunkedLMOutput(loss=(nll_sum / tokens.clamp(min=1)).float(), nll_sum=nll_sum, tokens=tokens)

    def update_metrics(self, metrics, batch, outputs):
        if isinstance(outputs, ChunkedLMOutput):
            metrics["perplexity"].update(nll_sum=outputs.nll_sum, tokens=outputs.tokens)
        else:
            metrics["perplexity"].update(outputs.logits, batch["labels"])

    def compute_metrics(self, metrics):
        perplexity = float(metrics["perplexity"].compute())  # synced across processes under DDP
        return {"perplexity": perplexity, "nll": math.log(perplexity)}

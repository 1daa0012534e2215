"""Masked-LM continued pretraining on a domain corpus, with next-sentence prediction as an option.

`masked_lm`: each document is tokenised and cut into pieces of at most
`data.max_length` tokens (with the special tokens). Training batches are masked
afresh every time (BERT's recipe: 15 % of the tokens chosen, of those 80 %
replaced by [MASK], 10 % by a random token, 10 % kept; `data.options.mlm_probability`);
validation and test are masked once with a fixed seed, so every evaluation
scores the same positions. Metrics: perplexity over the masked tokens
(exp of their mean NLL) and masked-token accuracy.

`masked_lm_nsp` adds next-sentence prediction (BERT): documents are split into
sentences and grouped into segments of about a third of `data.max_length`
words; each pair is (segment, the segment after it in the same document) or,
with probability 0.5, (segment, a random segment of another document),
drawn with `data.split_seed`. Metric: NSP accuracy as well.

A checkpoint without a masked-LM head (MiniLM's) gets a newly initialised one
whose output layer is tied to the word embeddings; `models.load_model` logs it.
The trained model (`export.merged=true`) is a plain checkpoint that a
classification or NER run loads through `model.name_or_path`.
"""
from __future__ import annotations

import random
import re

import torch
from torchmetrics import Metric, MetricCollection
from transformers import (AutoModelForMaskedLM, AutoModelForPreTraining, DataCollatorForLanguageModeling,
                          DataCollatorForTokenClassification)

from llmk_lab.errors import UserError
from llmk_lab.tasks import TASKS, Task, loss_agreement, loss_comparison
from llmk_lab.tasks.causal_lm import TokenNLL

SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n\s*\n")


def sentences_of(text: str) -> list[str]:
    return [s for s in (" ".join(part.split()) for part in SENTENCE_END.split(text)) if s]


def segments_of(text: str, target_words: int) -> list[str]:
    """Consecutive sentences grouped until each group has about `target_words` words."""
    segments, current, words = [], [], 0
    for sentence in sentences_of(text):
        current.append(sentence)
        words += len(sentence.split())
        if words >= target_words:
            segments.append(" ".join(current))
            current, words = [], 0
    if current:
        segments.append(" ".join(current))
    return segments


def sentence_pairs(documents: list[str], target_words: int, seed: int) -> list[dict]:
    """BERT's NSP pairs: the next segment of the same document (label 0) or, half the time, a random segment
    of a different document (label 1)."""
    rng = random.Random(seed)
    per_doc = [segments_of(d, target_words) for d in documents]
    others = [i for i, segs in enumerate(per_doc) if segs]
    if len(others) < 2:
        raise UserError("next-sentence prediction needs at least 2 non-empty documents in every split "
                        f"(found {len(others)})")
    pairs = []
    for doc, segs in enumerate(per_doc):
        for i in range(0, len(segs) - 1, 2):
            if rng.random() < 0.5:
                pairs.append({"text": segs[i], "text_pair": segs[i + 1], "next_sentence_label": 0})
            else:
                other = rng.choice([j for j in others if j != doc])
                pairs.append({"text": segs[i], "text_pair": rng.choice(per_doc[other]), "next_sentence_label": 1})
    if not pairs:
        raise UserError("next-sentence prediction found no document with 2 or more sentences")
    return pairs


class MaskedAccuracy(Metric):
    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        scored = labels != -100
        self.correct += (logits.argmax(-1)[scored] == labels[scored]).sum()
        self.total += scored.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


@TASKS.register("masked_lm")
class MaskedLM(Task):
    auto_class = AutoModelForMaskedLM
    # peft has no masked-LM task type; the generic wrapper keeps the head frozen, so
    # continued pretraining normally trains every weight (peft=full).
    peft_task_type = None
    primary_metric = "perplexity"
    head_modules = ("cls", "lm_head")
    example_format = "text"
    scores = "text"
    reference_size = 16
    test_stage_keeps_outputs = False

    @classmethod
    def example_outputs(cls, logits, batch):
        """Mean NLL of each example's masked tokens (fixed at tokenisation for evaluation)."""
        labels = batch["labels"]
        logits = logits[:, -labels.shape[1]:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none").sum(-1)
        return (nll / (labels != -100).sum(-1).clamp_min(1)).double()  # kept in float64, as NLL sums are

    @classmethod
    def agreement(cls, ours, theirs, labels=None):
        return loss_agreement(ours, theirs)

    @classmethod
    def comparison(cls, a, b, labels=None):
        return loss_comparison(a, b)
    mlm_probability = 0.15
    seed = 0
    split_seed = 0

    def configure(self, data_cfg, seed: int) -> None:
        self.mlm_probability = float(data_cfg.options.get("mlm_probability", 0.15))
        if not 0 < self.mlm_probability < 1:
            raise UserError(f"data.options.mlm_probability={self.mlm_probability} is not allowed: a number in (0, 1)")
        self.seed, self.split_seed = seed, data_cfg.split_seed

    @staticmethod
    def check_examples(raw, data_cfg) -> None:
        for split, examples in raw.splits.items():
            for number, example in enumerate(examples):
                if not isinstance(example.get("text"), str):
                    raise UserError(f"data.text_column={data_cfg.text_column!r}: {split} example {number} holds "
                                    f"{type(example.get('text')).__name__}, not text")

    def encode(self, tokenizer, examples, data_cfg, split) -> list[dict]:
        encoded = tokenizer([e["text"] for e in examples], truncation=True, max_length=data_cfg.max_length,
                            return_overflowing_tokens=True, return_special_tokens_mask=True)
        keys = [k for k in encoded.keys() if k != "overflow_to_sample_mapping"]
        return [{k: encoded[k][i] for k in keys} for i in range(len(encoded["input_ids"]))]

    def tokenize(self, tokenizer, examples, data_cfg):
        return self.tokenize_split(tokenizer, examples, data_cfg, "train")

    def tokenize_split(self, tokenizer, examples, data_cfg, split):
        if tokenizer.mask_token is None:
            raise UserError("masked-LM training needs a tokenizer with a mask token; this one has none")
        encoded = self.encode(tokenizer, examples, data_cfg, split)
        if split == "train":
            return encoded
        return self.mask_once(tokenizer, encoded, seed=self.split_seed + (1 if split == "validation" else 2))

    def mask_once(self, tokenizer, encoded: list[dict], seed: int) -> list[dict]:
        """Fixed masks for evaluation: the same positions are scored every time."""
        masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=self.mlm_probability, seed=seed)
        out = []
        for start in range(0, len(encoded), 256):
            chunk = encoded[start:start + 256]
            batch = masker(chunk)
            for i, example in enumerate(chunk):
                n = len(example["input_ids"])
                item = {k: batch[k][i, :n].tolist() for k in batch if k not in ("labels", "next_sentence_label")}
                item["labels"] = batch["labels"][i, :n].tolist()
                if "next_sentence_label" in example:
                    item["next_sentence_label"] = example["next_sentence_label"]
                out.append(item)
        return out

    def collator(self, tokenizer):
        masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=self.mlm_probability, seed=self.seed)
        padder = DataCollatorForTokenClassification(tokenizer, return_tensors="pt")

        def collate(examples):
            if "labels" in examples[0]:  # masked once at tokenisation (evaluation)
                return padder([{k: v for k, v in e.items() if k != "special_tokens_mask"} for e in examples])
            return masker(examples)
        return collate

    def metrics(self):
        # Updated one by one (different inputs), so no shared compute groups.
        return MetricCollection({"perplexity": TokenNLL(), "masked_acc": MaskedAccuracy()}, compute_groups=False)

    def logits(self, outputs):
        # AutoModelForPreTraining (masked LM + NSP) names the token scores prediction_logits.
        return outputs.logits if hasattr(outputs, "logits") else outputs.prediction_logits

    def update_metrics(self, metrics, batch, outputs):
        logits = self.logits(outputs)
        metrics["perplexity"].update(logits, batch["labels"], shift=False)
        metrics["masked_acc"].update(logits, batch["labels"])

    def compute_metrics(self, metrics):
        return {k: float(v) for k, v in metrics.compute().items()}


@TASKS.register("masked_lm_nsp")
class MaskedLMWithNSP(MaskedLM):
    auto_class = AutoModelForPreTraining
    loss_is_label_cross_entropy = False  # plus the next-sentence loss

    def encode(self, tokenizer, examples, data_cfg, split):
        seed = self.split_seed + {"train": 0, "validation": 1, "test": 2}.get(split, 3)
        pairs = sentence_pairs([e["text"] for e in examples], max(1, data_cfg.max_length // 3), seed)
        encoded = tokenizer([p["text"] for p in pairs], [p["text_pair"] for p in pairs], truncation="longest_first",
                            max_length=data_cfg.max_length, return_special_tokens_mask=True)
        return [{**{k: encoded[k][i] for k in encoded.keys()}, "next_sentence_label": p["next_sentence_label"]}
                for i, p in enumerate(pairs)]

    def metrics(self):
        collection = super().metrics()
        collection.add_metrics({"nsp_acc": MaskedAccuracy()})
        return collection

    def update_metrics(self, metrics, batch, outputs):
        super().update_metrics(metrics, batch, outputs)
        metrics["nsp_acc"].update(outputs.seq_relationship_logits, batch["next_sentence_label"])

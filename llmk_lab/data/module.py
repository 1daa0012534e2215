"""Tokenised splits, cached on disk by fingerprint, served as a Lightning data module."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, RandomSampler

from llmk_lab.assets import cache_root
from llmk_lab.data import SPLITS, RawData
from llmk_lab.paths import file_lock, write_atomically

log = logging.getLogger(__name__)

# Bump when what a task's tokenisation produces changes, so stale cache entries are not reused.
CACHE_FORMAT = 3


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{spec}".encode()).hexdigest()[:16]


def cache_key(raw: RawData, task_name: str, tokenizer, data_cfg) -> str:
    parts = [str(CACHE_FORMAT), raw.fingerprint(), task_name, tokenizer_fingerprint(tokenizer),
             str(data_cfg.max_length), json.dumps(dict(data_cfg.options), sort_keys=True, default=str),
             str(data_cfg.split_seed)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def tokenize_cached(raw: RawData, task, tokenizer, data_cfg) -> tuple[dict[str, list[dict]], bool]:
    """Tokenise every split once per (data, task, tokenizer, max length, options); returns (splits, cache_hit)."""
    key = cache_key(raw, task.registered_name, tokenizer, data_cfg)
    path = cache_root() / "tokenized" / f"{key}.pt"
    if path.exists():
        return _load_cached(path), True
    # Two jobs started together over a fresh cache: the second waits for the first's entry instead of
    # tokenising the same data again; the entry is written then renamed, so no reader sees half of it.
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            return _load_cached(path), True
        splits = {split: task.tokenize_split(tokenizer, raw.splits[split], data_cfg, split) for split in SPLITS}
        write_atomically(path, lambda tmp: torch.save({split: _packed(examples) for split, examples in splits.items()},
                                                      tmp))
    return splits, False


def _load_cached(path) -> dict[str, list[dict]]:
    return {split: _unpacked(packed) for split, packed in torch.load(path, weights_only=True).items()}


def _packed(examples: list) -> dict:
    """A split whose examples are dicts of 1-D tensors (a causal LM's windows) as one tensor per key and the
    examples' lengths: a cache of thousands of small tensors takes a second to load, a few large ones none."""
    keys = list(examples[0]) if examples and isinstance(examples[0], dict) else []
    if not keys or not all(isinstance(e, dict) and list(e) == keys and
                           all(isinstance(e[k], torch.Tensor) and e[k].dim() == 1 for k in keys) for e in examples):
        return {"examples": examples}
    return {"columns": {k: torch.cat([e[k] for e in examples]) for k in keys},
            "lengths": {k: torch.tensor([len(e[k]) for e in examples]) for k in keys}}


def _unpacked(packed: dict) -> list:
    if "examples" in packed:
        return packed["examples"]
    keys = list(packed["columns"])
    # Each example its own tensor again (clones, not views into one storage), as the task tokenised it.
    columns = [[t.clone() for t in torch.split(packed["columns"][k], packed["lengths"][k].tolist())] for k in keys]
    return [dict(zip(keys, values)) for values in zip(*columns)]


class TaskDataModule(pl.LightningDataModule):
    def __init__(self, raw: RawData, task, tokenizer, data_cfg, train_cfg, seed: int):
        super().__init__()
        self.raw, self.task, self.tokenizer = raw, task, tokenizer
        self.data_cfg, self.train_cfg, self.seed = data_cfg, train_cfg, seed
        task.configure(data_cfg, seed)
        started = time.perf_counter()
        self.tokenized, self.cache_hit = tokenize_cached(raw, task, tokenizer, data_cfg)
        self.tokenize_seconds = time.perf_counter() - started
        self.splits = self._limited(self.tokenized)
        log.info("tokenised data: %s (cache %s, %.1f s)", {k: len(v) for k, v in self.splits.items()},
                 "hit" if self.cache_hit else "miss", self.tokenize_seconds)
        self.collate = task.collator(tokenizer)
        self.train_sampler: Optional[ResumableRandomSampler] = None
        self._pending_order: Optional[dict] = None  # a resume checkpoint's order, restored before the loader exists

    def _limited(self, tokenized: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """Limits counted in tokenised examples (windows) for tasks that cut a text stream."""
        if not self.task.limits_count_windows:
            return tokenized
        limits = {"train": self.data_cfg.limit_train, "validation": self.data_cfg.limit_eval,
                  "test": self.data_cfg.limit_eval}
        return {split: examples[: limits[split]] if limits.get(split) else examples
                for split, examples in tokenized.items()}

    def eval_order(self, split: str) -> list[int]:
        """Indices of the split's examples in the order its evaluation loader yields them. Evaluation order
        does not change the metrics; sorting by length keeps padding, and so evaluation time, to a minimum."""
        examples = self.splits[split]
        return sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        examples = self.splits[split]
        if not shuffle:
            examples = [examples[i] for i in self.eval_order(split)]
            return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=self.collate, num_workers=0)
        # A dedicated generator makes the shuffling order a function of the seed alone; the sampler is the one
        # `shuffle=True` makes, able to record and resume its place in an epoch.
        generator = torch.Generator().manual_seed(self.seed)
        self.train_sampler = ResumableRandomSampler(examples, generator)
        if self._pending_order is not None:
            self.train_sampler.load_state_dict(self._pending_order)
            self._pending_order = None
        return DataLoader(examples, batch_size=batch_size, sampler=self.train_sampler,
                          collate_fn=self.collate, generator=generator, num_workers=0)

    def train_order_state(self, batches_done: int, epoch_finished: bool) -> dict:
        """Where the training order stands after `batches_done` batches of the current epoch (for a resume
        checkpoint)."""
        return self.train_sampler.state_dict(batches_done * self.train_cfg.batch_size, epoch_finished)

    def resume_train_order(self, state: dict) -> None:
        """Continue the training order from `state` (applied when the training loader is made, or now)."""
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state)
        else:
            self._pending_order = state


    def train_dataloader(self):
        return self._loader("train", True, self.train_cfg.batch_size)

    def val_dataloader(self):
        return self._loader("validation", False, self.train_cfg.eval_batch_size)

    def test_dataloader(self):
        return self._loader("test", False, self.train_cfg.eval_batch_size)

    def calibration_batches(self, n_examples: int, batch_size: Optional[int] = None, seed: int = 0) -> list[dict]:
        """Calibration data for one-shot compression, from training data only (never validation/test).

        The task decides how it is drawn (`Task.calibration_examples`: the first
        `n_examples` training examples of the fixed, seeded split; causal LM:
        random windows of the training text drawn with `seed`, 0 as in the papers).
        """
        examples = self.task.calibration_examples(self.tokenized, n_examples, self.data_cfg, seed)
        loader = DataLoader(examples, batch_size=batch_size or self.train_cfg.eval_batch_size,
                            shuffle=False, collate_fn=self.collate)
        return list(loader)


class ResumableRandomSampler(RandomSampler):
    """torch's RandomSampler (the same order, drawn from the same generator, as `DataLoader(shuffle=True)`)
    that can say where it stands and start an epoch part-way.

    A run resumed mid-epoch must see the rest of that epoch's permutation, and later epochs the permutations
    the uninterrupted run would have drawn. So the state is the generator's state just before the epoch's
    permutation was drawn and how many examples of it were trained on; at an epoch's end, the generator's
    state as it is (the next epoch draws from it). Restoring sets the generator back and skips what was done.
    Exact with one process and `num_workers=0` (a distributed sampler reshards the order and keeps no state).
    """

    def __init__(self, data_source, generator: torch.Generator):
        super().__init__(data_source, generator=generator)
        self.epoch_start_state = generator.get_state()
        self._resume: Optional[tuple[torch.Tensor, int]] = None

    def __iter__(self):
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            self.generator.set_state(state)
        else:
            skip = 0
        self.epoch_start_state = self.generator.get_state()
        yield from itertools.islice(super().__iter__(), skip, None)

    def state_dict(self, examples_done: int, epoch_finished: bool) -> dict:
        if epoch_finished:
            return {"generator": self.generator.get_state(), "skip": None}
        return {"generator": self.epoch_start_state, "skip": examples_done}

    def load_state_dict(self, state: dict) -> None:
        if state["skip"] is None:  # the next epoch draws from the generator as it was at the checkpoint
            self.generator.set_state(state["generator"])
        else:
            self._resume = (state["generator"], int(state["skip"]))

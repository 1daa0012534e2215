"""Datasets: named loaders that return raw train/validation/test examples.

    @register_dataset("movie_reviews", task="sequence_classification")
    def load_movie_reviews(cfg: DataConfig) -> RawData: ...

A loader returns plain Python examples; tokenisation, caching and batching
are shared (`llmk_lab.data.module`).
"""
from __future__ import annotations

from llmk_lab.registry import import_submodules

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from llmk_lab.errors import InvalidValue, UserError
from llmk_lab.tasks import TASKS, check_token_tags, index_labels  # noqa: F401  (the loaders' label checks)

SPLITS = ("train", "validation", "test")


@dataclass
class RawData:
    splits: dict[str, list[dict[str, Any]]]
    task: str
    labels: Optional[list[str]] = None
    # Where the data came from (asset, checksum, file, split seed): goes into the manifest.
    source: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Content hash of every split: the tokenisation cache key starts from it."""
        digest = hashlib.sha256()
        for split in sorted(self.splits):
            digest.update(split.encode())
            digest.update(json.dumps(self.splits[split], sort_keys=True).encode())
        digest.update(json.dumps(self.labels).encode())
        return digest.hexdigest()[:16]

    def sizes(self) -> dict[str, int]:
        return {split: len(examples) for split, examples in self.splits.items()}


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    task: str
    load: Callable[[Any], RawData]


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, task: str):
    def decorate(fn: Callable[[Any], RawData]):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = DatasetEntry(name, task, fn)
        return fn

    return decorate


def load_data(cfg) -> RawData:
    """Load the dataset named by `cfg.name`, apply limits, and check it is usable."""
    if cfg.name not in DATASETS:
        raise InvalidValue("data.name", cfg.name, f"one of {sorted(DATASETS)}")
    raw = DATASETS[cfg.name].load(cfg)
    if cfg.task is not None and cfg.task != raw.task:
        raw.task = cfg.task
    task_cls = TASKS.get(raw.task, "data.task").cls
    # Tasks that cut a text stream into windows count limits in windows (after tokenising), not documents.
    if not task_cls.limits_count_windows:
        if cfg.limit_train:
            raw.splits["train"] = raw.splits["train"][: cfg.limit_train]
        if cfg.limit_eval:
            for split in ("validation", "test"):
                raw.splits[split] = raw.splits[split][: cfg.limit_eval]
    for split in SPLITS:
        if not raw.splits.get(split):
            raise UserError(f"data.name={cfg.name!r}: the {split} split is empty")
    task_cls.check_examples(raw, cfg)
    raw.source.update(sizes=raw.sizes(), task=raw.task)
    if task_cls.protocol:  # how the task's headline number is computed, next to the data it was computed on
        raw.source["protocol"] = task_cls.protocol.format(seqlen=cfg.max_length)
    return raw


def seeded_split(examples: list, seed: int, val_size: int, test_size: int) -> dict[str, list]:
    """A fixed train/validation/test split for data that ships without one."""
    if val_size + test_size >= len(examples):
        raise UserError(f"data.val_size + data.test_size = {val_size + test_size} leaves no training "
                        f"examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    return {
        "test": shuffled[:test_size],
        "validation": shuffled[test_size: test_size + val_size],
        "train": shuffled[test_size + val_size:],
    }


# Every module of this package registers its data entries when imported.
import_submodules(__name__, __path__)
